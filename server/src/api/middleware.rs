//! Layers every request passes through: the request id (echoed from `x-request-id` or made
//! up), API-key authentication, and the request counter by route, model and status.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::metrics as m;

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

/// With `api_keys` configured, `/v1/*` (and `/metrics` if so set) need `Authorization: Bearer`
/// with one of them. `/health` and `/ready` are always open, for probes.
pub async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let config = state.config();
    let path = request.uri().path();
    let protected = path.starts_with("/v1/")
        || path == "/v1"
        || (path == "/metrics" && config.metrics_require_key);
    if config.api_keys.is_empty() || !protected {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => ApiError::unauthorized(
            "this server needs an API key: send `Authorization: Bearer <key>` (the openai client's api_key)",
        )
        .into_response(),
        Some(key) if config.api_keys.iter().any(|k| constant_time_eq(k, key)) => {
            next.run(request).await
        }
        Some(_) => ApiError::unauthorized("the API key is not valid for this server")
            .into_response(),
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

/// Compares keys in time independent of where they differ.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq("sk-abc", "sk-abc"));
        assert!(!constant_time_eq("sk-abc", "sk-abd"));
        assert!(!constant_time_eq("sk-abc", "sk-ab"));
    }
}
