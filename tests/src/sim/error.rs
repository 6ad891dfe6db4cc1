//! The simulator's errors. The HTTP status is a pure function of the variant and every error is
//! answered with OpenAI's error JSON, as vLLM does:
//! `{"error":{"message","type","param":null,"code":<status>}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::blocks::OutOfBlocks;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    BadRequest(String),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{0}")]
    OutOfBlocks(#[from] OutOfBlocks),
    #[error("injected failure (engine-sim fault injection)")]
    Injected(u16),
    #[error("no blocks are held for remote request `{0}`")]
    UnknownRelease(String),
    #[error("{0}")]
    NotFound(String),
    #[error("Method Not Allowed")]
    MethodNotAllowed,
    /// Pulled KV bytes are not this prompt's: fail loudly, never generate from them.
    #[error("{0}")]
    KvIntegrity(String),
}

impl SimError {
    pub fn status(&self) -> StatusCode {
        match self {
            SimError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SimError::ModelNotFound(_) | SimError::UnknownRelease(_) | SimError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            SimError::OutOfBlocks(_) => StatusCode::SERVICE_UNAVAILABLE,
            SimError::Injected(code) => {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            SimError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            SimError::KvIntegrity(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// OpenAI's (and vLLM's) error type name for a status.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        405 => "MethodNotAllowed",
        408 => "RequestTimeoutError",
        409 => "ConflictError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        503 => "ServiceUnavailableError",
        500..=599 => "InternalServerError",
        _ => "BadRequestError",
    }
}

/// An OpenAI error response with `status` and `message`.
pub fn error_response(status: StatusCode, message: &str) -> Response {
    let body = json!({
        "error": {
            "message": message,
            "type": error_type(status),
            "param": null,
            "code": status.as_u16(),
        }
    });
    (status, axum::Json(body)).into_response()
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        error_response(self.status(), &self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_variants() {
        assert_eq!(
            SimError::BadRequest("x".into()).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            SimError::ModelNotFound("m".into()).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            SimError::Injected(503).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            SimError::ModelNotFound("m".into()).to_string(),
            "The model `m` does not exist."
        );
        assert_eq!(error_type(StatusCode::BAD_GATEWAY), "InternalServerError");
    }
}
