//! Engine clients: pooled HTTP/1.1 connections to the local decode engine and to
//! prefill engines, and the one place that classifies upstream failures.

use std::error::Error as _;
use std::io::ErrorKind;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamTls;
use crate::tls;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

pub fn build_client(tls_cfg: UpstreamTls, idle: Duration, max_idle: usize) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls::client_config(tls_cfg.insecure_skip_verify))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(max_idle)
        .build(https)
}

/// How an upstream call failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made (refused, unreachable, connect timeout).
    Connect(String),
    /// The connection broke before a response arrived.
    Other(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(d) | UpstreamError::Other(d) => f.write_str(d),
        }
    }
}

fn describe(err: &hyper_util::client::legacy::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// A pooled connection the engine had already closed: the request never got a
/// response byte and can be sent again on a fresh connection.
fn is_stale_connection(err: &hyper_util::client::legacy::Error) -> bool {
    if err.is_connect() {
        return false;
    }
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
            ) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

fn classify(err: hyper_util::client::legacy::Error) -> UpstreamError {
    if err.is_connect() {
        UpstreamError::Connect(describe(&err))
    } else {
        UpstreamError::Other(describe(&err))
    }
}

fn build(method: &Method, uri: &Uri, headers: &HeaderMap, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    req
}

/// Sends a request whose body is in memory; retried once when a pooled
/// connection turns out to be stale (the 502s llm-d users see when the proxy's
/// keep-alive outlives uvicorn's).
pub async fn send_buffered(
    client: &HttpClient,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response<Incoming>, UpstreamError> {
    match client
        .request(build(method, uri, headers, Body::from(body.clone())))
        .await
    {
        Ok(resp) => Ok(resp),
        Err(err) if is_stale_connection(&err) => {
            tracing::debug!(error = %describe(&err), %uri, "stale pooled connection, retrying once");
            client
                .request(build(method, uri, headers, Body::from(body)))
                .await
                .map_err(classify)
        }
        Err(err) => Err(classify(err)),
    }
}

/// Sends a streaming request (passthrough); it cannot be replayed.
pub async fn send_streaming(
    client: &HttpClient,
    req: Request<Body>,
) -> Result<Response<Incoming>, UpstreamError> {
    client.request(req).await.map_err(classify)
}
