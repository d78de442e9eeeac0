//! Probes and metrics: `GET /health` (the process answers), `GET /ready` (the model is loaded
//! and requests can be served), `GET /metrics` (Prometheus text format).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::metrics as m;
use crate::process_memory;

use super::error::ApiError;
use super::state::AppState;

pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): State<AppState>) -> Response {
    match state.serving() {
        Ok(serving) => Json(json!({
            "status": "ready",
            "model": serving.model_id,
            "waiting": serving.scheduler.waiting(),
        }))
        .into_response(),
        Err(err) => err.into_response(),
    }
}

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
