//! The HTTP API's one error type, rendered in OpenAI's envelope:
//! `{"error": {"message", "type", "param", "code"}}` with the matching status.
//!
//! Every handler returns `Result<_, ApiError>`, so no path can answer a user's mistake with a
//! 500 or an HTML page. Messages say what was wrong and how to fix it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::scheduler::SubmitError;
use crate::training::TrainingError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, …
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault (`messages[1].content`, `temperature`), when there is one.
    pub param: Option<String>,
    /// A stable machine-readable code (`model_not_found`, `context_length_exceeded`, …).
    pub code: Option<&'static str>,
    /// Seconds for the `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
}

/// `{"error": {...}}`: every error the API answers.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: a field has a wrong value or type.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400: the body is not JSON at all.
    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_json"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400: an OpenAI feature this server does not implement.
    pub fn unsupported(param: &str, what: &str) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("unsupported_parameter"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("`{param}` is not supported by this server ({what}); remove it from the request"),
            )
        }
    }

    /// 400: prompt and requested tokens do not fit the context window.
    pub fn context_length(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("context_length_exceeded"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 404: `model` names neither the base model nor a loaded adapter.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    /// 404: no such route.
    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self {
            code: Some("not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("no route {method} {path}; the API is under /v1 (see GET /v1/models)"),
            )
        }
    }

    /// 405: the route exists with another method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self {
            code: Some("method_not_allowed"),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("{path} does not accept {method}"),
            )
        }
    }

    /// 413: the body is over `server.max_body_bytes`.
    pub fn body_too_large(limit: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than this server's limit of {limit} bytes (server.max_body_bytes)"),
            )
        }
    }

    /// 401: missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
        }
    }

    /// 503 while the model loads.
    pub fn loading() -> Self {
        Self {
            code: Some("model_loading"),
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model is still loading; retry in a few seconds (GET /ready says when it is up)",
            )
        }
    }

    /// 403: the request is understood but not allowed here (a path outside the folder it must
    /// be under, a feature the configuration turned off).
    pub fn forbidden(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            code: Some("forbidden"),
            ..Self::new(StatusCode::FORBIDDEN, "permission_error", message)
        }
    }

    /// 403: a valid API key without the scope the route needs.
    pub fn missing_scope(message: impl Into<String>) -> Self {
        Self {
            code: Some("missing_scope"),
            ..Self::new(StatusCode::FORBIDDEN, "permission_error", message)
        }
    }

    /// 429: the API key already has as many requests in flight as it may.
    pub fn key_busy(max_concurrent_requests: usize) -> Self {
        Self {
            code: Some("too_many_concurrent_requests"),
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "this API key already has {max_concurrent_requests} requests in flight, as \
                     many as it may (`max_concurrent_requests`); retry when one has finished"
                ),
            )
        }
    }

    /// 404: a job, file, adapter or completion that does not exist.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    /// 409: the request conflicts with the object's state (cancelling a finished job).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            code: Some("conflict"),
            ..Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
        }
    }

    /// 413: more of something than the server accepts in one request.
    pub fn too_large(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                message,
            )
        }
    }

    /// 500: something on our side failed; the message says what.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            code: Some("internal_error"),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
        }
    }

    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::QueueFull { .. } => Self {
                code: Some("queue_full"),
                retry_after: Some(1),
                ..Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    err.to_string(),
                )
            },
            SubmitError::TooManySequences { .. } => Self {
                param: Some("n".into()),
                code: Some("too_many_sequences"),
                ..Self::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    err.to_string(),
                )
            },
            SubmitError::ShuttingDown => Self {
                code: Some("shutting_down"),
                retry_after: Some(5),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    err.to_string(),
                )
            },
        }
    }
}

impl From<TrainingError> for ApiError {
    fn from(err: TrainingError) -> Self {
        match err {
            TrainingError::Invalid { param, message } => ApiError::invalid(param, message),
            TrainingError::TooLarge { param, message } => ApiError::too_large(param, message),
            TrainingError::NotFound { what, .. } => {
                let code = match what {
                    "job" => "job_not_found",
                    "file" => "file_not_found",
                    "adapter" => "adapter_not_found",
                    "adapter version" => "adapter_version_not_found",
                    "completion" => "completion_not_found",
                    _ => "not_found",
                };
                ApiError::not_found(code, err.to_string())
            }
            TrainingError::Conflict(message) => ApiError::conflict(message),
            TrainingError::TooManyJobs { .. } => Self {
                code: Some("too_many_jobs"),
                retry_after: Some(60),
                ..Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    err.to_string(),
                )
            },
            // Serving goes on without the database; what needs it can be sent again shortly.
            TrainingError::Db(ref db) if db.is_unavailable() => {
                tracing::warn!(error = %err, "the fine-tuning database is unreachable");
                Self {
                    code: Some("database_unavailable"),
                    retry_after: Some(5),
                    ..Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        err.to_string(),
                    )
                }
            }
            TrainingError::Db(_) | TrainingError::Publish(_) | TrainingError::DataDir { .. } => {
                tracing::error!(error = %err, "fine-tuning storage failed");
                ApiError::internal(err.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_openai_envelope() {
        let err = ApiError::invalid("temperature", "`temperature` must be between 0 and 2");
        let json = serde_json::to_value(err.body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {
                "message": "`temperature` must be between 0 and 2",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_value"
            }})
        );
    }

    #[test]
    fn a_full_queue_is_429_with_retry_after() {
        let response = ApiError::from(SubmitError::QueueFull { waiting: 3 }).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
