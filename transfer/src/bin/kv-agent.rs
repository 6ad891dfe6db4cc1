//! `kv-agent`: hosts a KV-transfer agent over a KV pool (host memory,
//! optionally a shared mapping an engine process maps too, or GPU memory
//! with `--mem gpu:N`), and serves the gRPC control plane
//! (`transfer/proto/kv_agent.proto`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use transfer::cli::{allocate_or_exit, init_logging, LayoutArgs};
use transfer::{Agent, AgentConfig, BackendKind};

#[derive(Debug, Parser)]
#[command(
    name = "kv-agent",
    version,
    about = "Tandem KV-transfer agent (cuda-ipc, NIXL or TCP) with a gRPC control plane"
)]
struct Args {
    /// Control-plane (gRPC) address.
    #[arg(long, env = "TANDEM_KV_LISTEN", default_value = "127.0.0.1:7600")]
    listen: SocketAddr,
    /// Stable engine id (vLLM's engine_id); the agent name adds an instance suffix.
    #[arg(long, env = "TANDEM_KV_ENGINE_ID", default_value = "engine")]
    engine_id: String,
    /// Data plane: auto (cuda-ipc with peers on this host when the pool is
    /// GPU memory or a --shm file, NIXL otherwise), cuda-ipc, nixl (NIXL/UCX)
    /// or tcp (host pools).
    #[arg(long, env = "TANDEM_KV_BACKEND", default_value = "auto")]
    backend: BackendKind,
    /// TCP backend: data-plane address to bind (port 0 = any).
    #[arg(long, env = "TANDEM_KV_TCP_BIND", default_value = "127.0.0.1:0")]
    tcp_bind: SocketAddr,
    /// TCP backend: address peers dial, when it differs from the bound one.
    #[arg(long, env = "TANDEM_KV_TCP_ADVERTISE")]
    tcp_advertise: Option<SocketAddr>,
    #[command(flatten)]
    layout: LayoutArgs,
    /// Shared memory file holding the pool (created with the layout's size if
    /// missing). Without it the agent owns an anonymous pool.
    #[arg(long, env = "TANDEM_KV_SHM")]
    shm: Option<PathBuf>,
    /// Remove the --shm file on exit.
    #[arg(long, env = "TANDEM_KV_SHM_UNLINK")]
    shm_unlink: bool,
    /// Seconds a block held for a peer stays held without its notification.
    #[arg(long, env = "TANDEM_KV_HOLD_TIMEOUT", default_value_t = 480.0)]
    hold_timeout: f64,
    /// Default deadline of one transfer, seconds.
    #[arg(long, env = "TANDEM_KV_TRANSFER_TIMEOUT", default_value_t = 30.0)]
    transfer_timeout: f64,
    /// Requests in flight per transfer.
    #[arg(long, env = "TANDEM_KV_INFLIGHT", default_value_t = 4)]
    inflight: usize,
    /// Largest coalesced descriptor, bytes.
    #[arg(long, env = "TANDEM_KV_MAX_DESC_BYTES", default_value_t = 64 << 20)]
    max_desc_bytes: u64,
}

fn secs(what: &str, v: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        v.is_finite() && v > 0.0,
        "--{what} must be a positive number of seconds"
    );
    Ok(Duration::from_secs_f64(v))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging("info");
    let args = Args::parse();
    let layout = args
        .layout
        .layout()
        .context("--model/--block-size/--num-blocks/--tp-*")?;
    let shm = args.shm.as_deref().map(|p| (p, args.shm_unlink));
    let mem = allocate_or_exit("kv-agent", &layout, shm, args.layout.gpu_share)?;
    let mut cfg = AgentConfig::new(&args.engine_id, layout.clone(), args.backend);
    cfg.tcp_bind = args.tcp_bind;
    cfg.tcp_advertise = args.tcp_advertise;
    cfg.hold_timeout = secs("hold-timeout", args.hold_timeout)?;
    cfg.transfer_timeout = secs("transfer-timeout", args.transfer_timeout)?;
    cfg.inflight = args.inflight.max(1);
    cfg.plan_options.max_desc_bytes = args.max_desc_bytes;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let agent = Agent::start(cfg, Arc::new(mem)).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        agent = agent.name(),
        backend = %args.backend,
        data_planes = ?agent.backend_kinds(),
        memory = %layout.params().mem,
        layout = %layout,
        "kv-agent ready"
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    transfer::grpc::serve(agent, listener, shutdown).await?;
    Ok(())
}
