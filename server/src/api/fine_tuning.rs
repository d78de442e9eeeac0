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
use axum::Json;
use plugin::{ObjectiveKind, TrainerConfig, TrainingExample};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::chat_template::ChatTemplate;
use crate::training::{Job, JobEvent, JobOrigin, JobStatus, NewJob, TrainingError};

use super::error::ApiError;
use super::extract::ApiJson;
use super::finetune::{number, page};
use super::state::AppState;
use super::training_data::parse_example;

/// OpenAI's default number of epochs when `n_epochs` is `auto`.
const AUTO_EPOCHS: u64 = 3;

#[derive(Deserialize)]
struct CreateJob {
    model: String,
    training_file: String,
    validation_file: Option<String>,
    suffix: Option<String>,
    #[serde(default)]
    hyperparameters: OpenAiHyperparameters,
    seed: Option<u64>,
    method: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OpenAiHyperparameters {
    n_epochs: Option<AutoOr<u64>>,
    batch_size: Option<AutoOr<usize>>,
    learning_rate_multiplier: Option<AutoOr<f32>>,
}

/// `"auto"` or a value.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum AutoOr<T> {
    Value(T),
    Auto(Auto),
}

#[derive(Deserialize, Clone, Copy)]
enum Auto {
    #[serde(rename = "auto")]
    Auto,
}

impl<T: Copy> AutoOr<T> {
    fn value(this: Option<Self>) -> Option<T> {
        match this {
            Some(AutoOr::Value(v)) => Some(v),
            Some(AutoOr::Auto(Auto::Auto)) | None => None,
        }
    }
}

pub async fn create_job(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Json<Value>, ApiError> {
    let request: CreateJob = body.parse()?;
    let serving = state.serving()?;
    if request.model != serving.model_id {
        return Err(ApiError::model_not_found(format!(
            "`{}` cannot be fine-tuned here; use the base model `{}`",
            request.model, serving.model_id
        )));
    }
    if let Some(method) = &request.method {
        let kind = method.get("type").and_then(Value::as_str);
        if kind.is_some_and(|k| k != "supervised") {
            return Err(ApiError::unsupported(
                "method.type",
                "only `supervised` fine-tuning is implemented (with MeZO)",
            ));
        }
    }
    let suffix = request.suffix.clone().unwrap_or_else(|| "mezo".into());
    if suffix.is_empty()
        || suffix.len() > 64
        || !suffix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` must be 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    let tag: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(8)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect();
    let adapter = format!("ft:{}:{suffix}:{tag}", serving.model_id);
    let template = serving.model.chat_template.clone();
    let hyper = request.hyperparameters;
    let origin = JobOrigin::OpenAi {
        training_file: request.training_file.clone(),
        validation_file: request.validation_file.clone(),
        suffix: request.suffix.clone(),
    };
    let (training_file, validation_file, seed) =
        (request.training_file, request.validation_file, request.seed);
    let job = state
        .training(move |t| {
            let train = read_examples(t, &training_file, "training_file", &template)?;
            let held_out = match &validation_file {
                Some(id) => read_examples(t, id, "validation_file", &template)?,
                None => Vec::new(),
            };
            let batch_size = AutoOr::value(hyper.batch_size)
                .unwrap_or_else(|| train.len().min(TrainerConfig::default().batch_size));
            if batch_size == 0 || batch_size > train.len() {
                return Err(TrainingError::Invalid {
                    param: "hyperparameters.batch_size".into(),
                    message: format!(
                        "`batch_size` must be between 1 and the {} training examples",
                        train.len()
                    ),
                });
            }
            let epochs = AutoOr::value(hyper.n_epochs).unwrap_or(AUTO_EPOCHS);
            let multiplier = AutoOr::value(hyper.learning_rate_multiplier).unwrap_or(1.0);
            let steps_per_epoch = (train.len() / batch_size) as u64;
            let trainer = TrainerConfig {
                lr: TrainerConfig::default().lr * multiplier,
                batch_size,
                max_steps: epochs.saturating_mul(steps_per_epoch),
                seed: seed.unwrap_or(0),
                eval_every: steps_per_epoch.max(1),
                ..TrainerConfig::default()
            };
            let job = t.submit(NewJob {
                adapter,
                objective: ObjectiveKind::Completion,
                trainer,
                lora: None,
                publish_every: (epochs > 1).then_some(steps_per_epoch),
                publish_only_if_improved: false,
                train,
                held_out,
                origin,
            })?;
            Ok(job)
        })
        .await
        .map_err(openai_params)?;
    Ok(Json(openai_job(&job, &state.serving()?.model_id)))
}

/// OpenAI names the hyperparameters without our `hyperparameters.` prefix for its own ones
/// only; ours (`max_steps` from `n_epochs`) are reported as `hyperparameters.n_epochs`.
fn openai_params(mut err: ApiError) -> ApiError {
    if err.param.as_deref() == Some("hyperparameters.max_steps") {
        err.param = Some("hyperparameters.n_epochs".into());
    }
    err
}

/// The chat examples of an uploaded file; errors name the file field and the line.
fn read_examples(
    training: &crate::training::Training,
    id: &str,
    field: &str,
    template: &ChatTemplate,
) -> Result<Vec<TrainingExample>, TrainingError> {
    let content = training.file_content(id).map_err(|e| match e {
        TrainingError::NotFound { .. } => TrainingError::Invalid {
            param: field.into(),
            message: format!(
                "`{field}` {id:?} is not an uploaded file; upload it with POST /v1/files"
            ),
        },
        other => other,
    })?;
    let text = String::from_utf8_lossy(&content);
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let invalid = |message: String| TrainingError::Invalid {
            param: field.into(),
            message: format!("{field} line {}: {message}", i + 1),
        };
        let value: Value = serde_json::from_str(line).map_err(|e| invalid(e.to_string()))?;
        let messages = json!({ "messages": value.get("messages").cloned().unwrap_or(Value::Null) });
        let example = parse_example(&messages, &format!("line {}", i + 1), template)
            .map_err(|e| invalid(e.message))?;
        examples.push(example);
    }
    Ok(examples)
}

pub async fn list_jobs(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (after, limit) = page(&query)?;
    let jobs = state
        .training(move |t| t.list_jobs(after.as_deref(), limit + 1))
        .await?;
    let has_more = jobs.len() > limit;
    let base = &state.serving()?.model_id;
    let data: Vec<Value> = jobs
        .iter()
        .take(limit)
        .map(|j| openai_job(j, base))
        .collect();
    Ok(Json(
        json!({ "object": "list", "data": data, "has_more": has_more }),
    ))
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
) -> Result<Json<Value>, ApiError> {
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
    let data: Vec<Value> = events
        .iter()
        .take(limit)
        .map(|e| openai_event(&id, e))
        .collect();
    Ok(Json(
        json!({ "object": "list", "data": data, "has_more": has_more }),
    ))
}

/// The versions a job published, newest first.
pub async fn job_checkpoints(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(
        json!({ "object": "list", "data": data, "has_more": false }),
    ))
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
