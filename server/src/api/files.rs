//! `/v1/files`: OpenAI's file uploads, for fine-tuning data.
//!
//! `POST /v1/files` (multipart: `file`, `purpose=fine-tune`) checks that the file is JSONL in
//! OpenAI's chat format (one `{"messages": [...]}` object per line; the first bad line is named
//! in the 400) and stores it in the database. `GET /v1/files[/{id}[/content]]`,
//! `DELETE /v1/files/{id}`.

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::training::StoredFile;

use super::error::{ApiError, ErrorBody};
use super::extract::PathParam;
use super::protocol::{Deleted, FileObject, FileUpload, ListPage};
use super::state::AppState;
use super::validate::file_upload::{new_file, UploadParts};

#[utoipa::path(
    post,
    path = "/v1/files",
    tag = "files",
    summary = "Upload a JSONL file of chat examples",
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The stored file", body = FileObject),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn upload_file(
    State(state): State<AppState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let limit = state.serving()?.training.config().max_file_bytes;
    // Found by the schema fuzzer: without a multipart Content-Type, axum's rejection was plain
    // text.
    let mut multipart = multipart.map_err(|rejection| {
        ApiError::invalid(
            "file",
            format!(
                "send the file as multipart/form-data with the fields `file` and `purpose` ({})",
                rejection.body_text()
            ),
        )
    })?;
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
    Ok(Json(file_object(&file)))
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

#[utoipa::path(
    get,
    path = "/v1/files",
    tag = "files",
    summary = "Every uploaded file",
    responses(
        (status = 200, description = "The files", body = ListPage<FileObject>),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn list_files(
    State(state): State<AppState>,
) -> Result<Json<ListPage<FileObject>>, ApiError> {
    let files = state.training(|t| t.files()).await?;
    Ok(Json(ListPage::all(files.iter().map(file_object).collect())))
}

#[utoipa::path(
    get,
    path = "/v1/files/{id}",
    tag = "files",
    summary = "One file",
    params(
        ("id" = String, Path, description = "The file id"),
    ),
    responses(
        (status = 200, description = "The file", body = FileObject),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn get_file(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<FileObject>, ApiError> {
    let file = state.training(move |t| t.file(&id)).await?;
    Ok(Json(file_object(&file)))
}

#[utoipa::path(
    get,
    path = "/v1/files/{id}/content",
    tag = "files",
    summary = "A file's content",
    params(
        ("id" = String, Path, description = "The file id"),
    ),
    responses(
        (status = 200, description = "The file as uploaded", content_type = "application/octet-stream", body = String),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn file_content(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let content = state.training(move |t| t.file_content(&id)).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        content,
    )
        .into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/files/{id}",
    tag = "files",
    summary = "Delete a file",
    params(
        ("id" = String, Path, description = "The file id"),
    ),
    responses(
        (status = 200, description = "The file is gone", body = Deleted),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn delete_file(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<Deleted>, ApiError> {
    let deleted = id.clone();
    state.training(move |t| t.delete_file(&id)).await?;
    Ok(Json(Deleted::new(deleted, "file")))
}

fn file_object(file: &StoredFile) -> FileObject {
    FileObject {
        id: file.id.clone(),
        object: "file",
        bytes: file.bytes,
        created_at: file.created_at,
        filename: file.filename.clone(),
        purpose: file.purpose.clone(),
        status: "processed",
        status_details: None,
        expires_at: None,
    }
}
