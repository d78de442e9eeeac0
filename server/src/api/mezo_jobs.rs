//! `/v1/finetune`: this server's own API for background MeZO jobs on posted examples (OpenAI's
//! fine-tuning API on the same jobs is [`super::openai_jobs`]).
//!
//! `POST /v1/finetune` answers 202 with the job once it and its examples are stored; the job
//! runs in the engine's background share. `GET /v1/finetune[/{id}]`, `POST …/{id}/cancel`, and
//! `GET …/{id}/events` (JSON pages, or a server-sent event stream with `?stream=true` that ends
//! with `[DONE]` when the job does), `GET …/{id}/curves.svg` (its learning curves, drawn).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::Value;

use crate::learning_curves;
use crate::training::{Job, JobEvent, JobQuota};

use super::access::CallerKey;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, PathParam, QueryParams};
use super::openapi::ServerSentEvent;
use super::protocol::{
    ExampleCounts, FinetuneJob, FinetuneRequest, JobEventOut, JobFailure, JobProgress, ListPage,
};
use super::state::AppState;
use super::stream::sse_from_channel;
use super::validate::listing::{flag, limit, number, page, MAX_PAGE};
use super::validate::mezo_job::new_job;

#[utoipa::path(
    post,
    path = "/v1/finetune",
    tag = "fine-tuning",
    summary = "Queue a MeZO job",
    request_body = FinetuneRequest,
    responses(
        (status = 202, description = "The job, stored and queued", body = FinetuneJob),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn create_job(
    State(state): State<AppState>,
    caller: Option<Extension<CallerKey>>,
    body: ApiJson,
) -> Result<Response, ApiError> {
    let serving = state.serving()?;
    let mut new_job = new_job(body.parse()?, serving.model.chat_template().ok())?;
    new_job.quota = job_quota(caller);
    let job = state.training(move |t| t.submit(new_job)).await?;
    Ok((StatusCode::ACCEPTED, Json(finetune_job(&job))).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/finetune",
    tag = "fine-tuning",
    summary = "Jobs, newest first",
    params(
        ("after" = Option<String>, Query, description = "List the jobs after this job id"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "At most this many (1000 at most)"),
    ),
    responses(
        (status = 200, description = "A page of jobs", body = ListPage<FinetuneJob>),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn list_jobs(
    State(state): State<AppState>,
    QueryParams(query): QueryParams,
) -> Result<Json<ListPage<FinetuneJob>>, ApiError> {
    let (jobs, has_more) = jobs_page(&state, &query).await?;
    Ok(Json(ListPage::page(
        jobs.iter().map(finetune_job).collect(),
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

#[utoipa::path(
    get,
    path = "/v1/finetune/{id}",
    tag = "fine-tuning",
    summary = "One job with its progress",
    params(
        ("id" = String, Path, description = "The job id"),
    ),
    responses(
        (status = 200, description = "The job", body = FinetuneJob),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn get_job(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<FinetuneJob>, ApiError> {
    let job = state.training(move |t| t.job(&id)).await?;
    Ok(Json(finetune_job(&job)))
}

#[utoipa::path(
    post,
    path = "/v1/finetune/{id}/cancel",
    tag = "fine-tuning",
    summary = "Cancel a job (409 once finished)",
    params(
        ("id" = String, Path, description = "The job id"),
    ),
    responses(
        (status = 200, description = "The cancelled job", body = FinetuneJob),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<FinetuneJob>, ApiError> {
    let job = state.training(move |t| t.cancel(&id)).await?;
    Ok(Json(finetune_job(&job)))
}

/// Events after `?after=<seq>`, oldest first; `?stream=true` keeps the connection open and
/// sends each new event as it happens, then `[DONE]` once the job has ended.
#[utoipa::path(
    get,
    path = "/v1/finetune/{id}/events",
    tag = "fine-tuning",
    summary = "A job's events, oldest first, or as a stream",
    params(
        ("id" = String, Path, description = "The job id"),
        ("after" = Option<u64>, Query, description = "Events after this sequence number"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "At most this many (1000 at most)"),
        ("stream" = Option<bool>, Query, description = "Stream the events as they happen"),
    ),
    responses(
        (status = 200, description = "A page of events, or with `stream=true` server-sent events ending with `[DONE]` when the job ends", content((ListPage<JobEventOut> = "application/json"), (ServerSentEvent = "text/event-stream"))),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn job_events(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams,
) -> Result<Response, ApiError> {
    let after = number(&query, "after")?.unwrap_or(0);
    let limit = limit(&query, MAX_PAGE)?;
    let streaming = flag(&query, "stream")?;
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
        let data = first.iter().map(job_event).collect();
        return Ok(Json(ListPage::page(data, has_more)).into_response());
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let mut after = after;
        let mut batch = first;
        loop {
            for event in &batch {
                after = event.seq;
                let text = serde_json::to_string(&job_event(event)).unwrap_or_default();
                if tx.send(text).await.is_err() {
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

/// Events read for a job's curves: a long job's every step, with room to spare.
const MAX_CURVE_EVENTS: usize = 1_000_000;

/// The job's learning curves (training loss per step; held-out loss and metrics per
/// evaluation) as an SVG chart with axes, tick labels and a legend.
#[utoipa::path(
    get,
    path = "/v1/finetune/{id}/curves.svg",
    tag = "fine-tuning",
    summary = "A job's learning curves as an SVG chart",
    params(
        ("id" = String, Path, description = "The job id"),
    ),
    responses(
        (status = 200, description = "The curves, as far as the job has got", content_type = "image/svg+xml", body = String),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn job_curves(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let (job, events) = state
        .training(move |t| {
            let job = t.job(&id)?;
            let events = t.events(&id, 0, MAX_CURVE_EVENTS)?;
            Ok((job, events))
        })
        .await?;
    let svg = learning_curves::render_svg(&learning_curves::job_charts(&job.id, &events));
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

/// A job in `/v1/finetune`'s shape.
pub fn finetune_job(job: &Job) -> FinetuneJob {
    let spec = &job.spec;
    FinetuneJob {
        id: job.id.clone(),
        object: "finetune.job",
        adapter: spec.adapter.clone(),
        objective: shortest_floats(&spec.objective),
        status: job.status,
        created_at: job.created_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
        error: job.error.as_ref().map(|message| JobFailure {
            message: message.clone(),
        }),
        hyperparameters: shortest_floats(&spec.trainer),
        lora: shortest_floats(&spec.lora),
        base_version: spec.base_version,
        publish_every: spec.publish_every,
        publish_only_if_improved: spec.publish_only_if_improved,
        examples: ExampleCounts {
            train: job.train_examples,
            held_out: job.held_out_examples,
        },
        progress: JobProgress {
            steps_done: job.progress.steps_done,
            max_steps: spec.trainer.max_steps,
            train_loss: job.progress.train_loss,
            held_out: job.progress.held_out.as_ref().map(shortest_floats),
            held_out_before: job.progress.held_out_before.as_ref().map(shortest_floats),
            published_versions: job.progress.published_versions.clone(),
        },
        origin: shortest_floats(&spec.origin),
    }
}

pub fn job_event(event: &JobEvent) -> JobEventOut {
    JobEventOut {
        seq: event.seq,
        created_at: event.created_at,
        level: event.level,
        kind: event.kind,
        message: event.message.clone(),
        data: event.data.clone(),
    }
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
