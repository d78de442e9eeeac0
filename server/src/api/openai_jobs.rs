//! `/v1/fine_tuning/jobs`: OpenAI's fine-tuning API on the same job engine as `/v1/finetune`.
//!
//! A job trains a new adapter named `ft:<base>:<suffix>:<id>` with the `completion` objective on
//! the chat examples of an uploaded JSONL file (the conversation before the last assistant
//! message is the prompt, that message the completion). OpenAI's `n_epochs`, `batch_size` and
//! `learning_rate_multiplier` map onto MeZO steps: steps = epochs × ⌊examples / batch⌋, and the
//! multiplier scales MeZO's default learning rate. Each epoch's end publishes a version (a
//! checkpoint); once the job succeeds, `fine_tuned_model` is usable as `model` in chat
//! completions.

use axum::extract::State;
use axum::{Extension, Json};
use plugin::TrainerConfig;

use crate::training::{Job, JobEvent, JobOrigin, JobStatus};

use super::access::CallerKey;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, PathParam, QueryParams};
use super::mezo_jobs::{job_quota, jobs_page};
use super::protocol::{
    CheckpointMetrics, ListPage, OpenAiCheckpoint, OpenAiJob, OpenAiJobError, OpenAiJobEvent,
    OpenAiJobHyperparameters, OpenAiJobRequest,
};
use super::state::AppState;
use super::validate::listing::{limit, page};
use super::validate::openai_job::ValidOpenAiJob;

#[utoipa::path(
    post,
    path = "/v1/fine_tuning/jobs",
    tag = "openai-fine-tuning",
    summary = "Create a fine-tuning job (OpenAI's API)",
    request_body = OpenAiJobRequest,
    responses(
        (status = 200, description = "The job", body = OpenAiJob),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn create_job(
    State(state): State<AppState>,
    caller: Option<Extension<CallerKey>>,
    body: ApiJson,
) -> Result<Json<OpenAiJob>, ApiError> {
    let serving = state.serving()?;
    let request = ValidOpenAiJob::new(body.parse()?, serving)?;
    let template = serving.model.chat_template().ok().cloned();
    let quota = job_quota(caller);
    let job = state
        .training(move |t| {
            let mut new_job = request.new_job(t, template.as_ref())?;
            new_job.quota = quota;
            t.submit(new_job)
        })
        .await
        .map_err(ValidOpenAiJob::openai_params)?;
    Ok(Json(openai_job(&job, &serving.model_id)))
}

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs",
    tag = "openai-fine-tuning",
    summary = "Jobs, newest first",
    params(
        ("after" = Option<String>, Query, description = "List the jobs after this job id"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "At most this many (1000 at most)"),
    ),
    responses(
        (status = 200, description = "A page of jobs", body = ListPage<OpenAiJob>),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn list_jobs(
    State(state): State<AppState>,
    QueryParams(query): QueryParams,
) -> Result<Json<ListPage<OpenAiJob>>, ApiError> {
    let (jobs, has_more) = jobs_page(&state, &query).await?;
    let base = &state.serving()?.model_id;
    let data = jobs.iter().map(|j| openai_job(j, base)).collect();
    Ok(Json(ListPage::page(data, has_more)))
}

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs/{id}",
    tag = "openai-fine-tuning",
    summary = "One job",
    params(
        ("id" = String, Path, description = "The job id"),
    ),
    responses(
        (status = 200, description = "The job", body = OpenAiJob),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn get_job(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<OpenAiJob>, ApiError> {
    let job = state.training(move |t| t.job(&id)).await?;
    Ok(Json(openai_job(&job, &state.serving()?.model_id)))
}

#[utoipa::path(
    post,
    path = "/v1/fine_tuning/jobs/{id}/cancel",
    tag = "openai-fine-tuning",
    summary = "Cancel a job",
    params(
        ("id" = String, Path, description = "The job id"),
    ),
    responses(
        (status = 200, description = "The cancelled job", body = OpenAiJob),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<OpenAiJob>, ApiError> {
    let job = state.training(move |t| t.cancel(&id)).await?;
    Ok(Json(openai_job(&job, &state.serving()?.model_id)))
}

/// Newest first, paged with `?after=<event id>&limit=<n>` as OpenAI does.
#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs/{id}/events",
    tag = "openai-fine-tuning",
    summary = "A job's events, newest first",
    params(
        ("id" = String, Path, description = "The job id"),
        ("after" = Option<String>, Query, description = "Events before this event id"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "At most this many (1000 at most)"),
    ),
    responses(
        (status = 200, description = "A page of events", body = ListPage<OpenAiJobEvent>),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn job_events(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams,
) -> Result<Json<ListPage<OpenAiJobEvent>>, ApiError> {
    let (after, limit) = page(&query)?;
    let before = after
        .map(|event| {
            event
                .strip_prefix("ftevent-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|seq| seq.parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid("after", format!("`after` {event:?} is not an event id"))
                })
        })
        .transpose()?;
    let job_id = id.clone();
    let events = state
        .training(move |t| t.events_newest_first(&job_id, before, limit + 1))
        .await?;
    let has_more = events.len() > limit;
    let data = events
        .iter()
        .take(limit)
        .map(|e| openai_event(&id, e))
        .collect();
    Ok(Json(ListPage::page(data, has_more)))
}

/// The versions a job published, newest first.
#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs/{id}/checkpoints",
    tag = "openai-fine-tuning",
    summary = "The versions a job published, newest first",
    params(
        ("id" = String, Path, description = "The job id"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "At most this many (default 10)"),
    ),
    responses(
        (status = 200, description = "The checkpoints", body = ListPage<OpenAiCheckpoint>),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn job_checkpoints(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams,
) -> Result<Json<ListPage<OpenAiCheckpoint>>, ApiError> {
    let limit = limit(&query, 10)?;
    let job_id = id.clone();
    let (job, versions) = state
        .training(move |t| {
            let job = t.job(&job_id)?;
            let versions = t.versions(&job.spec.adapter)?;
            Ok((job, versions))
        })
        .await?;
    let mut data: Vec<OpenAiCheckpoint> = versions
        .iter()
        .filter(|v| v.job_id.as_deref() == Some(id.as_str()))
        .map(|v| OpenAiCheckpoint {
            object: "fine_tuning.job.checkpoint",
            id: format!("ftckpt-{}-v{}", id, v.version),
            created_at: v.created_at,
            fine_tuned_model_checkpoint: format!("{}@{}", job.spec.adapter, v.version),
            fine_tuning_job_id: id.clone(),
            step_number: v.step,
            metrics: CheckpointMetrics {
                step: v.step,
                valid_loss: v.held_out.as_ref().map(|h| h.evaluation.loss),
            },
        })
        .collect();
    data.reverse();
    data.truncate(limit);
    Ok(Json(ListPage::all(data)))
}

/// A job in OpenAI's `fine_tuning.job` shape.
fn openai_job(job: &Job, base_model: &str) -> OpenAiJob {
    let spec = &job.spec;
    let (training_file, validation_file, suffix) = match &spec.origin {
        JobOrigin::OpenAi {
            training_file,
            validation_file,
            suffix,
        } => (
            Some(training_file.clone()),
            validation_file.clone(),
            suffix.clone(),
        ),
        _ => (None, None, None),
    };
    let batch = spec.trainer.batch_size as u64;
    let steps_per_epoch = (job.train_examples as u64 / batch.max(1)).max(1);
    OpenAiJob {
        object: "fine_tuning.job",
        id: job.id.clone(),
        model: base_model.to_string(),
        created_at: job.created_at,
        finished_at: job.finished_at,
        fine_tuned_model: (job.status == JobStatus::Succeeded).then(|| spec.adapter.clone()),
        organization_id: "mezo-serve",
        result_files: Vec::new(),
        status: job.status,
        training_file,
        validation_file,
        hyperparameters: OpenAiJobHyperparameters {
            n_epochs: spec.trainer.max_steps.div_ceil(steps_per_epoch),
            batch_size: spec.trainer.batch_size,
            learning_rate_multiplier: spec.trainer.lr / TrainerConfig::default().lr,
        },
        trained_tokens: None,
        error: job.error.as_ref().map(|message| OpenAiJobError {
            code: "job_failed",
            message: message.clone(),
            param: None,
        }),
        seed: spec.trainer.seed,
        estimated_finish: None,
        integrations: Vec::new(),
        user_provided_suffix: suffix,
        method: serde_json::json!({ "type": "supervised" }),
    }
}

fn openai_event(job_id: &str, event: &JobEvent) -> OpenAiJobEvent {
    let is_step = event.kind == crate::training::job::EventKind::Step;
    OpenAiJobEvent {
        object: "fine_tuning.job.event",
        id: format!("ftevent-{}-{job_id}", event.seq),
        created_at: event.created_at,
        level: event.level,
        message: event.message.clone(),
        data: event.data.clone(),
        kind: if is_step { "metrics" } else { "message" },
    }
}
