//! Reading requests, with errors in the API's shape: a JSON body over the limit is 413, text
//! that is not a JSON object is 400 `invalid_json`, and a field of the wrong type is 400 naming
//! the field's path (`messages[0].content`); a path segment or query string that cannot be
//! decoded is 400 naming it, where axum's own extractors would answer in plain text.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
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

/// The one parameter of a route's path (`/v1/files/{id}`), percent-decoded.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| {
                ApiError::invalid(
                    "path",
                    format!("the path cannot be read: {}", rejection.body_text()),
                )
            })?;
        Ok(Self(value))
    }
}

/// The query string's parameters (`?after=…&limit=…`), percent-decoded (lossily, as
/// `serde_urlencoded` does, so today nothing a client sends makes it fail; the wrapper keeps
/// any future failure in the API's shape).
pub struct QueryParams(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(params) = Query::from_request_parts(parts, state)
            .await
            .map_err(|rejection| {
                ApiError::invalid(
                    "query",
                    format!("the query string cannot be read: {}", rejection.body_text()),
                )
            })?;
        Ok(Self(params))
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
