//! `POST /v1/files`: the parts of the multipart upload become the file to store: its purpose
//! (`fine-tune`, the only one this server's files serve) and its content, OpenAI's chat JSONL
//! checked line by line.

use axum::body::Bytes;
use serde_json::Value;

use crate::api::error::ApiError;
use crate::ids::{new_id, unix_now};
use crate::training::StoredFile;

/// The one purpose this server's files serve.
const FINE_TUNE: &str = "fine-tune";

/// The multipart parts of an upload, as sent.
pub struct UploadParts {
    pub content: Option<Bytes>,
    pub filename: Option<String>,
    pub purpose: Option<String>,
}

/// The file to store, and its content.
pub fn new_file(parts: UploadParts) -> Result<(StoredFile, Bytes), ApiError> {
    let content = parts.content.ok_or_else(|| {
        ApiError::invalid(
            "file",
            "the multipart body has no `file` part; send the JSONL file as `file`",
        )
    })?;
    let purpose = parts.purpose.ok_or_else(|| {
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
        filename: parts.filename.unwrap_or_default(),
        purpose,
        bytes: content.len() as u64,
    };
    Ok((file, content))
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
