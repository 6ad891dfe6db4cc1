//! The engine simulator: a real HTTP server that stands in for a vLLM engine, speaking vLLM's
//! OpenAI API plus the P/D `kv_transfer_params` protocol (DESIGN.md "Engine simulator"). Its KV
//! blocks are real bytes in a host pool owned by a KV-transfer agent (`kv`): a prefill computes
//! them, a decode pulls them over TCP or NIXL and checks every byte. With `--kv-events-config` it
//! publishes vLLM's KV events over ZMQ (`events`).
//!
//! Endpoints: `POST /v1/completions`, `/v1/chat/completions` (streaming or not),
//! `/v1/messages` (Anthropic's shape), `/v1/responses` and `/inference/v1/generate`
//! (non-streaming only; vLLM's `cache_hit_threshold` declines a request whose prompt is too
//! little cached with finish reason `cache_threshold` and no output), `GET /v1/models`,
//! `/health`, `/metrics`, `POST /reset_prefix_cache`; test controls under `/sim/`:
//! `GET|POST /sim/faults`, `POST /sim/release`, `GET|DELETE /sim/requests`, `GET /sim/state`.

pub mod blocks;
pub mod config;
pub mod error;
pub mod events;
pub mod faults;
pub mod generate;
pub mod kv;
pub mod metrics;
pub mod openai;
pub mod pd;
pub mod record;
pub mod sched;
pub mod server;
pub mod tokens;

use axum::serve::ListenerExt;
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::future::IntoFuture;

use anyhow::Context;

pub use config::Config;
pub use server::{router, AppState};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Runs the simulator until SIGINT/SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    tracing::debug!(?cfg, "effective config");
    let (host, port, listen_after) = (cfg.host.clone(), cfg.port, cfg.listen_after_ms);
    let state = AppState::new(cfg).await?;
    tokio::spawn(server::expire_holds(Arc::clone(&state)));
    if listen_after > 0 {
        tracing::info!(ms = listen_after, "delaying the listening socket");
        tokio::time::sleep(Duration::from_millis(listen_after)).await;
    }
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .with_context(|| format!("binding {host}:{port}"))?;
    let addr = listener.local_addr()?;
    state.port.store(addr.port(), Ordering::Relaxed);
    tracing::info!(
        %addr,
        model = %state.cfg.model,
        engine_id = %state.engine_id,
        "engine-sim listening"
    );
    if state.cfg.mooncake_bootstrap_port != 0 {
        let port = state.cfg.mooncake_bootstrap_port;
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("binding the Mooncake bootstrap port {host}:{port}"))?;
        tokio::spawn(
            axum::serve(listener, server::mooncake_bootstrap(Arc::clone(&state))).into_future(),
        );
    }
    let kv_events = state.kv_events.clone();
    let app = router(state);
    tokio::select! {
        // Without TCP_NODELAY each SSE event waits for the peer's delayed ACK (~40 ms).
        r = axum::serve(listener.tap_io(|tcp| { let _ = tcp.set_nodelay(true); }), app) => r.context("serving")?,
        () = shutdown_signal() => tracing::info!("shutting down"),
    }
    if let Some(events) = kv_events {
        events.shutdown().await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
