//! The OpenAPI 3.1 description of the API, served at `GET /openapi.json`.
//!
//! It cannot drift from the server: [`super::app`] registers every route through
//! `utoipa_axum`'s `routes!`, which adds the handler's `#[utoipa::path]` (method, path,
//! parameters, bodies) to the spec as it adds the handler to the router, and the bodies are the
//! wire types of [`super::protocol`] themselves. A test holds the router and the spec to each
//! other in both directions.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use serde::Deserialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDocument;
use utoipa::{Modify, OpenApi, ToSchema};

use super::protocol::{ChatCompletionRequest, CompletionRequest, SamplingFields};

/// What the spec says about the API as a whole; the paths come from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "mezo-serve",
        description = "An OpenAI-compatible inference server that fine-tunes LoRA adapters in the \
                       background with MeZO. With keys configured (`server.api_keys`, \
                       `[[server.keys]]`), `/v1/*` needs `Authorization: Bearer <key>` with the \
                       route's scope: `inference`, `fine_tuning` or `admin`."
    ),
    modifiers(&BearerKey),
    tags(
        (name = "inference", description = "Chat and text completions, models"),
        (name = "fine-tuning", description = "This server's MeZO jobs"),
        (name = "openai-fine-tuning", description = "OpenAI's fine-tuning API on the same jobs"),
        (name = "files", description = "Uploads of training data"),
        (name = "feedback", description = "Verdicts on served answers"),
        (name = "adapters", description = "Versions, rollback, delete, continuous training, runtime loading"),
        (name = "probes", description = "Health, readiness, metrics, this spec"),
        (name = "console", description = "The web console"),
    )
)]
pub struct ApiDoc;

/// API keys travel as `Authorization: Bearer <key>`.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut OpenApiDocument) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `POST /v1/chat/completions`' body as the spec describes it: the endpoint's fields and the
/// sampling fields, which the handler reads from the same object in two passes.
#[derive(Deserialize, ToSchema)]
pub struct ChatCompletionBody {
    #[serde(flatten)]
    pub request: ChatCompletionRequest,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/completions`' body, likewise.
#[derive(Deserialize, ToSchema)]
pub struct CompletionBody {
    #[serde(flatten)]
    pub request: CompletionRequest,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// One event of a `text/event-stream` answer: `data` holds a JSON chunk, and `[DONE]` ends the
/// stream.
#[derive(ToSchema)]
pub struct ServerSentEvent {
    pub data: String,
    pub event: Option<String>,
    pub id: Option<String>,
    pub retry: Option<u64>,
}

/// The spec as served: axum's catch-all `{*id}` is OpenAPI's `{id}` (a model id with `/` in
/// it is sent percent-encoded).
fn with_openapi_path_params(mut spec: OpenApiDocument) -> OpenApiDocument {
    spec.paths.paths = std::mem::take(&mut spec.paths.paths)
        .into_iter()
        .map(|(path, item)| (path.replace("{*", "{"), item))
        .collect();
    spec
}

/// The spec's JSON, built once.
static SPEC_JSON: LazyLock<String> = LazyLock::new(|| {
    // The upload limit is the router's business, not the spec's.
    let (_, spec) = super::routes(0).split_for_parts();
    with_openapi_path_params(spec)
        .to_pretty_json()
        .unwrap_or_default()
});

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "probes",
    summary = "This description of the API (OpenAPI 3.1)",
    responses((status = 200, description = "The spec", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        SPEC_JSON.as_str(),
    )
}
