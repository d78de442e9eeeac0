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

use axum::extract::State;
use axum::Json;

use crate::training::{Training, TrainingError};

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, PathParam};
use super::mezo_jobs::shortest_floats;
use super::protocol::{
    AdapterOut, AdapterVersionOut, ContinuousTraining, ContinuousTrainingOut,
    ContinuousTrainingRequest, Deleted, ListPage, LoadLoraRequest, RollbackRequest,
    UnloadLoraRequest,
};
use super::state::AppState;
use super::validate::runtime_lora::ValidLoraLoad;

#[utoipa::path(
    get,
    path = "/v1/adapters",
    tag = "adapters",
    summary = "Every adapter with its versions",
    responses(
        (status = 200, description = "The adapters", body = ListPage<AdapterOut>),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn list_adapters(
    State(state): State<AppState>,
) -> Result<Json<ListPage<AdapterOut>>, ApiError> {
    let data = state
        .training(|t| {
            t.adapter_names()
                .iter()
                .map(|name| adapter_out(t, name))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    Ok(Json(ListPage::all(data)))
}

#[utoipa::path(
    get,
    path = "/v1/adapters/{name}",
    tag = "adapters",
    summary = "One adapter with its versions",
    params(
        ("name" = String, Path, description = "The adapter's name"),
    ),
    responses(
        (status = 200, description = "The adapter", body = AdapterOut),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn get_adapter(
    State(state): State<AppState>,
    PathParam(name): PathParam,
) -> Result<Json<AdapterOut>, ApiError> {
    Ok(Json(state.training(move |t| adapter_out(t, &name)).await?))
}

#[utoipa::path(
    post,
    path = "/v1/adapters/{name}/rollback",
    tag = "adapters",
    summary = "Make an older version live",
    request_body = RollbackRequest,
    params(
        ("name" = String, Path, description = "The adapter's name"),
    ),
    responses(
        (status = 200, description = "The adapter", body = AdapterOut),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn rollback(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    body: ApiJson,
) -> Result<Json<AdapterOut>, ApiError> {
    let request: RollbackRequest = body.parse()?;
    let adapter = state
        .training(move |t| {
            t.rollback(&name, request.version)?;
            adapter_out(t, &name)
        })
        .await?;
    Ok(Json(adapter))
}

/// vLLM's `POST /v1/load_lora_adapter`: serves a PEFT folder under the configured root as the
/// next version of `lora_name`; answers with the adapter, as `GET /v1/adapters/{name}` does.
#[utoipa::path(
    post,
    path = "/v1/load_lora_adapter",
    tag = "adapters",
    summary = "Serve a PEFT folder under `server.lora_load_root` (vLLM's API)",
    request_body = LoadLoraRequest,
    responses(
        (status = 200, description = "The adapter", body = AdapterOut),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn load_lora_adapter(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Json<AdapterOut>, ApiError> {
    let load = ValidLoraLoad::new(body.parse()?, state.config().lora_load_root.as_deref())?;
    let adapter = state
        .training(move |t| {
            t.load_adapter(&load.name, &load.dir, load.in_place)?;
            adapter_out(t, &load.name)
        })
        .await?;
    Ok(Json(adapter))
}

/// vLLM's `POST /v1/unload_lora_adapter`: stops serving `lora_name` (as
/// `DELETE /v1/adapters/{name}`; the folder it was loaded from is not touched).
#[utoipa::path(
    post,
    path = "/v1/unload_lora_adapter",
    tag = "adapters",
    summary = "Stop serving an adapter (vLLM's API)",
    request_body = UnloadLoraRequest,
    responses(
        (status = 200, description = "The adapter is gone", body = Deleted),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn unload_lora_adapter(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Json<Deleted>, ApiError> {
    let request: UnloadLoraRequest = body.parse()?;
    let name = request.lora_name;
    let deleted = name.clone();
    state.training(move |t| t.delete_adapter(&name)).await?;
    Ok(Json(Deleted::new(deleted, "adapter")))
}

#[utoipa::path(
    delete,
    path = "/v1/adapters/{name}",
    tag = "adapters",
    summary = "Delete an adapter, cancelling its jobs",
    params(
        ("name" = String, Path, description = "The adapter's name"),
    ),
    responses(
        (status = 200, description = "The adapter is gone", body = Deleted),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn delete_adapter(
    State(state): State<AppState>,
    PathParam(name): PathParam,
) -> Result<Json<Deleted>, ApiError> {
    let deleted = name.clone();
    state.training(move |t| t.delete_adapter(&name)).await?;
    Ok(Json(Deleted::new(deleted, "adapter")))
}

#[utoipa::path(
    put,
    path = "/v1/adapters/{name}/continuous_training",
    tag = "adapters",
    summary = "Train on every `feedback_every` feedback items (`null` stops it)",
    request_body = ContinuousTrainingRequest,
    params(
        ("name" = String, Path, description = "The adapter's name"),
    ),
    responses(
        (status = 200, description = "The setting", body = ContinuousTrainingOut),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn set_continuous_training(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    body: ApiJson,
) -> Result<Json<ContinuousTrainingOut>, ApiError> {
    let request: ContinuousTrainingRequest = body.parse()?;
    let settings = state
        .training(move |t| {
            let every = t.set_continuous(&name, request.feedback_every, request.steps)?;
            Ok(ContinuousTrainingOut {
                adapter: name,
                continuous_training: continuous(every),
            })
        })
        .await?;
    Ok(Json(settings))
}

fn continuous(every: Option<(u32, u64)>) -> Option<ContinuousTraining> {
    every.map(|(feedback_every, steps)| ContinuousTraining {
        feedback_every,
        steps,
    })
}

/// An adapter with every version, its metrics and which one is live.
fn adapter_out(training: &Training, name: &str) -> Result<AdapterOut, TrainingError> {
    let adapter = training.adapter(name)?;
    let versions = adapter
        .versions
        .iter()
        .map(|v| {
            let info = v.published.as_ref();
            AdapterVersionOut {
                version: v.version,
                id: format!("{name}@{}", v.version),
                created_at: v.created_at,
                live: v.version == adapter.live,
                size_bytes: v.size_bytes,
                job_id: info.and_then(|i| i.job_id.clone()),
                step: info.and_then(|i| i.step),
                held_out: info.and_then(|i| i.held_out.as_ref()).map(shortest_floats),
            }
        })
        .collect();
    Ok(AdapterOut {
        id: name.to_string(),
        object: "adapter",
        live_version: adapter.live,
        versions,
        continuous_training: continuous(training.continuous(name)?),
    })
}
