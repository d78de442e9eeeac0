//! `POST /v1/feedback`: a user's verdict on an answer the server gave.
//!
//! `{completion_id, reward ∈ [−1, 1] | rating: "up" | "down", corrected_answer?, adapter?}`. The
//! item is stored (it survives restarts) and, for an adapter set to train continuously, counts
//! towards its next `reward` job (see `crate::training::feedback`). `GET /v1/feedback?adapter=`
//! lists an adapter's items and the job that used each.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::ApiJson;
use super::mezo_jobs::{job_json, shortest_floats};
use super::protocol::ListPage;
use super::state::AppState;
use super::validate::feedback::valid_feedback;
use super::validate::listing::MAX_PAGE;

pub async fn post_feedback(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Json<Value>, ApiError> {
    let feedback = valid_feedback(body.parse()?)?;
    let (completion_id, reward) = (feedback.completion_id.clone(), feedback.reward);
    let receipt = state.training(move |t| t.feedback(feedback)).await?;
    Ok(Json(json!({
        "id": receipt.id,
        "object": "feedback",
        "completion_id": completion_id,
        "adapter": receipt.adapter,
        "reward": shortest_floats(&reward),
        "pending_feedback": receipt.pending,
        "job": receipt.job.as_ref().map(job_json),
    })))
}

pub async fn list_feedback(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ListPage<Value>>, ApiError> {
    let adapter = query
        .get("adapter")
        .cloned()
        .ok_or_else(|| ApiError::invalid("adapter", "give `?adapter=<name>`"))?;
    let items = state
        .training(move |t| t.feedback_items(&adapter, MAX_PAGE))
        .await?;
    let data = items
        .iter()
        .map(|f| {
            json!({
                "id": f.id,
                "object": "feedback",
                "created_at": f.created_at,
                "completion_id": f.completion_id,
                "adapter": f.adapter,
                "reward": shortest_floats(&f.reward),
                "corrected_answer": f.corrected_answer,
                "job_id": f.job_id,
            })
        })
        .collect();
    Ok(Json(ListPage::all(data)))
}
