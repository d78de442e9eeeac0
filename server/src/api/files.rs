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

use crate::ids::{new_id, unix_now};
use crate::training::StoredFile;

use super::error::ApiError;
use super::state::AppState;

/// The one purpose this server's files serve.
const FINE_TUNE: &str = "fine-tune";

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
    let content = content.ok_or_else(|| {
        ApiError::invalid(
            "file",
            "the multipart body has no `file` part; send the JSONL file as `file`",
        )
    })?;
    let purpose = purpose.ok_or_else(|| {
        ApiError::invalid(
            "purpose",
            "the multipart body has no `purpose`; use `fine-tune`",
        )
    })?;
    if purpose != FINE_TUNE {
        return Err(ApiError::invalid(
            "purpose",
            format!(
                "`purpose` {purpose:?} is not supported; this server stores `fine-tune` files only"
            ),
        ));
    }
    check_chat_jsonl(&content)?;
    let file = StoredFile {
        id: new_id("file"),
        created_at: unix_now(),
        filename: filename.unwrap_or_default(),
        purpose,
        bytes: content.len() as u64,
    };
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

/// Every non-empty line must be a JSON object with a `messages` list.
fn check_chat_jsonl(content: &[u8]) -> Result<(), ApiError> {
    let text = std::str::from_utf8(content)
        .map_err(|e| ApiError::invalid("file", format!("the file is not UTF-8 text: {e}")))?;
    let mut examples = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            ApiError::invalid("file", format!("line {}: not a JSON object: {e}", i + 1))
        })?;
        if !value.get("messages").is_some_and(Value::is_array) {
            return Err(ApiError::invalid(
                "file",
                format!(
                    "line {}: expected {{\"messages\": [...]}} in OpenAI's chat format",
                    i + 1
                ),
            ));
        }
        examples += 1;
    }
    if examples == 0 {
        return Err(ApiError::invalid("file", "the file holds no examples"));
    }
    Ok(())
}

pub async fn list_files(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let files = state.training(|t| t.files()).await?;
    let data: Vec<Value> = files.iter().map(file_json).collect();
    Ok(Json(
        json!({ "object": "list", "data": data, "has_more": false }),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_are_checked_one_by_one() {
        check_chat_jsonl(b"{\"messages\": []}\n\n{\"messages\": [{\"role\": \"user\"}]}\n")
            .unwrap();
        let err = check_chat_jsonl(b"{\"messages\": []}\n{\"prompt\": 1}\n").unwrap_err();
        assert!(err.message.starts_with("line 2:"), "{}", err.message);
        let err = check_chat_jsonl(b"{\"messages\": []}\nnot json\n").unwrap_err();
        assert!(err.message.starts_with("line 2:"), "{}", err.message);
        assert!(check_chat_jsonl(b"\n").is_err());
    }
}
