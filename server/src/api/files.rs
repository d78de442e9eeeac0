//! `/v1/files`: OpenAI's file uploads, for fine-tuning data.
//!
//! `POST /v1/files` (multipart: `file`, `purpose=fine-tune`) checks that the file is JSONL in
//! OpenAI's chat format (one `{"messages": [...]}` object per line; the first bad line is named
//! in the 400) and stores it in the database. `GET /v1/files[/{id}[/content]]`,
//! `DELETE /v1/files/{id}`.

use axum::extract::{Multipart, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::training::StoredFile;

use super::error::ApiError;
use super::protocol::ListPage;
use super::state::AppState;
use super::validate::file_upload::{new_file, UploadParts};

pub async fn upload_file(
    State(state): State<AppState>,
    mut multipart: Multipart,
) -> Result<Json<Value>, ApiError> {
    let limit = state.serving()?.training.config().max_file_bytes;
    let (mut content, mut filename, mut purpose) = (None, None, None);
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(err) => return Err(multipart_error(err.status(), &err.body_text(), limit)),
        };
        match field.name() {
            Some("file") => {
                filename = Some(field.file_name().unwrap_or("upload.jsonl").to_string());
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|err| multipart_error(err.status(), &err.body_text(), limit))?;
                content = Some(bytes);
            }
            Some("purpose") => {
                purpose = Some(
                    field
                        .text()
                        .await
                        .map_err(|err| multipart_error(err.status(), &err.body_text(), limit))?,
                );
            }
            _ => {}
        }
    }
    let (file, content) = new_file(UploadParts {
        content,
        filename,
        purpose,
    })?;
    let stored = file.clone();
    state
        .training(move |t| t.store_file(&stored, &content))
        .await?;
    Ok(Json(file_json(&file)))
}

fn multipart_error(status: StatusCode, text: &str, limit: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(
            "file",
            format!("the file is larger than this server's limit of {limit} bytes (training.max_file_bytes)"),
        )
    } else {
        ApiError::invalid("file", format!("cannot read the multipart body: {text}"))
    }
}

pub async fn list_files(State(state): State<AppState>) -> Result<Json<ListPage<Value>>, ApiError> {
    let files = state.training(|t| t.files()).await?;
    Ok(Json(ListPage::all(files.iter().map(file_json).collect())))
}

pub async fn get_file(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let file = state.training(move |t| t.file(&id)).await?;
    Ok(Json(file_json(&file)))
}

pub async fn file_content(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let content = state.training(move |t| t.file_content(&id)).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        content,
    )
        .into_response())
}

pub async fn delete_file(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let deleted = id.clone();
    state.training(move |t| t.delete_file(&id)).await?;
    Ok(Json(
        json!({ "id": deleted, "object": "file", "deleted": true }),
    ))
}

fn file_json(file: &StoredFile) -> Value {
    json!({
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": null,
        "expires_at": null,
    })
}
