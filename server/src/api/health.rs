//! Probes and metrics: `GET /health` (the process answers), `GET /ready` (the model is loaded
//! and requests can be served), `GET /metrics` (Prometheus text format).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::metrics as m;
use crate::process_memory;

use super::error::{ApiError, ErrorBody};
use super::protocol::{Health, Ready};
use super::state::AppState;

#[utoipa::path(
    get,
    path = "/health",
    tag = "probes",
    summary = "The process answers",
    responses(
        (status = 200, description = "Alive", body = Health),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/ready",
    tag = "probes",
    summary = "The model is loaded",
    responses(
        (status = 200, description = "Ready to serve", body = Ready),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    match state.serving() {
        Ok(serving) => Json(Ready {
            status: "ready",
            model: serving.model_id.clone(),
            waiting: serving.scheduler.waiting(),
        })
        .into_response(),
        Err(err) => err.into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    summary = "Prometheus metrics",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let handle = state
        .metrics()
        .ok_or_else(|| ApiError::internal("metrics are not enabled in this process"))?;
    if let Some(bytes) = process_memory::resident_bytes() {
        metrics::gauge!(m::PROCESS_RESIDENT_MEMORY_BYTES).set(bytes as f64);
    }
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}
