//! `POST /v1/feedback`: a user's verdict on an answer the server gave.
//!
//! `{completion_id, reward ∈ [−1, 1] | rating: "up" | "down", corrected_answer?, adapter?}`. The
//! item is stored (it survives restarts) and, for an adapter set to train continuously, counts
//! towards its next `reward` job (see `crate::training::feedback`). `GET /v1/feedback?adapter=`
//! lists an adapter's items and the job that used each.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::training::feedback::Feedback;

use super::error::ApiError;
use super::extract::ApiJson;
use super::finetune::{job_json, shortest_floats, MAX_PAGE};
use super::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackRequest {
    completion_id: String,
    reward: Option<f32>,
    rating: Option<String>,
    corrected_answer: Option<String>,
    adapter: Option<String>,
}

pub async fn post_feedback(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Json<Value>, ApiError> {
    let request: FeedbackRequest = body.parse()?;
    let (reward, kind) = match (request.reward, request.rating.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "rating",
                "give `reward` or `rating`, not both",
            ))
        }
        (Some(r), None) if r.is_finite() && (-1.0..=1.0).contains(&r) => (r, "reward"),
        (Some(r), None) => {
            return Err(ApiError::invalid(
                "reward",
                format!("`reward` must be in [-1, 1] (given {r})"),
            ))
        }
        (None, Some("up")) => (1.0, "up"),
        (None, Some("down")) => (-1.0, "down"),
        (None, Some(other)) => {
            return Err(ApiError::invalid(
                "rating",
                format!("`rating` must be \"up\" or \"down\" (given {other:?})"),
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "reward",
                "give `reward` (a number in [-1, 1]) or `rating` (\"up\" or \"down\")",
            ))
        }
    };
    let feedback = Feedback {
        completion_id: request.completion_id.clone(),
        reward,
        corrected_answer: request.corrected_answer,
        adapter: request.adapter,
        kind,
    };
    let receipt = state.training(move |t| t.feedback(feedback)).await?;
    Ok(Json(json!({
        "id": receipt.id,
        "object": "feedback",
        "completion_id": request.completion_id,
        "adapter": receipt.adapter,
        "reward": shortest_floats(&reward),
        "pending_feedback": receipt.pending,
        "job": receipt.job.as_ref().map(job_json),
    })))
}

pub async fn list_feedback(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let adapter = query
        .get("adapter")
        .cloned()
        .ok_or_else(|| ApiError::invalid("adapter", "give `?adapter=<name>`"))?;
    let items = state
        .training(move |t| t.feedback_items(&adapter, MAX_PAGE))
        .await?;
    let data: Vec<Value> = items
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
    Ok(Json(json!({ "object": "list", "data": data })))
}
