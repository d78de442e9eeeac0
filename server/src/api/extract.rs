//! Reading a JSON request body, with errors in the API's shape: a body over the limit is 413,
//! text that is not a JSON object is 400 `invalid_json`, and a field of the wrong type is 400
//! naming the field's path (`messages[0].content`).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::state::AppState;

/// A request body that is a JSON object; [`ApiJson::parse`] reads typed views of it.
pub struct ApiJson(pub Value);

impl FromRequest<AppState> for ApiJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.config().max_body_bytes;
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::body_too_large(limit)
            } else {
                ApiError::malformed_json(format!("cannot read the request body: {rejection}"))
            }
        })?;
        parse_object(&body).map(ApiJson)
    }
}

impl ApiJson {
    /// Reads the body as `T`, naming the offending field on a type error.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_path_to_error::deserialize(&self.0).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner().to_string();
            if path == "." {
                ApiError::invalid("body", inner)
            } else {
                ApiError::invalid(path.clone(), format!("`{path}`: {inner}"))
            }
        })
    }
}

fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|err| {
        ApiError::malformed_json(format!(
            "the request body is not valid JSON ({err}); send a JSON object with Content-Type: application/json"
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::malformed_json(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Probe {
        messages: Vec<Message>,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Message {
        role: String,
    }

    fn parse(body: &[u8]) -> Result<Probe, ApiError> {
        ApiJson(parse_object(body)?).parse()
    }

    #[test]
    fn type_errors_name_the_field_path() {
        let ok = parse(br#"{"messages": [{"role": "user"}], "extra": 1}"#).unwrap();
        assert_eq!(ok.messages[0].role, "user");
        let err = parse(br#"{"messages": [{"role": "user"}, {"role": 3}]}"#).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("messages[1].role"));
        let err = parse(br#"{"messages": "#).unwrap_err();
        assert_eq!(err.code, Some("invalid_json"));
        let err = parse(b"[1]").unwrap_err();
        assert_eq!(err.code, Some("invalid_json"));
        let err = parse(b"{}").unwrap_err();
        assert_eq!(err.param.as_deref(), Some("body"));
        assert!(err.message.contains("messages"), "{}", err.message);
    }
}
