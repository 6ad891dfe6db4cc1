//! Typed errors of the proxy. The HTTP status and the stable `x-pd-error-code`
//! are pure functions of the variant; the body is OpenAI's error JSON.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

pub const ERROR_CODE_HEADER: &str = "x-pd-error-code";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("prefill target {0:?} is not allowed (SSRF protection)")]
    PrefillForbidden(String),
    #[error("invalid prefill target {0:?}")]
    BadPrefillTarget(String),
    #[error("prefill engine {target} unreachable: {detail}")]
    PrefillUnreachable { target: String, detail: String },
    #[error("prefill engine {target} timed out after {timeout_ms} ms")]
    PrefillTimeout { target: String, timeout_ms: u64 },
    #[error("prefill engine {target} answered {status}")]
    PrefillStatus {
        target: String,
        status: u16,
        body: Bytes,
    },
    #[error("prefill engine {target} sent an invalid response: {detail}")]
    PrefillBadResponse { target: String, detail: String },
    #[error("decode engine unavailable: {0}")]
    DecodeUnavailable(String),
    #[error("decode engine error: {0}")]
    DecodeFailed(String),
    #[error("unknown data-parallel rank {0:?}")]
    UnknownDataParallelRank(String),
    #[error("decode engine not ready")]
    NotReady,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidJson(_)
            | ProxyError::InvalidRequest(_)
            | ProxyError::BadPrefillTarget(_)
            | ProxyError::UnknownDataParallelRank(_)
            | ProxyError::BodyRead(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::PrefillForbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::PrefillUnreachable { .. } | ProxyError::PrefillBadResponse { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::PrefillTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::PrefillStatus { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            ProxyError::DecodeUnavailable(_) | ProxyError::NotReady => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::DecodeFailed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Stable machine-readable code, also the `class` label of the error metric.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::InvalidJson(_) => "invalid_json",
            ProxyError::InvalidRequest(_) => "invalid_request",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BodyRead(_) => "body_read",
            ProxyError::PrefillForbidden(_) => "prefill_forbidden",
            ProxyError::BadPrefillTarget(_) => "bad_prefill_target",
            ProxyError::PrefillUnreachable { .. } => "prefill_unreachable",
            ProxyError::PrefillTimeout { .. } => "prefill_timeout",
            ProxyError::PrefillStatus { .. } => "prefill_status",
            ProxyError::PrefillBadResponse { .. } => "prefill_bad_response",
            ProxyError::DecodeUnavailable(_) => "decode_unavailable",
            ProxyError::DecodeFailed(_) => "decode_failed",
            ProxyError::UnknownDataParallelRank(_) => "unknown_dp_rank",
            ProxyError::NotReady => "not_ready",
        }
    }

    fn openai_type(&self) -> &'static str {
        match self.status().as_u16() {
            400 => "BadRequestError",
            403 => "PermissionDeniedError",
            413 => "RequestTooLargeError",
            404 => "NotFoundError",
            503 => "ServiceUnavailableError",
            504 => "GatewayTimeoutError",
            s if s >= 500 => "BadGatewayError",
            _ => "APIError",
        }
    }

    /// Whether another prefill attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProxyError::PrefillUnreachable { .. } => true,
            ProxyError::PrefillStatus { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }
}

/// OpenAI-style error body.
pub fn error_body(message: &str, kind: &str, code: u16) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "error": {"message": message, "type": kind, "param": null, "code": code}
        })
        .to_string(),
    )
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let status = self.status();
        // A prefill error relayed in `fail` mode keeps the engine's own JSON body.
        let body = match &self {
            ProxyError::PrefillStatus { body, .. } if !body.is_empty() => body.clone(),
            _ => error_body(&self.to_string(), self.openai_type(), status.as_u16()),
        };
        let mut response = Response::new(axum::body::Body::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_CODE_HEADER, HeaderValue::from_static(self.code()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_a_function_of_the_variant() {
        assert_eq!(ProxyError::InvalidJson("x".into()).status(), 400);
        assert_eq!(ProxyError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(
            ProxyError::DecodeUnavailable("refused".into()).status(),
            503
        );
        assert_eq!(ProxyError::DecodeFailed("reset".into()).status(), 502);
        let t = ProxyError::PrefillTimeout {
            target: "p:1".into(),
            timeout_ms: 5,
        };
        assert_eq!(t.status(), 504);
        assert!(!t.is_retryable());
        let s = ProxyError::PrefillStatus {
            target: "p:1".into(),
            status: 503,
            body: Bytes::new(),
        };
        assert!(s.is_retryable());
        let s = ProxyError::PrefillStatus {
            target: "p:1".into(),
            status: 500,
            body: Bytes::new(),
        };
        assert!(!s.is_retryable());
    }

    #[test]
    fn response_is_openai_json_with_code_header() {
        let resp = ProxyError::InvalidJson("eof".into()).into_response();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[ERROR_CODE_HEADER], "invalid_json");
    }
}
