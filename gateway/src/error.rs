//! The JSON error answer every gateway endpoint gives (`ApiError`): a status, a stable code and a
//! message, with `Retry-After` when a retry can help.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// A JSON error with a stable shape: `{"error": {"code", "message", "path"?}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    path: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), path: None, retry_after: None }
    }

    /// The input field the error is about.
    pub fn with_path(mut self, path: String) -> Self {
        self.path = Some(path);
        self
    }

    /// Sends `Retry-After: secs` with the error (429, 503).
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// `code: message`, as a command line tool prints an answer it did not get.
impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A store failure: 503 (with `Retry-After`) when a retry can help, else 500 without details.
impl From<tidings_store::StoreError> for ApiError {
    fn from(e: tidings_store::StoreError) -> Self {
        if e.is_retriable() {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string()).with_retry_after(1)
        } else {
            tracing::error!(error = %e, "A store query failed.");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the store failed")
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = json!({"code": self.code, "message": self.message});
        if let Some(p) = self.path {
            err["path"] = Value::String(p);
        }
        let mut r = (self.status, Json(json!({ "error": err }))).into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        r
    }
}
