//! `/v1/fine_tuning/jobs`: OpenAI's fine-tuning API on the same job engine as `/v1/finetune`.
//!
//! A job trains a new adapter named `ft:<base>:<suffix>:<id>` with the `completion` objective on
//! the chat examples of an uploaded JSONL file (the conversation before the last assistant
//! message is the prompt, that message the completion). OpenAI's `n_epochs`, `batch_size` and
//! `learning_rate_multiplier` map onto MeZO steps: steps = epochs × ⌊examples / batch⌋, and the
//! multiplier scales MeZO's default learning rate. Each epoch's end publishes a version (a
//! checkpoint); once the job succeeds, `fine_tuned_model` is usable as `model` in chat
//! completions.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use plugin::TrainerConfig;
use serde_json::{json, Value};

use crate::training::{Job, JobEvent, JobOrigin, JobStatus};

use super::access::CallerKey;
use super::error::ApiError;
use super::extract::ApiJson;
use super::mezo_jobs::{job_quota, jobs_page};
use super::protocol::ListPage;
use super::state::AppState;
use super::validate::listing::{number, page};
use super::validate::openai_job::ValidOpenAiJob;

pub async fn create_job(
    State(state): State<AppState>,
    caller: Option<Extension<CallerKey>>,
    body: ApiJson,
) -> Result<Json<Value>, ApiError> {
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

pub async fn list_jobs(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ListPage<Value>>, ApiError> {
    let (jobs, has_more) = jobs_page(&state, &query).await?;
    let base = &state.serving()?.model_id;
    let data = jobs.iter().map(|j| openai_job(j, base)).collect();
    Ok(Json(ListPage::page(data, has_more)))
}

pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = state.training(move |t| t.job(&id)).await?;
    Ok(Json(openai_job(&job, &state.serving()?.model_id)))
}

pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = state.training(move |t| t.cancel(&id)).await?;
    Ok(Json(openai_job(&job, &state.serving()?.model_id)))
}

/// Newest first, paged with `?after=<event id>&limit=<n>` as OpenAI does.
pub async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ListPage<Value>>, ApiError> {
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
pub async fn job_checkpoints(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ListPage<Value>>, ApiError> {
    let limit = number(&query, "limit")?.map_or(10, |n| n as usize);
    let job_id = id.clone();
    let (job, versions) = state
        .training(move |t| {
            let job = t.job(&job_id)?;
            let versions = t.versions(&job.spec.adapter)?;
            Ok((job, versions))
        })
        .await?;
    let mut data: Vec<Value> = versions
        .iter()
        .filter(|v| v.job_id.as_deref() == Some(id.as_str()))
        .map(|v| {
            let mut metrics = json!({ "step": v.step });
            if let Some(held_out) = &v.held_out {
                metrics["valid_loss"] = json!(held_out.evaluation.loss);
            }
            json!({
                "object": "fine_tuning.job.checkpoint",
                "id": format!("ftckpt-{}-v{}", id, v.version),
                "created_at": v.created_at,
                "fine_tuned_model_checkpoint": format!("{}@{}", job.spec.adapter, v.version),
                "fine_tuning_job_id": id,
                "step_number": v.step,
                "metrics": metrics,
            })
        })
        .collect();
    data.reverse();
    data.truncate(limit);
    Ok(Json(ListPage::all(data)))
}

/// A job in OpenAI's `fine_tuning.job` shape.
fn openai_job(job: &Job, base_model: &str) -> Value {
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
    json!({
        "object": "fine_tuning.job",
        "id": job.id,
        "model": base_model,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "fine_tuned_model": (job.status == JobStatus::Succeeded).then(|| spec.adapter.clone()),
        "organization_id": "mezo-serve",
        "result_files": [],
        "status": job.status.as_str(),
        "training_file": training_file,
        "validation_file": validation_file,
        "hyperparameters": {
            "n_epochs": spec.trainer.max_steps.div_ceil(steps_per_epoch),
            "batch_size": spec.trainer.batch_size,
            "learning_rate_multiplier": spec.trainer.lr / TrainerConfig::default().lr,
        },
        "trained_tokens": null,
        "error": job.error.as_ref().map(|message| json!({ "code": "job_failed", "message": message, "param": null })),
        "seed": spec.trainer.seed,
        "estimated_finish": null,
        "integrations": [],
        "user_provided_suffix": suffix,
        "method": { "type": "supervised" },
    })
}

fn openai_event(job_id: &str, event: &JobEvent) -> Value {
    let is_step = event.kind == crate::training::job::EventKind::Step;
    json!({
        "object": "fine_tuning.job.event",
        "id": format!("ftevent-{}-{job_id}", event.seq),
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "data": event.data,
        "type": if is_step { "metrics" } else { "message" },
    })
}
