//! `POST /v1/feedback`: a user's verdict on an answer the server gave.
//!
//! `{completion_id, reward ∈ [−1, 1] | rating: "up" | "down", corrected_answer?, adapter?}`. The
//! item is stored (it survives restarts) and, for an adapter set to train continuously, counts
//! towards its next `reward` job (see `crate::training::feedback`). `GET /v1/feedback?adapter=`
//! lists an adapter's items and the job that used each.

use axum::extract::State;
use axum::Json;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, QueryParams};
use super::mezo_jobs::finetune_job;
use super::protocol::{FeedbackItem, FeedbackReceiptOut, FeedbackRequest, ListPage};
use super::state::AppState;
use super::validate::feedback::valid_feedback;
use super::validate::listing::MAX_PAGE;

#[utoipa::path(
    post,
    path = "/v1/feedback",
    tag = "feedback",
    summary = "Rate an answer the server gave",
    request_body = FeedbackRequest,
    responses(
        (status = 200, description = "The stored item, and the job it started", body = FeedbackReceiptOut),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn post_feedback(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Json<FeedbackReceiptOut>, ApiError> {
    let feedback = valid_feedback(body.parse()?)?;
    let (completion_id, reward) = (feedback.completion_id.clone(), feedback.reward);
    let receipt = state.training(move |t| t.feedback(feedback)).await?;
    Ok(Json(FeedbackReceiptOut {
        id: receipt.id,
        object: "feedback",
        completion_id,
        adapter: receipt.adapter,
        reward,
        pending_feedback: receipt.pending,
        job: receipt.job.as_ref().map(finetune_job),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/feedback",
    tag = "feedback",
    summary = "An adapter's feedback items",
    params(
        ("adapter" = String, Query, description = "The adapter whose items to list"),
    ),
    responses(
        (status = 200, description = "The items", body = ListPage<FeedbackItem>),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn list_feedback(
    State(state): State<AppState>,
    QueryParams(query): QueryParams,
) -> Result<Json<ListPage<FeedbackItem>>, ApiError> {
    let adapter = query
        .get("adapter")
        .cloned()
        .ok_or_else(|| ApiError::invalid("adapter", "give `?adapter=<name>`"))?;
    let items = state
        .training(move |t| t.feedback_items(&adapter, MAX_PAGE))
        .await?;
    let data = items
        .iter()
        .map(|f| FeedbackItem {
            id: f.id.clone(),
            object: "feedback",
            created_at: f.created_at,
            completion_id: f.completion_id.clone(),
            adapter: f.adapter.clone(),
            reward: f.reward,
            corrected_answer: f.corrected_answer.clone(),
            job_id: f.job_id.clone(),
        })
        .collect();
    Ok(Json(ListPage::all(data)))
}
