//! Layers every request passes through: the request id (echoed from `x-request-id` or made
//! up), API-key authentication and scopes ([`access`]), and the request counter by route,
//! model and status.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};

use crate::metrics as m;

use super::access::{self, RequestSlot};
use super::error::ApiError;
use super::state::AppState;
use super::ServedModelLabel;
use crate::ids::new_id;

const REQUEST_ID: &str = "x-request-id";

/// Echoes the client's `x-request-id`, or sets a new one, on every response.
pub async fn request_id(request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| v.len() <= 128)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&new_id("req")).expect("ids are ASCII alphanumerics")
        });
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// With keys configured (`server.api_keys`, `[[server.keys]]`), `/v1/*` (and `/metrics` if so
/// set) need `Authorization: Bearer` with one of them, and a scoped key must have the route's
/// scope ([`access::required_scope`]): 401 without a valid key, 403 without the scope, 429
/// when the key already has its most requests in flight. `/health` and `/ready` are always
/// open, for probes.
pub async fn require_api_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let config = state.config();
    let path = request.uri().path();
    let is_metrics = path == "/metrics";
    let protected =
        path.starts_with("/v1/") || path == "/v1" || (is_metrics && config.metrics_require_key);
    if config.keys.is_empty() || !protected {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(given) = given else {
        return ApiError::unauthorized(
            "this server needs an API key: send `Authorization: Bearer <key>` (the openai client's api_key)",
        )
        .into_response();
    };
    let Some(key) = config.keys.find(given) else {
        return ApiError::unauthorized("the API key is not valid for this server").into_response();
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    // /metrics takes any valid key.
    let needed = if is_metrics {
        None
    } else {
        access::required_scope(request.method(), route)
    };
    if let Some(scope) = needed.filter(|&scope| !key.allows(scope)) {
        let method = request.method().as_str();
        let route = route.unwrap_or(path);
        tracing::info!(key = %key.name, %method, route, %scope, "refused: the key lacks the scope");
        return ApiError::missing_scope(format!(
            "this API key may not call {method} {path}: that needs the `{scope}` scope, and the \
             key has {}; use a key with it (or ask for one: `[[server.keys]]` scopes)",
            key.scope_list()
        ))
        .into_response();
    }
    let Some(slot) = key.try_start_request() else {
        return ApiError::key_busy(key.max_concurrent_requests).into_response();
    };
    request.extensions_mut().insert(key.caller());
    // The place is held until the response's body is done (a stream until it ends).
    next.run(request)
        .await
        .map(|body| Body::new(HeldBody { body, _slot: slot }))
}

/// A response body that holds its request's place among its key's requests in flight.
struct HeldBody {
    body: Body,
    _slot: RequestSlot,
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Counts every answered request by route template, served model and status.
pub async fn count_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    let model = response
        .extensions()
        .get::<ServedModelLabel>()
        .map_or_else(|| "none".to_string(), |l| l.0.clone());
    metrics::counter!(
        m::HTTP_REQUESTS_TOTAL,
        "route" => route,
        "model" => model,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}
