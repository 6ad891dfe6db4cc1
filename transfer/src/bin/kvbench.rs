//! `kvbench`: the lab benchmark for KV transfers. Moves one prompt's KV
//! blocks (a vLLM-shaped layout) between two agents, naive per-block plans
//! against coalesced ones, for several block placements, and prints a table,
//! writes JSON and a PNG chart. Two agents in one process (`kvbench run`), or
//! in two (`kvbench serve` on one side, `kvbench run --peer` on the other).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rand::rngs::StdRng;
use rand::SeedableRng;
use transfer::bench::{
    check_pattern, fill_pattern, memcpy_ceiling, place_blocks, CaseResult, LatencyStats, Placement,
    Report, RunLengths,
};
use transfer::cli::{init_logging, LayoutArgs};
use transfer::layout::KvLayout;
use transfer::{Agent, AgentConfig, BackendKind, HostMemory, Op, PlanKind, TransferSpec};

#[derive(Debug, Parser)]
#[command(
    name = "kvbench",
    version,
    about = "KV-transfer lab benchmark: naive vs coalesced plans over NIXL or TCP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the benchmark (against an in-process peer, or --peer).
    Run(RunArgs),
    /// Serve a filled pool for `kvbench run --peer` in another process.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Control-plane address to listen on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    #[arg(long, default_value = "nixl")]
    backend: BackendKind,
    #[command(flatten)]
    layout: LayoutArgs,
    /// Pattern seed of the pool; `run --peer-seed` must match to verify.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Peer `kvbench serve` control-plane address; without it the peer agent
    /// runs in this process.
    #[arg(long)]
    peer: Option<String>,
    /// Pattern seed the peer's pool was filled with (`serve --seed`).
    #[arg(long, default_value_t = 1)]
    peer_seed: u64,
    /// Backends, comma separated (with --peer: the peer's backend).
    #[arg(long, value_delimiter = ',', default_value = "nixl")]
    backend: Vec<BackendKind>,
    #[command(flatten)]
    layout: LayoutArgs,
    /// Prompt length in tokens: the transfer moves its blocks in every region.
    #[arg(long, default_value_t = 4096)]
    tokens: u64,
    /// Block placements, comma separated: contiguous, random, fragmented.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "contiguous,random,fragmented"
    )]
    placement: Vec<Placement>,
    /// Run lengths of fragmented placement: geometric:MEAN, uniform:MIN-MAX, fixed:N.
    #[arg(long, default_value = "geometric:8")]
    runs: RunLengths,
    /// Directions, comma separated: read (pull, as vLLM's decode does), write (push).
    #[arg(long, value_delimiter = ',', default_value = "read")]
    op: Vec<Op>,
    /// Plans, comma separated: naive (one descriptor per region and block, as
    /// vLLM's NixlConnector) and coalesced.
    #[arg(long, value_delimiter = ',', default_value = "naive,coalesced")]
    plan: Vec<PlanKind>,
    /// Measured transfers per case (after the warm-up).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Requests in flight per transfer.
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Largest coalesced descriptor, bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_desc_bytes: u64,
    /// Placement seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Per-transfer deadline, seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    #[arg(long, default_value = "bench-out/kvbench.json")]
    json: PathBuf,
    /// PNG chart path; "none" to skip.
    #[arg(long, default_value = "bench-out/kvbench.png")]
    png: PathBuf,
}

const LOCAL_SEED: u64 = 0x10CA1;

fn main() -> anyhow::Result<()> {
    init_logging("warn");
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Serve(a) => rt.block_on(serve(a)),
        Cmd::Run(a) => rt.block_on(run(a)),
    }
}

fn filled_pool(layout: &KvLayout, seed: u64) -> anyhow::Result<Arc<HostMemory>> {
    let len = usize::try_from(layout.total_bytes()).context("pool too large")?;
    let mem = HostMemory::anonymous(len).context("allocating the pool")?;
    refill(&mem, seed);
    Ok(Arc::new(mem))
}

fn refill(mem: &HostMemory, seed: u64) {
    // SAFETY: no transfer is running while the pool is (re)filled.
    let all = unsafe { mem.slice_mut(0, mem.len() as u64) }.expect("whole pool");
    fill_pattern(all, 0, seed);
}

fn agent_config(
    engine: &str,
    layout: &KvLayout,
    backend: BackendKind,
    inflight: usize,
    max_desc: u64,
) -> AgentConfig {
    let mut cfg = AgentConfig::new(engine, layout.clone(), backend);
    cfg.inflight = inflight.max(1);
    cfg.plan_options.max_desc_bytes = max_desc;
    cfg
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let layout = a.layout.layout()?;
    let mem = filled_pool(&layout, a.seed)?;
    let agent = Agent::start(
        agent_config("kvbench-serve", &layout, a.backend, 4, 64 << 20),
        mem,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    println!(
        "kvbench serve: {} on {} ({layout}), seed {}",
        a.backend,
        listener.local_addr()?,
        a.seed
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    transfer::grpc::serve(agent, listener, shutdown).await?;
    Ok(())
}

/// A peer agent in this process, serving its control plane on loopback.
async fn local_peer(
    layout: &KvLayout,
    backend: BackendKind,
    seed: u64,
) -> anyhow::Result<(String, Arc<Agent>)> {
    let mem = filled_pool(layout, seed)?;
    let agent = Agent::start(
        agent_config("kvbench-peer", layout, backend, 4, 64 << 20),
        mem,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let served = agent.clone();
    tokio::spawn(async move {
        if let Err(e) = transfer::grpc::serve(served, listener, std::future::pending()).await {
            eprintln!("kvbench: peer control plane failed: {e}");
        }
    });
    Ok((addr, agent))
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let layout = a.layout.layout()?;
    let blocks = layout.blocks_for_tokens(a.tokens);
    if blocks == 0 || blocks > layout.num_blocks() {
        bail!(
            "--tokens {} needs {blocks} blocks; the pool has --num-blocks {}",
            a.tokens,
            layout.num_blocks()
        );
    }
    let bytes = blocks as u64 * layout.bytes_per_block();
    eprintln!("kvbench: measuring the host memcpy ceiling");
    let memcpy = memcpy_ceiling(bytes as usize, 5);
    let mut results = Vec::new();
    let mut peer_desc = String::new();
    for &backend in &a.backend {
        let (endpoint, in_process) = match &a.peer {
            Some(p) => (p.clone(), None),
            None => {
                let (ep, agent) = local_peer(&layout, backend, a.peer_seed).await?;
                (ep, Some(agent))
            }
        };
        let peer_md = transfer::grpc::fetch_metadata(&endpoint)
            .await
            .with_context(|| format!("peer {endpoint}"))?;
        if peer_md.backend != backend {
            bail!(
                "peer {endpoint} runs the {} backend; pass --backend {}",
                peer_md.backend,
                peer_md.backend
            );
        }
        let peer_layout = peer_md.layout.clone();
        if blocks > peer_layout.num_blocks() {
            bail!(
                "the peer's pool has {} blocks; {blocks} needed",
                peer_layout.num_blocks()
            );
        }
        peer_desc = if in_process.is_some() {
            "in-process".into()
        } else {
            endpoint.clone()
        };
        let local_mem = filled_pool(&layout, LOCAL_SEED)?;
        let agent = Agent::start(
            agent_config(
                "kvbench-run",
                &layout,
                backend,
                a.inflight,
                a.max_desc_bytes,
            ),
            local_mem.clone(),
        )
        .await?;
        // Reads first: writes change the peer's bytes, and reads check them.
        let mut ops = a.op.clone();
        ops.sort_by_key(|op| matches!(op, Op::Write));
        let mut refilled = false;
        for &op in &ops {
            if op == Op::Write && !refilled {
                refill(&local_mem, LOCAL_SEED);
                refilled = true;
            }
            for &placement in &a.placement {
                // Both plans move the same block ids, drawn per repetition.
                let mut rng = StdRng::seed_from_u64(a.seed ^ placement as u64);
                let maps: Vec<(Vec<u32>, Vec<u32>)> = (0..a.reps + a.warmup)
                    .map(|_| {
                        (
                            place_blocks(placement, blocks, layout.num_blocks(), a.runs, &mut rng),
                            place_blocks(
                                placement,
                                blocks,
                                peer_layout.num_blocks(),
                                a.runs,
                                &mut rng,
                            ),
                        )
                    })
                    .collect();
                for &plan in &a.plan {
                    eprintln!("kvbench: {backend} {op} {placement} {plan}");
                    let mut samples = Vec::with_capacity(a.reps);
                    let mut descriptors = 0;
                    let mut verified = false;
                    for (i, (local, remote)) in maps.iter().enumerate() {
                        let spec = TransferSpec {
                            request_id: format!("kvbench-{i}"),
                            peer: endpoint.clone(),
                            op,
                            local_blocks: local.clone(),
                            remote_blocks: remote.clone(),
                            plan,
                            timeout: Some(Duration::from_secs_f64(a.timeout)),
                            notify: None,
                            remote_instance_id: None,
                        };
                        let t = Instant::now();
                        let done = agent
                            .transfer(spec, |_| {})
                            .await
                            .with_context(|| format!("{backend} {op} {placement} {plan}"))?;
                        let elapsed = t.elapsed();
                        descriptors = done.descriptors;
                        if i < a.warmup {
                            continue;
                        }
                        samples.push(elapsed);
                        if i == a.warmup {
                            verified = verify(
                                op,
                                &layout,
                                &peer_layout,
                                &local_mem,
                                in_process.as_deref(),
                                local,
                                remote,
                                a.peer_seed,
                            )?;
                        }
                    }
                    let latency = LatencyStats::of(&samples);
                    results.push(CaseResult {
                        backend: backend.to_string(),
                        op: op.to_string(),
                        placement,
                        plan: plan.to_string(),
                        bytes,
                        descriptors,
                        reps: samples.len(),
                        latency,
                        gbps_p50: bytes as f64 / (latency.p50_us / 1e6) / 1e9,
                        verified,
                    });
                }
            }
        }
    }
    let report = Report {
        layout: layout.to_string(),
        tokens: a.tokens,
        blocks,
        bytes_per_transfer: bytes,
        pool_blocks: layout.num_blocks(),
        peer: peer_desc,
        run_lengths: a.runs.to_string(),
        inflight: a.inflight,
        max_desc_bytes: a.max_desc_bytes,
        memcpy_gbps: memcpy,
        results,
    };
    print!("{}", report.table());
    if let Some(dir) = a.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", a.json.display()))?;
    println!("wrote {}", a.json.display());
    if a.png.as_os_str() != "none" {
        if let Some(dir) = a.png.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        report
            .chart()
            .write_png(&a.png, 960, 540)
            .with_context(|| format!("writing {}", a.png.display()))?;
        println!("wrote {}", a.png.display());
    }
    Ok(())
}

/// Checks every destination byte of one transfer. READ: our blocks must hold
/// the peer's pattern at the remote offsets. WRITE: the peer's blocks must
/// hold ours (only when the peer is in this process).
#[allow(clippy::too_many_arguments)]
fn verify(
    op: Op,
    layout: &KvLayout,
    peer_layout: &KvLayout,
    local_mem: &HostMemory,
    peer: Option<&Agent>,
    local: &[u32],
    remote: &[u32],
    peer_seed: u64,
) -> anyhow::Result<bool> {
    let (dst_mem, dst_layout, src_layout, dst_ids, src_ids, seed) = match (op, peer) {
        (Op::Read, _) => (local_mem, layout, peer_layout, local, remote, peer_seed),
        (Op::Write, Some(p)) => (
            p.memory().as_ref(),
            peer_layout,
            layout,
            remote,
            local,
            LOCAL_SEED,
        ),
        (Op::Write, None) => return Ok(false),
    };
    let len = layout.block_len();
    for region in 0..layout.num_regions() {
        for (&d, &s) in dst_ids.iter().zip(src_ids) {
            // SAFETY: the transfer has completed; nothing writes these blocks now.
            let got = unsafe { dst_mem.slice(dst_layout.block_offset(region, d), len) }
                .context("block out of range")?;
            if let Some(at) = check_pattern(got, src_layout.block_offset(region, s), seed) {
                bail!(
                    "verification failed: {op} region {} block {d} (from {s}) differs at byte {at}{}",
                    layout.region_name(region),
                    if op == Op::Read { "; does --peer-seed match the peer's --seed?" } else { "" }
                );
            }
        }
    }
    Ok(true)
}
