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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
        .route("/v1/messages", post(proxy::pd_handler))
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
    let mut backoff = AcceptBackoff::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff.reset();
                    conn
                }
                Err(e) => {
                    // Out of descriptors (EMFILE) the same error comes back at
                    // once: retrying at once would spin a core and flood the log.
                    let pause = backoff.failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = shutdown.changed() => break,
                    }
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
                // A handshake that never completes (idle or half-sent
                // ClientHello) must not hold the socket for ever.
                Some(acceptor) => {
                    match tokio::time::timeout(tls_handshake_timeout(), acceptor.accept(stream))
                        .await
                    {
                        // HTTP/2 when the client chose it (ALPN), as Go's TLS server offers it.
                        Ok(Ok(tls_stream))
                            if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") =>
                        {
                            let mut h2 =
                                hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                            h2.timer(TokioTimer::new());
                            watcher
                                .watch(h2.serve_connection(TokioIo::new(tls_stream), service))
                                .await
                        }
                        Ok(Ok(tls_stream)) => {
                            watcher
                                .watch(builder.serve_connection(TokioIo::new(tls_stream), service))
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
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
        // Watched: a renewed Secret is served to new connections without a
        // restart, and one mounted after start replaces the self-signed one.
        let store =
            crate::tls::CertStore::load(cfg.cert_path.as_deref()).map_err(anyhow::Error::msg)?;
        store.watch(crate::tls::cert_reload_interval());
        let server_cfg = crate::tls::server_config_with(store).map_err(anyhow::Error::msg)?;
        Some(TlsAcceptor::from(server_cfg))
    } else {
        None
    };
    let grace = cfg.shutdown_grace_period;
    let shared = Arc::new(Shared::new(cfg.clone(), metrics.clone()).map_err(anyhow::Error::msg)?);
    // SSRF protection from an InferencePool: watch it and its pods; until
    // their first lists arrive no pool target is allowed.
    if let (Some(pool), Some(endpoints)) = (
        cfg.ssrf.as_ref().and_then(|s| s.pool.clone()),
        shared.guard.as_ref().and_then(|g| g.pool.clone()),
    ) {
        let client = crate::pool::client().await.map_err(anyhow::Error::msg)?;
        tracing::info!(pool = %pool, "SSRF protection: watching the InferencePool's ready pods");
        crate::pool::spawn(client, pool, endpoints);
    }
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
        let port = cfg.port + rank;
        let listener = listen(&cfg.bind, port)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} port {port}: {e}", cfg.bind))?;
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
        tasks.push(
            spawn_metrics(
                &cfg.bind,
                cfg.metrics_port,
                metrics_router(metrics),
                stop_rx.clone(),
                grace,
            )
            .await?,
        );
    }
    drain_on_signal(stop_tx, tasks, grace).await;
    Ok(())
}

/// Listens on `bind`:`port`. `::` (the default) is every interface, IPv6 and
/// IPv4 alike, as Go's `net.Listen(":port")` in llm-d's sidecar; on a host
/// without IPv6 it falls back to `0.0.0.0`. `0.0.0.0` is IPv4 only.
pub async fn listen(bind: &str, port: u16) -> std::io::Result<TcpListener> {
    match bind.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) if ip.is_unspecified() => match dual_stack(port) {
            Ok(l) => Ok(l),
            Err(e) => {
                tracing::debug!(error = %e, "no IPv6 listener; listening on IPv4 only");
                TcpListener::bind(("0.0.0.0", port)).await
            }
        },
        Ok(ip) => TcpListener::bind((ip, port)).await,
        // A host name: whatever it resolves to first.
        Err(_) => TcpListener::bind((bind, port)).await,
    }
}

/// `[::]:port` with IPV6_V6ONLY off, whatever the host's default
/// (`net.ipv6.bindv6only`), so IPv4 clients reach it too.
fn dual_stack(port: u16) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let socket = tokio::net::TcpSocket::new_v6()?;
    let off: libc::c_int = 0;
    // SAFETY: a valid socket descriptor and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.set_reuseaddr(true)?;
    socket.bind((std::net::Ipv6Addr::UNSPECIFIED, port).into())?;
    socket.listen(1024)
}

/// Binds the metrics listener at `bind`:`port` and serves `app` there (plain HTTP).
pub async fn spawn_metrics(
    bind: &str,
    port: u16,
    app: Router,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = listen(bind, port).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {bind} port {port} (--metrics-port): {e}")
    })?;
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

/// `var` in milliseconds, or `default_ms` when unset or not a number.
pub fn env_duration_ms(var: &str, default_ms: u64) -> Duration {
    let ms = std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .unwrap_or(default_ms);
    Duration::from_millis(ms)
}

/// How long a TLS client has to finish its handshake
/// (`TANDEM_TLS_HANDSHAKE_TIMEOUT_MS`, default 10 s).
pub fn tls_handshake_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| env_duration_ms("TANDEM_TLS_HANDSHAKE_TIMEOUT_MS", 10_000))
}

/// Accept failures of every listener of this process, for both binaries'
/// `accept_errors_total`.
pub static ACCEPT_ERRORS: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
    std::sync::LazyLock::new(Default::default);

/// Pauses after failed accepts, doubling from 5 ms to 1 s, and logs at most
/// one warning every 5 s with the count of those it held back.
#[derive(Default)]
struct AcceptBackoff {
    pause: Duration,
    last_log: Option<std::time::Instant>,
    held_back: u64,
}

impl AcceptBackoff {
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        ACCEPT_ERRORS.inc();
        self.pause = (self.pause * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            tracing::warn!(
                error = %e,
                held_back = self.held_back,
                pause_ms = self.pause.as_millis() as u64,
                "accept failed; pausing before the next"
            );
            self.last_log = Some(std::time::Instant::now());
            self.held_back = 0;
        } else {
            self.held_back += 1;
        }
        self.pause
    }

    fn reset(&mut self) {
        self.pause = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_default_address_takes_ipv4_and_ipv6_clients() {
        let listener = listen("::", 0).await.unwrap();
        let at = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            for _ in 0..2 {
                let _ = listener.accept().await;
            }
        });
        tokio::net::TcpStream::connect(("127.0.0.1", at.port()))
            .await
            .expect("an IPv4 client");
        // Only where the host has IPv6 (else the listener fell back to IPv4).
        if at.is_ipv6() {
            tokio::net::TcpStream::connect(("::1", at.port()))
                .await
                .expect("an IPv6 client");
        }
        accept.abort();
        let v4 = listen("127.0.0.1", 0).await.unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
    }

    #[test]
    fn accept_failures_back_off_and_log_rarely() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let before = ACCEPT_ERRORS.get();
        let pauses: Vec<u64> = (0..10).map(|_| b.failed(&e).as_millis() as u64).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(b.held_back, 9, "one warning, nine held back");
        assert!(ACCEPT_ERRORS.get() >= before + 10);
        b.reset();
        assert_eq!(b.failed(&e), Duration::from_millis(5));
    }
}
