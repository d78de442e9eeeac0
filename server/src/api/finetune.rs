//! `/v1/finetune`: background MeZO jobs on posted examples.
//!
//! `POST /v1/finetune` answers 202 with the job once it and its examples are stored; the job
//! runs in the engine's background share. `GET /v1/finetune[/{id}]`, `POST …/{id}/cancel`, and
//! `GET …/{id}/events` (JSON pages, or a server-sent event stream with `?stream=true` that ends
//! with `[DONE]` when the job does).

use std::collections::HashMap;

use adapters::LoraConfig;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::training::{Job, JobEvent, JobOrigin, NewJob};

use super::error::ApiError;
use super::extract::ApiJson;
use super::state::AppState;
use super::stream::sse_from_channel;
use super::training_data::{parse_examples, parse_hyperparameters, parse_objective};

/// Default and largest page of a listing.
pub const DEFAULT_PAGE: usize = 20;
pub const MAX_PAGE: usize = 1000;

const FIELDS: &[&str] = &[
    "adapter",
    "objective",
    "examples",
    "eval_examples",
    "eval_fraction",
    "hyperparameters",
    "lora",
    "publish_every",
    "publish_only_if_improved",
];

pub async fn create_job(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Response, ApiError> {
    let serving = state.serving()?;
    let request = body.0.as_object().expect("ApiJson holds an object");
    if let Some(key) = request.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            key.clone(),
            format!(
                "`{key}` is not a field of a fine-tuning job; use {}",
                FIELDS.join(", ")
            ),
        ));
    }
    let adapter = match request.get("adapter") {
        Some(Value::String(name)) => name.clone(),
        _ => {
            return Err(ApiError::invalid(
                "adapter",
                "`adapter` must name the adapter to train (a new name creates it)",
            ))
        }
    };
    let objective = parse_objective(request.get("objective"))?;
    let template = &serving.model.chat_template;
    let mut train = parse_examples(request.get("examples"), "examples", template)?;
    if train.is_empty() {
        return Err(ApiError::invalid(
            "examples",
            "`examples` must hold at least one training example",
        ));
    }
    let mut held_out = parse_examples(request.get("eval_examples"), "eval_examples", template)?;
    let eval_fraction = match request.get("eval_fraction") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_f64().filter(|f| *f > 0.0 && *f < 1.0).ok_or_else(|| {
            ApiError::invalid(
                "eval_fraction",
                "`eval_fraction` must be a number in (0, 1)",
            )
        })?),
    };
    let hyperparameters = parse_hyperparameters(request.get("hyperparameters"), train.len())?;
    if let Some(fraction) = eval_fraction {
        if !held_out.is_empty() {
            return Err(ApiError::invalid(
                "eval_fraction",
                "give `eval_examples` or `eval_fraction`, not both",
            ));
        }
        let count = ((train.len() as f64) * fraction).round() as usize;
        if count == 0 || count >= train.len() {
            return Err(ApiError::invalid(
                "eval_fraction",
                format!(
                    "`eval_fraction` {fraction} of {} examples leaves no held-out or no training examples",
                    train.len()
                ),
            ));
        }
        train.shuffle(&mut ChaCha8Rng::seed_from_u64(hyperparameters.seed));
        held_out = train.split_off(train.len() - count);
    }
    // With a split, the default batch follows the training part.
    let hyperparameters = match request.get("hyperparameters") {
        Some(given) if given.get("batch_size").is_some() => hyperparameters,
        given => parse_hyperparameters(given, train.len())?,
    };
    let lora = match request.get("lora") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let mut lora: LoraConfig = serde_json::from_value(v.clone()).map_err(|e| {
                ApiError::invalid(
                    "lora",
                    format!(
                        "`lora` takes `rank`, `alpha`, `targets`, `use_rslora` and `layers`, \
                         each optional: {e}"
                    ),
                )
            })?;
            // A set of layers, as in PEFT: the order and repeats of the list do not matter.
            lora.layers = lora.layers.map(LoraConfig::normalized_layers);
            Some(lora)
        }
    };
    let publish_every = match request.get("publish_every") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::invalid(
                "publish_every",
                "`publish_every` must be a number of steps ≥ 1",
            )
        })?),
    };
    let publish_only_if_improved = match request.get("publish_only_if_improved") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "publish_only_if_improved",
                "`publish_only_if_improved` must be true or false",
            ))
        }
    };
    let new_job = NewJob {
        adapter,
        objective,
        trainer: hyperparameters,
        lora,
        publish_every,
        publish_only_if_improved,
        train,
        held_out,
        origin: JobOrigin::Finetune,
    };
    let job = state.training(move |t| t.submit(new_job)).await?;
    Ok((StatusCode::ACCEPTED, Json(job_json(&job))).into_response())
}

pub async fn list_jobs(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (after, limit) = page(&query)?;
    let fetched = state
        .training(move |t| t.list_jobs(after.as_deref(), limit + 1))
        .await?;
    let has_more = fetched.len() > limit;
    let data: Vec<Value> = fetched.iter().take(limit).map(job_json).collect();
    Ok(Json(
        json!({ "object": "list", "data": data, "has_more": has_more }),
    ))
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
        let data: Vec<Value> = first.iter().map(event_json).collect();
        return Ok(Json(
            json!({ "object": "list", "data": data, "has_more": data.len() == limit }),
        )
        .into_response());
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

/// `?after=<id>&limit=<n>` of a listing.
pub fn page(query: &HashMap<String, String>) -> Result<(Option<String>, usize), ApiError> {
    let limit = number(query, "limit")?.map_or(DEFAULT_PAGE, |n| n as usize);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid(
            "limit",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    Ok((query.get("after").cloned(), limit))
}

/// A numeric query parameter.
pub fn number(query: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::invalid(name, format!("`{name}` must be a whole number, not {v:?}"))
            })
        })
        .transpose()
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
