//! [`ApiError`]: the one error type of the HTTP API. Its status mapping lives in
//! [`ApiError::status`]; every error body has the same shape:
//! `{"error": {"code", "message", "field"?, "reason"?}}`. A 5xx body is generic; the detail
//! goes to the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pond_core::{CoreError, FieldError, StoreError};
use serde::{Deserialize, Serialize};

/// The JSON body of an error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`validation_failed`, `not_found`, …).
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// For validation errors: the field path (`definition.stages[1].key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For validation errors: why the field was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An error answered to an API caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: the request is malformed (not JSON, bad query string).
    #[error("{0}")]
    BadRequest(String),
    /// 401: no valid token.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the token may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such thing (or not visible to this token).
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is too large.
    #[error("{0}")]
    TooLarge(String),
    /// 415: wrong content type.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: a field failed validation.
    #[error("{0}")]
    Invalid(FieldError),
    /// 503: the store is unreachable; retry.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug or an unexpected failure; the detail is logged, not returned.
    #[error("{0}")]
    Internal(String),
    /// Any other status (a layer's or the transport's answer, made JSON by
    /// [`crate::boundary::json_errors`]).
    #[error("{message}")]
    Status {
        /// The status.
        status: StatusCode,
        /// What happened.
        message: String,
    },
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Status { status, .. } => *status,
        }
    }

    /// The error a response of `status` saying `message` stands for.
    pub fn from_status(status: StatusCode, message: String) -> Self {
        match status {
            StatusCode::BAD_REQUEST => ApiError::BadRequest(message),
            StatusCode::UNAUTHORIZED => ApiError::Unauthorized(message),
            StatusCode::FORBIDDEN => ApiError::Forbidden(message),
            StatusCode::NOT_FOUND => ApiError::NotFound(message),
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(message),
            StatusCode::CONFLICT => ApiError::Conflict(message),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(message),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(message),
            StatusCode::UNPROCESSABLE_ENTITY => ApiError::invalid("body", message),
            StatusCode::SERVICE_UNAVAILABLE => ApiError::Unavailable(message),
            StatusCode::INTERNAL_SERVER_ERROR => ApiError::Internal(message),
            status => ApiError::Status { status, message },
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Invalid(_) => "validation_failed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
            ApiError::Status { status, .. } if status.is_server_error() => "server_error",
            ApiError::Status { .. } => "client_error",
        }
    }

    /// A validation error at `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::Invalid(FieldError::new(field, reason))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if matches!(e, StoreError::Unavailable(_) | StoreError::Backend(_) | StoreError::Corrupt(_)) {
            metrics::counter!("pond_store_errors_total").increment(1);
        }
        match e {
            StoreError::Unavailable(m) => ApiError::Unavailable(format!("the database is unavailable: {m}")),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::Rejected(inner) => (*inner).into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Invalid(f) => ApiError::Invalid(f),
            CoreError::RunNotFound(id) => ApiError::NotFound(format!("run {id} not found")),
            e @ CoreError::StageNotFound { .. } => ApiError::NotFound(e.to_string()),
            e @ CoreError::StaleAttempt { .. } => ApiError::Conflict(e.to_string()),
            CoreError::Quota(why) => ApiError::Status { status: StatusCode::TOO_MANY_REQUESTS, message: why },
            CoreError::Store(s) => s.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (message, field, reason) = match &self {
            ApiError::Invalid(f) => (f.to_string(), Some(f.field.clone()), Some(f.reason.clone())),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                ("internal error; see the server log".to_string(), None, None)
            }
            other => (other.to_string(), None, None),
        };
        // Messages quote what the caller sent; a reply never grows with the request.
        let (message, field, reason) =
            (clip_echo(&message), field.map(|f| clip_field(&f)), reason.map(|r| clip_echo(&r)));
        let body = ErrorBody { error: ErrorDetail { code: self.code().into(), message, field, reason } };
        let mut response = (status, axum::Json(body)).into_response();
        match status {
            StatusCode::UNAUTHORIZED => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// Longest piece of quoted input an error message repeats.
const MAX_ECHO: usize = 100;
/// Longest error message, field or reason, whatever it quotes.
const MAX_MESSAGE: usize = 1024;

/// Bounds what an error text repeats of the request: each quoted piece (between backticks or
/// double quotes, as this crate's and serde's messages quote input) is cut to 100 bytes and an
/// ellipsis, and the whole text to 1 KiB, so an error answer stays small however large the
/// input it names.
pub fn clip_echo(text: &str) -> String {
    clip_to(text, MAX_MESSAGE)
}

/// A field path: built from the request's keys, shown whole up to 200 bytes.
fn clip_field(field: &str) -> String {
    clip_to(field, 200)
}

fn clip_to(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max + 8));
    let mut open: Option<(char, usize)> = None;
    for c in text.chars() {
        match open {
            Some((quote, _)) if c == quote => {
                out.push(c);
                open = None;
            }
            Some((quote, shown)) => {
                // Past the limit the rest of the quoted piece is dropped.
                if shown <= MAX_ECHO {
                    if shown + c.len_utf8() <= MAX_ECHO {
                        out.push(c);
                        open = Some((quote, shown + c.len_utf8()));
                    } else {
                        out.push('…');
                        open = Some((quote, MAX_ECHO + 1));
                    }
                }
            }
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    open = Some((c, 0));
                }
            }
        }
        if out.len() > max {
            let mut cut = max;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push('…');
            return out;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_input_is_clipped() {
        let long = "x".repeat(50_000);
        let clipped = clip_echo(&format!("`{long}` is not a preset: `codex` or `claude`"));
        assert_eq!(clipped, format!("`{}…` is not a preset: `codex` or `claude`", "x".repeat(100)));
        let clipped = clip_echo(&format!("invalid type: string \"{long}\", expected u64"));
        assert!(clipped.ends_with("…\", expected u64") && clipped.len() < 150, "{clipped}");
        // Unquoted input is bounded by the whole-text cap.
        let clipped = clip_echo(&format!("run {long} not found"));
        assert!(clipped.len() <= MAX_MESSAGE + 3 && clipped.ends_with('…'));
        // Short texts and multi-byte characters pass unchanged.
        assert_eq!(clip_echo("`é` is fine"), "`é` is fine");
        let accents = "é".repeat(80);
        let clipped = clip_echo(&format!("`{accents}`"));
        assert_eq!(clipped, format!("`{}…`", "é".repeat(50)));
    }

    #[test]
    fn an_error_answer_stays_small_however_large_the_input() {
        let long = "y".repeat(1_000_000);
        let e = ApiError::invalid(format!("env.{long}"), format!("`{long}` is not allowed"));
        let response = e.into_response();
        let (_, body) = response.into_parts();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = rt.block_on(axum::body::to_bytes(body, usize::MAX)).unwrap();
        assert!(bytes.len() < 4 * MAX_MESSAGE, "{} bytes", bytes.len());
    }
}
