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
pub mod error;
pub mod extract;
pub mod feedback;
pub mod files;
pub mod health;
pub mod mezo_jobs;
pub mod middleware;
pub mod models;
pub mod openai_jobs;
pub mod protocol;
pub mod state;
pub mod stream;
pub mod token_events;
pub mod validate;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post, put};
use axum::Router;

pub use error::ApiError;
pub use state::{ApiConfig, AppState, ServedAdapter, Serving};

/// The served model's name as a label value (bounded, see [`crate::metrics::adapter_label`]),
/// attached to responses for the request counter's `model` label.
#[derive(Debug, Clone)]
pub struct ServedModelLabel(pub String);

pub fn app(state: AppState) -> Router {
    let body_limit = state.config().max_body_bytes;
    let file_limit = state.config().max_file_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*id}", get(models::get_model))
        .route(
            "/v1/finetune",
            post(mezo_jobs::create_job).get(mezo_jobs::list_jobs),
        )
        .route("/v1/finetune/{id}", get(mezo_jobs::get_job))
        .route("/v1/finetune/{id}/cancel", post(mezo_jobs::cancel_job))
        .route("/v1/finetune/{id}/events", get(mezo_jobs::job_events))
        .route(
            "/v1/fine_tuning/jobs",
            post(openai_jobs::create_job).get(openai_jobs::list_jobs),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(openai_jobs::get_job))
        .route(
            "/v1/fine_tuning/jobs/{id}/cancel",
            post(openai_jobs::cancel_job),
        )
        .route(
            "/v1/fine_tuning/jobs/{id}/events",
            get(openai_jobs::job_events),
        )
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(openai_jobs::job_checkpoints),
        )
        .route(
            "/v1/files",
            post(files::upload_file)
                .layer(DefaultBodyLimit::max(file_limit))
                .get(files::list_files),
        )
        .route(
            "/v1/files/{id}",
            get(files::get_file).delete(files::delete_file),
        )
        .route("/v1/files/{id}/content", get(files::file_content))
        .route(
            "/v1/feedback",
            post(feedback::post_feedback).get(feedback::list_feedback),
        )
        .route("/v1/adapters", get(adapters::list_adapters))
        .route(
            "/v1/adapters/{name}",
            get(adapters::get_adapter).delete(adapters::delete_adapter),
        )
        .route("/v1/adapters/{name}/rollback", post(adapters::rollback))
        .route(
            "/v1/adapters/{name}/continuous_training",
            put(adapters::set_continuous_training),
        )
        .route("/v1/load_lora_adapter", post(adapters::load_lora_adapter))
        .route(
            "/v1/unload_lora_adapter",
            post(adapters::unload_lora_adapter),
        )
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
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
