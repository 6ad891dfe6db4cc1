//! Every path that is not a P/D route, and the sidecar's own probes.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::header;
use http::StatusCode;

use super::{
    client_addr, client_response, decode_error, forward_headers, stream_broken, upstream_uri,
    AppState,
};
use crate::body::Observed;
use crate::error::ProxyError;
use crate::metrics::Decision;
use crate::upstream;

/// Every other path: to the local engine untouched, bodies streamed both ways.
pub async fn passthrough(State(state): State<AppState>, req: Request) -> Response {
    let shared = &state.shared;
    let (parts, body) = req.into_parts();
    let peer = client_addr(&parts);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = match upstream_uri(shared.decode_scheme(), &state.decode_authority, path) {
        Ok(uri) => uri,
        Err(err) => return err.into_response(),
    };
    let mut headers = forward_headers(&parts.headers, peer);
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, len.clone());
    }
    let mut out = http::Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = headers;
    shared.metrics.count("other", Decision::passthrough);
    let start = Instant::now();
    match upstream::send_streaming(&shared.decode_client, out).await {
        Ok(resp) => {
            let metrics = shared.metrics.clone();
            let on_first = Box::new(move || {
                metrics
                    .decode_first_byte
                    .observe(start.elapsed().as_secs_f64())
            });
            let (parts, body) = resp.into_parts();
            client_response(
                parts,
                Body::new(
                    Observed::new(body, on_first, None).on_error(stream_broken(&shared.metrics)),
                ),
            )
        }
        Err(err) => {
            let err = decode_error(err);
            shared.metrics.error(err.code());
            err.into_response()
        }
    }
}

/// Liveness: the sidecar itself is up.
pub async fn health() -> StatusCode {
    StatusCode::OK
}

/// Readiness: 200 only when the decode engine's `/health` answers 200.
pub async fn ready(State(state): State<AppState>) -> Response {
    let shared = &state.shared;
    let uri = match upstream_uri(shared.decode_scheme(), &state.decode_authority, "/health") {
        Ok(uri) => uri,
        Err(err) => return err.into_response(),
    };
    let mut req = http::Request::new(Body::empty());
    *req.uri_mut() = uri;
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        upstream::send_streaming(&shared.decode_client, req),
    );
    match probe.await {
        Ok(Ok(resp)) if resp.status() == StatusCode::OK => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":"ready"}"#,
        )
            .into_response(),
        _ => ProxyError::NotReady.into_response(),
    }
}
