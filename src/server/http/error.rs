//! Error answers: `ErrorResponse` bodies, and FastAPI's 422 shape on the group endpoints.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::{ErrorObject, ErrorResponse, HttpValidationError};
use crate::server::store::StoreError;
use crate::server::validate::Issues;

/// Everything a handler can answer instead of success.
#[derive(Debug)]
pub enum ApiError {
    /// 404 with the given message.
    NotFound(&'static str),
    /// 422 `{"detail":[…]}` (group endpoints).
    Invalid(Issues),
    /// 422 `ErrorResponse` (single-run endpoints), with the issues as detail.
    InvalidRun(Issues),
    Unauthorized,
    /// 403 with the given message.
    Forbidden(String),
    /// 413: the body is over the limit (in bytes).
    TooLarge(usize),
    /// 408 with the given message.
    Timeout(&'static str),
    /// 404 for a failed run's result, with its error.
    RunFailed(String),
    /// Injected 429 with `Retry-After` seconds.
    TooManyRequests(u64),
    /// Injected 500.
    Injected500,
    /// 500 from a real problem; the text is logged, not sent.
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::Internal(e.to_string())
    }
}

fn error_body(status: StatusCode, message: String, detail: Option<serde_json::Value>) -> Response {
    let body = ErrorResponse::new(ErrorObject {
        ref_id: crate::api::new_ref_id(),
        message,
        detail,
    });
    (status, axum::Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::NotFound(m) => error_body(StatusCode::NOT_FOUND, m.to_string(), None),
            ApiError::Invalid(issues) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(HttpValidationError { detail: issues.0 }),
            )
                .into_response(),
            ApiError::InvalidRun(issues) => {
                let message = format!("Invalid request: {}", issues.summary());
                let detail = serde_json::json!({ "errors": issues.0 });
                error_body(StatusCode::UNPROCESSABLE_ENTITY, message, Some(detail))
            }
            ApiError::Unauthorized => error_body(
                StatusCode::UNAUTHORIZED,
                "Unauthorized: missing or invalid x-api-key header".to_string(),
                None,
            ),
            ApiError::Forbidden(m) => error_body(StatusCode::FORBIDDEN, m, None),
            ApiError::TooLarge(limit) => error_body(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large: the limit is {limit} bytes"),
                None,
            ),
            ApiError::Timeout(m) => error_body(StatusCode::REQUEST_TIMEOUT, m.to_string(), None),
            ApiError::RunFailed(m) => error_body(StatusCode::NOT_FOUND, m, None),
            ApiError::TooManyRequests(secs) => {
                let mut r = error_body(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many requests: quota temporarily exceeded".to_string(),
                    None,
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                r
            }
            ApiError::Injected500 => error_body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal server error (injected fault)".to_string(),
                None,
            ),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "request failed");
                error_body(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal server error".to_string(),
                    None,
                )
            }
        }
    }
}
