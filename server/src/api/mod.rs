//! The HTTP layer: OpenAI-compatible routes over the scheduler.
//!
//! A request goes HTTP → [`extract`] (body limit, JSON) → [`validate`] (fields, ranges,
//! unsupported features) → the model resolved once ([`state`]) → the [`crate::scheduler`] →
//! back as JSON or server-sent events ([`stream`]). [`app`] builds the whole router, so tests
//! can drive it without a socket.

pub mod chat;
pub mod completions;
pub mod error;
pub mod extract;
pub mod generation;
pub mod health;
pub mod ids;
pub mod middleware;
pub mod models;
pub mod protocol;
pub mod state;
pub mod stream;
pub mod validate;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;
pub use state::{ApiConfig, AppState, ServedAdapter, Serving};

/// The served model's name, attached to responses for the request counter's `model` label.
#[derive(Debug, Clone)]
pub struct ServedModelLabel(pub String);

pub fn app(state: AppState) -> Router {
    let body_limit = state.config().max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*id}", get(models::get_model))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(middleware::count_requests))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_api_key,
        ))
        .layer(axum::middleware::from_fn(middleware::request_id))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
