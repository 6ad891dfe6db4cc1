//! Listeners and cross-cutting middleware: the main port (plain or TLS), one
//! port per extra data-parallel rank, the metrics port, request ids, in-flight
//! accounting, and graceful shutdown on SIGTERM.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use http::HeaderValue;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, AppState, Shared, REQUEST_ID_HEADER};

/// The request's `x-request-id`, set to a new uuid when the client sent none (or an empty one).
pub fn ensure_request_id(req: &mut Request) -> HeaderValue {
    match req.headers().get(REQUEST_ID_HEADER) {
        Some(v) if !v.is_empty() => v.clone(),
        _ => {
            let generated = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .expect("a uuid is a valid header value");
            req.headers_mut()
                .insert(REQUEST_ID_HEADER, generated.clone());
            generated
        }
    }
}

/// Keeps the client's `x-request-id` (or makes one), so both legs and the
/// client see the same id; counts requests in flight.
async fn request_context(
    State(metrics): State<Arc<Metrics>>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = ensure_request_id(&mut req);
    let span = tracing::debug_span!("request", id = ?id, path = %req.uri().path());
    metrics.in_flight.inc();
    // Dropped with the response body: when its last byte is sent or the
    // client goes, not when the head is (a stream is in flight until then).
    let in_flight = InFlight(metrics.clone());
    let resp = tracing::Instrument::instrument(next.run(req), span).await;
    let (mut parts, body) = resp.into_parts();
    parts.headers.insert(REQUEST_ID_HEADER, id);
    Response::from_parts(
        parts,
        axum::body::Body::new(Tracked {
            inner: body,
            _in_flight: in_flight,
        }),
    )
}

/// One request counted in `in_flight_requests` until dropped.
struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// A response body that keeps its request counted in flight.
struct Tracked {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pub fn router(state: AppState) -> Router {
    let metrics = state.shared.metrics.clone();
    Router::new()
        .route("/health", get(proxy::health))
        .route("/ready", get(proxy::ready))
        .route("/v1/completions", post(proxy::pd_handler))
        .route("/v1/chat/completions", post(proxy::pd_handler))
        .route("/v1/responses", post(proxy::pd_handler))
        .route("/inference/v1/generate", post(proxy::pd_handler))
        .fallback(proxy::passthrough)
        .with_state(state)
        .layer(middleware::from_fn_with_state(metrics, request_context))
}

fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    m.render(),
                )
            }),
        )
        .with_state(metrics)
}

/// Accepts connections until `shutdown` flips, then lets open connections finish
/// their in-flight requests for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30));
            let result = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls_stream) => {
                        watcher
                            .watch(builder.serve_connection(TokioIo::new(tls_stream), service))
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %peer, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), service))
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!(?grace, "grace period over; closing remaining connections"),
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn termination_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Binds every listener, then serves until a termination signal.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let tls = if cfg.secure_proxy {
        let server_cfg =
            crate::tls::server_config(cfg.cert_path.as_deref()).map_err(anyhow::Error::msg)?;
        Some(TlsAcceptor::from(server_cfg))
    } else {
        None
    };
    let grace = cfg.shutdown_grace_period;
    let shared = Arc::new(Shared::new(cfg.clone(), metrics.clone()).map_err(anyhow::Error::msg)?);
    let (stop_tx, stop_rx) = watch::channel(false);

    // Data parallelism: rank r's sidecar port is port+r and its engine model-server-port+r.
    let pod_ip = std::env::var("POD_IP").unwrap_or_default();
    let rank_authority = |rank: u16| format!("{}:{}", cfg.decode_host, cfg.decode_port + rank);
    let dp_ranks = (cfg.data_parallel_size > 1).then(|| {
        let mut ranks = HashMap::new();
        for rank in 0..cfg.data_parallel_size {
            for host in [pod_ip.as_str(), "localhost", "127.0.0.1"]
                .into_iter()
                .filter(|h| !h.is_empty())
            {
                ranks.insert(format!("{host}:{}", cfg.port + rank), rank_authority(rank));
            }
        }
        Arc::new(ranks)
    });

    let mut tasks = Vec::new();
    for rank in 0..cfg.data_parallel_size {
        let addr = format!("{}:{}", cfg.bind, cfg.port + rank);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let state = AppState {
            shared: shared.clone(),
            decode_authority: rank_authority(rank).into(),
            dp_ranks: if rank == 0 { dp_ranks.clone() } else { None },
        };
        tracing::info!(
            addr = %listener.local_addr()?,
            decode = %state.decode_authority,
            tls = tls.is_some(),
            connector = cfg.connector.as_str(),
            "pd-sidecar listening"
        );
        tasks.push(tokio::spawn(serve(
            listener,
            router(state),
            tls.clone(),
            stop_rx.clone(),
            grace,
        )));
    }
    if cfg.metrics_port != 0 {
        let addr = format!("{}:{}", cfg.bind, cfg.metrics_port);
        tasks.push(spawn_metrics(&addr, metrics_router(metrics), stop_rx.clone(), grace).await?);
    }
    drain_on_signal(stop_tx, tasks, grace).await;
    Ok(())
}

/// Binds the metrics listener at `addr` and serves `app` there (plain HTTP).
pub async fn spawn_metrics(
    addr: &str,
    app: Router,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--metrics-port): {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    Ok(tokio::spawn(serve(listener, app, None, shutdown, grace)))
}

/// Waits for a termination signal, then tells the servers to stop accepting
/// and waits while they drain (each for up to `grace`).
pub async fn drain_on_signal(
    stop: watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    grace: Duration,
) {
    termination_signal().await;
    tracing::info!(?grace, "termination signal: draining");
    let _ = stop.send(true);
    for server in servers {
        let _ = server.await;
    }
}
