//! `pd-router`: picks the prefill/decode pair for each OpenAI request and
//! forwards it to the decode pod's pd-sidecar, naming the prefill engine in
//! `x-prefiller-host-port`.
//!
//! Life of a request: `bin/pd-router` -> [`config`] (flags, EndpointPickerConfig
//! YAML) -> this module's listeners and middleware -> [`proxy`] (read, parse,
//! forward, stream back) -> [`pick`] (decode profile, P/D decider, prefill
//! profile) over [`prefix`] (prompt bytes, block hashes, per-endpoint LRU).
//! Engine clients and error bodies are the sidecar's ([`crate::upstream`],
//! [`crate::error`]).

pub mod config;
pub mod metrics;
pub mod pick;
pub mod prefix;
pub mod proxy;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use http::HeaderValue;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::UpstreamTls;
use crate::proxy::REQUEST_ID_HEADER;
use crate::server::{serve, termination_signal};
use config::RouterConfig;
use metrics::RouterMetrics;
use pick::{Endpoint, Scheduler};
use proxy::{AppState, RouterState};

/// Keeps the client's `x-request-id` (or makes one) so the sidecar, both
/// engines and the client see the same id.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(REQUEST_ID_HEADER) {
        Some(v) if !v.is_empty() => v.clone(),
        _ => {
            let generated = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .expect("a uuid is a valid header value");
            req.headers_mut()
                .insert(REQUEST_ID_HEADER, generated.clone());
            generated
        }
    };
    let span = tracing::debug_span!("request", id = ?id, path = %req.uri().path());
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    resp
}

/// The main listener's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(proxy::health))
        .route("/ready", get(proxy::health))
        .route("/v1/completions", post(proxy::routed))
        .route("/v1/chat/completions", post(proxy::routed))
        .route("/v1/responses", post(proxy::routed))
        .route("/inference/v1/generate", post(proxy::routed))
        .fallback(proxy::passthrough)
        .with_state(state)
        .layer(middleware::from_fn(request_id))
}

fn metrics_router(metrics: Arc<RouterMetrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<RouterMetrics>>| async move {
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

/// The shared state of a router built from `cfg`.
pub fn state(cfg: RouterConfig) -> AppState {
    let metrics = Arc::new(RouterMetrics::new());
    let lru = cfg.scheduling.prefix.lru_capacity;
    let endpoint = |label: String| {
        let gauge = metrics.inflight_gauge(&label);
        Arc::new(Endpoint::new(label, gauge, lru))
    };
    let decode = cfg.decode.iter().map(|d| endpoint(d.label())).collect();
    let prefill = cfg.prefill.iter().map(|p| endpoint(p.clone())).collect();
    let scheduler = Scheduler::new(&cfg.scheduling, decode, prefill);
    let client = crate::upstream::build_client(
        UpstreamTls {
            enabled: true,
            insecure_skip_verify: cfg.tls_insecure_skip_verify,
        },
        cfg.upstream_idle_timeout,
        cfg.max_idle_conns_per_host,
    );
    Arc::new(RouterState {
        cfg,
        scheduler,
        client,
        metrics,
    })
}

/// Binds the listeners, then serves until a termination signal.
pub async fn run(cfg: RouterConfig) -> anyhow::Result<()> {
    let grace = cfg.shutdown_grace_period;
    let addr = format!("{}:{}", cfg.bind, cfg.port);
    let metrics_addr =
        (cfg.metrics_port != 0).then(|| format!("{}:{}", cfg.bind, cfg.metrics_port));
    let state = state(cfg);
    let (stop_tx, stop_rx) = watch::channel(false);

    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let s = &state.cfg.scheduling;
    tracing::info!(
        addr = %listener.local_addr()?,
        decode = ?state.cfg.decode.iter().map(|d| d.label()).collect::<Vec<_>>(),
        prefill = ?state.cfg.prefill,
        threshold_tokens = s.threshold,
        block_size = s.prefix.block_size,
        "pd-router listening"
    );
    let mut tasks = vec![tokio::spawn(serve(
        listener,
        router(state.clone()),
        None,
        stop_rx.clone(),
        grace,
    ))];
    if let Some(addr) = metrics_addr {
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--metrics-port): {e}"))?;
        tracing::info!(addr = %listener.local_addr()?, "metrics listening");
        tasks.push(tokio::spawn(serve(
            listener,
            metrics_router(state.metrics.clone()),
            None,
            stop_rx.clone(),
            grace,
        )));
    }

    termination_signal().await;
    tracing::info!(?grace, "termination signal: draining");
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}
