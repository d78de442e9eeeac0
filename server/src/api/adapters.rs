//! `/v1/adapters`: the adapter versions being served, and their management.
//!
//! `GET /v1/adapters[/{name}]` lists each adapter's versions (with the held-out metrics they
//! were published with and which one is live); `POST /v1/adapters/{name}/rollback {version}`
//! makes an older version live again (and stays so across restarts);
//! `DELETE /v1/adapters/{name}` cancels its jobs (an adapter exists from its first job on),
//! stops serving it and deletes its folder;
//! `PUT /v1/adapters/{name}/continuous_training {feedback_every, steps}` makes it train on its
//! feedback (`feedback_every: null` stops it). vLLM's `POST /v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter`, which RL frameworks call, load a PEFT folder trained elsewhere as a
//! new version and stop serving one.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use crate::training::{Training, TrainingError};

use super::error::ApiError;
use super::extract::ApiJson;
use super::protocol::{ContinuousTrainingRequest, ListPage, RollbackRequest, UnloadLoraRequest};
use super::state::AppState;
use super::validate::runtime_lora::ValidLoraLoad;

/// Steps of a continuous-training job when the request does not say.
const DEFAULT_FEEDBACK_STEPS: u64 = 50;

pub async fn list_adapters(
    State(state): State<AppState>,
) -> Result<Json<ListPage<Value>>, ApiError> {
    let data = state
        .training(|t| {
            t.adapter_names()
                .iter()
                .map(|name| adapter_json(t, name))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    Ok(Json(ListPage::all(data)))
}

pub async fn get_adapter(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.training(move |t| adapter_json(t, &name)).await?))
}

pub async fn rollback(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: ApiJson,
) -> Result<Json<Value>, ApiError> {
    let request: RollbackRequest = body.parse()?;
    let adapter = state
        .training(move |t| {
            t.rollback(&name, request.version)?;
            adapter_json(t, &name)
        })
        .await?;
    Ok(Json(adapter))
}

/// vLLM's `POST /v1/load_lora_adapter`: serves a PEFT folder under the configured root as the
/// next version of `lora_name`; answers with the adapter, as `GET /v1/adapters/{name}` does.
pub async fn load_lora_adapter(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Json<Value>, ApiError> {
    let load = ValidLoraLoad::new(body.parse()?, state.config().lora_load_root.as_deref())?;
    let adapter = state
        .training(move |t| {
            t.load_adapter(&load.name, &load.dir, load.in_place)?;
            adapter_json(t, &load.name)
        })
        .await?;
    Ok(Json(adapter))
}

/// vLLM's `POST /v1/unload_lora_adapter`: stops serving `lora_name` (as
/// `DELETE /v1/adapters/{name}`; the folder it was loaded from is not touched).
pub async fn unload_lora_adapter(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Json<Value>, ApiError> {
    let request: UnloadLoraRequest = body.parse()?;
    let name = request.lora_name;
    let deleted = name.clone();
    state.training(move |t| t.delete_adapter(&name)).await?;
    Ok(Json(
        json!({ "id": deleted, "object": "adapter", "deleted": true }),
    ))
}

pub async fn delete_adapter(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let deleted = name.clone();
    state.training(move |t| t.delete_adapter(&name)).await?;
    Ok(Json(
        json!({ "id": deleted, "object": "adapter", "deleted": true }),
    ))
}

pub async fn set_continuous_training(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: ApiJson,
) -> Result<Json<Value>, ApiError> {
    let request: ContinuousTrainingRequest = body.parse()?;
    let every = request
        .feedback_every
        .map(|every| (every, request.steps.unwrap_or(DEFAULT_FEEDBACK_STEPS)));
    let settings = state
        .training(move |t| {
            t.set_continuous(&name, every)?;
            Ok(json!({ "adapter": name, "continuous_training": continuous_json(every) }))
        })
        .await?;
    Ok(Json(settings))
}

fn continuous_json(every: Option<(u32, u64)>) -> Value {
    every.map_or(
        Value::Null,
        |(every, steps)| json!({ "feedback_every": every, "steps": steps }),
    )
}

/// An adapter with every version, its metrics and which one is live.
fn adapter_json(training: &Training, name: &str) -> Result<Value, TrainingError> {
    let adapter = training.adapter(name)?;
    let versions: Vec<Value> = adapter
        .versions
        .iter()
        .map(|v| {
            let info = v.published.as_ref();
            json!({
                "version": v.version,
                "id": format!("{name}@{}", v.version),
                "created_at": v.created_at,
                "live": v.version == adapter.live,
                "size_bytes": v.size_bytes,
                "job_id": info.and_then(|i| i.job_id.clone()),
                "step": info.and_then(|i| i.step),
                "held_out": info.and_then(|i| i.held_out.clone()),
            })
        })
        .collect();
    Ok(json!({
        "id": name,
        "object": "adapter",
        "live_version": adapter.live,
        "versions": versions,
        "continuous_training": continuous_json(training.continuous(name)?),
    }))
}
