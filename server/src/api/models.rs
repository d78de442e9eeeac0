//! `GET /v1/models` and `GET /v1/models/{id}`: the base model and every loaded adapter, each
//! usable as `model` in requests.

use axum::extract::State;
use axum::Json;

use super::error::{ApiError, ErrorBody};
use super::extract::PathParam;
use super::protocol::{ListPage, ModelCard};
use super::state::{AppState, Serving};

const OWNER: &str = "mezo-serve";

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "inference",
    summary = "The base model and every adapter",
    responses(
        (status = 200, description = "The models", body = ListPage<ModelCard>),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn list_models(
    State(state): State<AppState>,
) -> Result<Json<ListPage<ModelCard>>, ApiError> {
    let serving = state.serving()?;
    Ok(Json(ListPage::all(model_cards(serving))))
}

#[utoipa::path(
    get,
    path = "/v1/models/{*id}",
    tag = "inference",
    summary = "One model: the base, an adapter, or `adapter@version`",
    params(
        ("id" = String, Path, description = "The model id (may contain `/`)"),
    ),
    responses(
        (status = 200, description = "The model", body = ModelCard),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn get_model(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<ModelCard>, ApiError> {
    let serving = state.serving()?;
    // `name@N` names a version: resolve it so a missing version is a 404 like a missing name.
    if let Some((name, _)) = id.rsplit_once('@') {
        serving.resolve_model(&id)?;
        if let Some(card) = model_cards(serving).into_iter().find(|c| c.id == name) {
            return Ok(Json(ModelCard { id, ..card }));
        }
    }
    model_cards(serving)
        .into_iter()
        .find(|card| card.id == id)
        .map(Json)
        .ok_or_else(|| {
            ApiError::model_not_found(format!(
                "the model `{id}` does not exist; GET /v1/models lists them"
            ))
        })
}

fn model_cards(serving: &Serving) -> Vec<ModelCard> {
    let base = ModelCard {
        id: serving.model_id.clone(),
        object: "model",
        created: serving.created,
        owned_by: OWNER,
        parent: None,
        root: None,
        live_version: None,
        versions: None,
        max_model_len: Some(serving.model.transformer.config.context_length),
    };
    let adapters = serving
        .adapters
        .registry()
        .list()
        .into_iter()
        .map(|a| ModelCard {
            id: a.name.clone(),
            object: "model",
            created: a.created,
            owned_by: OWNER,
            parent: Some(serving.model_id.clone()),
            root: Some(a.name),
            live_version: Some(a.live),
            versions: Some(a.versions),
            max_model_len: Some(serving.model.transformer.config.context_length),
        });
    std::iter::once(base).chain(adapters).collect()
}
