//! `/v1/finetune`: this server's own API for background MeZO jobs on posted examples (OpenAI's
//! fine-tuning API on the same jobs is [`super::openai_jobs`]).
//!
//! `POST /v1/finetune` answers 202 with the job once it and its examples are stored; the job
//! runs in the engine's background share. `GET /v1/finetune[/{id}]`, `POST …/{id}/cancel`, and
//! `GET …/{id}/events` (JSON pages, or a server-sent event stream with `?stream=true` that ends
//! with `[DONE]` when the job does).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use crate::training::{Job, JobEvent, JobQuota};

use super::access::CallerKey;
use super::error::ApiError;
use super::extract::ApiJson;
use super::protocol::ListPage;
use super::state::AppState;
use super::stream::sse_from_channel;
use super::validate::listing::{number, page, MAX_PAGE};
use super::validate::mezo_job::new_job;

pub async fn create_job(
    State(state): State<AppState>,
    caller: Option<Extension<CallerKey>>,
    body: ApiJson,
) -> Result<Response, ApiError> {
    let serving = state.serving()?;
    let mut new_job = new_job(body.parse()?, serving.model.chat_template().ok())?;
    new_job.quota = job_quota(caller);
    let job = state.training(move |t| t.submit(new_job)).await?;
    Ok((StatusCode::ACCEPTED, Json(job_json(&job))).into_response())
}

pub async fn list_jobs(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ListPage<Value>>, ApiError> {
    let (jobs, has_more) = jobs_page(&state, &query).await?;
    Ok(Json(ListPage::page(
        jobs.iter().map(job_json).collect(),
        has_more,
    )))
}

/// The page of jobs (newest first) that `?after=<id>&limit=<n>` asks for, and whether more
/// follow; both job APIs list the same jobs.
pub(super) async fn jobs_page(
    state: &AppState,
    query: &HashMap<String, String>,
) -> Result<(Vec<Job>, bool), ApiError> {
    let (after, limit) = page(query)?;
    let mut jobs = state
        .training(move |t| t.list_jobs(after.as_deref(), limit + 1))
        .await?;
    let has_more = jobs.len() > limit;
    jobs.truncate(limit);
    Ok((jobs, has_more))
}

pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = state.training(move |t| t.job(&id)).await?;
    Ok(Json(job_json(&job)))
}

pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = state.training(move |t| t.cancel(&id)).await?;
    Ok(Json(job_json(&job)))
}

/// Events after `?after=<seq>`, oldest first; `?stream=true` keeps the connection open and
/// sends each new event as it happens, then `[DONE]` once the job has ended.
pub async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let after = number(&query, "after")?.unwrap_or(0);
    let limit = number(&query, "limit")?.map_or(MAX_PAGE, |n| (n as usize).min(MAX_PAGE));
    let streaming = matches!(query.get("stream").map(String::as_str), Some("true" | "1"));
    // A stream watches from before the first read, so that no event falls between a read and
    // a wait.
    let watch = if streaming {
        Some(state.serving()?.training.watch_events())
    } else {
        None
    };
    let first = {
        let id = id.clone();
        state.training(move |t| t.events(&id, after, limit)).await?
    };
    let Some(mut watch) = watch else {
        let has_more = first.len() == limit;
        let data = first.iter().map(event_json).collect();
        return Ok(Json(ListPage::page(data, has_more)).into_response());
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let mut after = after;
        let mut batch = first;
        loop {
            for event in &batch {
                after = event.seq;
                if tx.send(event_json(event).to_string()).await.is_err() {
                    return;
                }
            }
            let ended = {
                let id = id.clone();
                state.training(move |t| t.job(&id)).await
            }
            .map_or(true, |job| job.status.is_finished());
            let next = {
                let id = id.clone();
                state
                    .training(move |t| t.events(&id, after, MAX_PAGE))
                    .await
            };
            batch = next.unwrap_or_default();
            // Finished, and every event written before the end has been sent.
            if ended && batch.is_empty() {
                let _ = tx.send("[DONE]".into()).await;
                return;
            }
            if batch.is_empty() {
                tokio::select! {
                    alive = watch.changed(&id) => if !alive { return },
                    // The client left: no task lingers until the job's next event.
                    () = tx.closed() => return,
                }
            }
        }
    });
    Ok(sse_from_channel(rx))
}

/// A job in `/v1/finetune`'s shape.
pub fn job_json(job: &Job) -> Value {
    let spec = &job.spec;
    json!({
        "id": job.id,
        "object": "finetune.job",
        "adapter": spec.adapter,
        "objective": spec.objective,
        "status": job.status.as_str(),
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error.as_ref().map(|message| json!({ "message": message })),
        "hyperparameters": shortest_floats(&spec.trainer),
        "lora": spec.lora,
        "base_version": spec.base_version,
        "publish_every": spec.publish_every,
        "publish_only_if_improved": spec.publish_only_if_improved,
        "examples": { "train": job.train_examples, "held_out": job.held_out_examples },
        "progress": {
            "steps_done": job.progress.steps_done,
            "max_steps": spec.trainer.max_steps,
            "train_loss": job.progress.train_loss,
            "held_out": job.progress.held_out,
            "held_out_before": job.progress.held_out_before,
            "published_versions": job.progress.published_versions,
        },
        "origin": spec.origin,
    })
}

pub fn event_json(event: &JobEvent) -> Value {
    json!({
        "seq": event.seq,
        "created_at": event.created_at,
        "level": event.level,
        "type": event.kind,
        "message": event.message,
        "data": event.data,
    })
}

/// `value` as JSON with each `f32` written as its shortest form (`0.001`, not the
/// `0.0010000000474974513` of its exact value widened to `f64`).
pub fn shortest_floats<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_string(value)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null)
}

/// The quota a job submitted with the caller's key runs under (none without keys).
pub(super) fn job_quota(caller: Option<Extension<CallerKey>>) -> Option<JobQuota> {
    caller.map(|Extension(key)| JobQuota {
        owner: key.name,
        max_unfinished: key.max_queued_jobs,
    })
}
