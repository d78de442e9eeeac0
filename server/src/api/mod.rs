//! The HTTP layer: OpenAI-compatible routes over the scheduler.
//!
//! A request goes HTTP → [`extract`] (body limit, JSON) → its wire type ([`protocol`]) → its
//! validated type ([`validate`]: fields, ranges, unsupported features, the model resolved once)
//! → the [`crate::scheduler`] or the training service → back as JSON or server-sent events
//! ([`stream`]). [`app`] builds the whole router, so tests
//! can drive it without a socket.

pub mod access;
pub mod adapters;
pub mod chat;
pub mod completions;
pub mod console;
pub mod error;
pub mod extract;
pub mod feedback;
pub mod files;
pub mod health;
pub mod mezo_jobs;
pub mod middleware;
pub mod models;
pub mod openai_jobs;
pub mod openapi;
pub mod protocol;
pub mod state;
pub mod stream;
pub mod token_events;
pub mod validate;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::ApiError;
pub use state::{ApiConfig, AppState, ServedAdapter, Serving};

/// The served model's name as a label value (bounded, see [`crate::metrics::adapter_label`]),
/// attached to responses for the request counter's `model` label.
#[derive(Debug, Clone)]
pub struct ServedModelLabel(pub String);

/// Every route, each registered with its place in the OpenAPI spec ([`openapi`]); uploads may
/// be up to `file_limit` bytes.
pub fn routes(file_limit: usize) -> OpenApiRouter<AppState> {
    let (schemas, paths, upload) = routes!(files::upload_file);
    let upload = (
        schemas,
        paths,
        upload.layer(DefaultBodyLimit::max(file_limit)),
    );
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(chat::chat_completions))
        .routes(routes!(completions::completions))
        .routes(routes!(models::list_models))
        .routes(routes!(models::get_model))
        .routes(routes!(mezo_jobs::create_job, mezo_jobs::list_jobs))
        .routes(routes!(mezo_jobs::get_job))
        .routes(routes!(mezo_jobs::cancel_job))
        .routes(routes!(mezo_jobs::job_events))
        .routes(routes!(mezo_jobs::job_curves))
        .routes(routes!(openai_jobs::create_job, openai_jobs::list_jobs))
        .routes(routes!(openai_jobs::get_job))
        .routes(routes!(openai_jobs::cancel_job))
        .routes(routes!(openai_jobs::job_events))
        .routes(routes!(openai_jobs::job_checkpoints))
        .routes(upload)
        .routes(routes!(files::list_files))
        .routes(routes!(files::get_file, files::delete_file))
        .routes(routes!(files::file_content))
        .routes(routes!(feedback::post_feedback, feedback::list_feedback))
        .routes(routes!(adapters::list_adapters))
        .routes(routes!(adapters::get_adapter, adapters::delete_adapter))
        .routes(routes!(adapters::rollback))
        .routes(routes!(adapters::set_continuous_training))
        .routes(routes!(adapters::load_lora_adapter))
        .routes(routes!(adapters::unload_lora_adapter))
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(console::root))
        .routes(routes!(console::console))
}

pub fn app(state: AppState) -> Router {
    let body_limit = state.config().max_body_bytes;
    let file_limit = state.config().max_file_bytes;
    let (router, _) = routes(file_limit).split_for_parts();
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // The counter runs outside authentication, so refused requests (401, 403) are
        // counted by route too.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_api_key,
        ))
        .layer(axum::middleware::from_fn(middleware::count_requests))
        .layer(axum::middleware::from_fn(middleware::request_id))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
