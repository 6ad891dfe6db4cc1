//! `kvbench`: the lab benchmark for KV transfers. Moves one prompt's KV
//! blocks (a vLLM-shaped layout) between two agents, naive per-block plans
//! against coalesced ones, for several block placements, in host or GPU
//! memory (`--mem`, `--peer-mem`), and prints a table (GB/s and the fraction
//! of the copy ceiling measured in the same run), writes JSON and a PNG
//! chart. Two agents in one process (`kvbench run`), or in two (`kvbench
//! serve` on one side, `kvbench run --peer` on the other). `--region-alloc
//! separate` gives each region its own allocation, registered as an
//! engine's lent memory (vLLM's per-layer tensors).

mod verify;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rand::rngs::StdRng;
use rand::SeedableRng;
use transfer::bench::{
    fill_pattern, memcpy_ceiling, place_blocks, CaseResult, Ceilings, LatencyStats, Placement,
    Report, RunLengths,
};
use transfer::cli::{
    allocate_or_exit, allocate_separate_or_exit, init_logging, LayoutArgs, RegionAlloc,
};
use transfer::gpu::copy::CopyMethod;
use transfer::gpu::GpuShare;
use transfer::layout::{KvLayout, MemKind};
use transfer::{Agent, AgentConfig, BackendKind, KvMemory, Op, PlanKind, TransferSpec};
use verify::{verify, verify_write_by_readback};

#[derive(Debug, Parser)]
#[command(
    name = "kvbench",
    version,
    about = "KV-transfer lab benchmark: naive vs coalesced plans over cuda-ipc, NIXL or TCP, host or GPU memory"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the benchmark (against an in-process peer, or --peer).
    Run(Box<RunArgs>),
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
    /// Keep a host pool in this shared file, so that a GPU peer on this host
    /// can read it by cuda-ipc (DRAM -> VRAM). Removed on exit.
    #[arg(long)]
    shm: Option<PathBuf>,
    /// one: the pool is one allocation; separate: one allocation per region
    /// (host mappings or cuMemAllocs), registered as an engine's lent memory.
    #[arg(long, default_value = "one")]
    region_alloc: RegionAlloc,
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
    /// Backends, comma separated: cuda-ipc, nixl, tcp, auto (with --peer:
    /// ones the peer offers).
    #[arg(long, value_delimiter = ',', default_value = "nixl")]
    backend: Vec<BackendKind>,
    #[command(flatten)]
    layout: LayoutArgs,
    /// Memory of the in-process peer's pool (host or gpu:N); default: --mem.
    /// With --peer, the peer's own --mem decides.
    #[arg(long)]
    peer_mem: Option<MemKind>,
    /// one: each pool is one allocation; separate: one allocation per region
    /// (host mappings or cuMemAllocs), registered as an engine's lent memory
    /// (ours and the in-process peer's; with --peer, its own flag decides).
    #[arg(long, default_value = "one")]
    region_alloc: RegionAlloc,
    /// cuda-ipc copy methods to compare, comma separated: auto, kernel
    /// (one gather launch), memcpy (cuMemcpyAsync per descriptor).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    copy: Vec<CopyMethod>,
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
    /// vLLM's NixlConnector), coalesced, and blocks (block ids to the
    /// device: cuda-ipc between GPU pools; coalesced elsewhere). Default:
    /// naive,coalesced, plus blocks with a GPU pool.
    #[arg(long, value_delimiter = ',')]
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
    /// Idle time before each transfer, milliseconds: an engine pulls one
    /// request's KV now and then, not back to back, and a path that ran a
    /// moment ago (caches, clocks) is faster than one that idled.
    #[arg(long, default_value_t = 0)]
    gap_ms: u64,
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
        Cmd::Run(a) => rt.block_on(run(*a)),
    }
}

fn filled_pool(
    layout: &KvLayout,
    seed: u64,
    shm: Option<&Path>,
    share: GpuShare,
    alloc: RegionAlloc,
) -> anyhow::Result<Arc<KvMemory>> {
    let mem = match alloc {
        RegionAlloc::One => allocate_or_exit("kvbench", layout, shm.map(|p| (p, true)), share)?,
        RegionAlloc::Separate => {
            if shm.is_some() {
                bail!("--shm keeps a pool in one file: it takes --region-alloc one");
            }
            if share == GpuShare::Fd && layout.params().mem != MemKind::Host {
                bail!(
                    "--region-alloc separate lends cuMemAlloc regions, shared by legacy CUDA IPC: \
                     it takes --gpu-share ipc"
                );
            }
            allocate_separate_or_exit("kvbench", layout)?
        }
    };
    refill(&mem, seed)?;
    Ok(Arc::new(mem))
}

/// Fills the whole pool with the pattern of `seed`, on every core: in place
/// for host memory, through host chunks uploaded for GPU memory. No chunk
/// crosses a region of a pool whose regions are separate allocations.
fn refill(mem: &KvMemory, seed: u64) -> anyhow::Result<()> {
    const CHUNK: usize = 64 << 20;
    let len = mem.len();
    let span = mem.region_map().map_or(len, |m| m.region_len() as usize);
    let chunks: Vec<(usize, usize)> = (0..len)
        .step_by(span)
        .flat_map(|start| {
            let end = (start + span).min(len);
            (start..end)
                .step_by(CHUNK)
                .map(move |off| (off, CHUNK.min(end - off)))
        })
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(16);
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(off, n)) = chunks.get(i) else {
                            return Ok(());
                        };
                        match mem.host() {
                            Some(h) => {
                                // SAFETY: no transfer runs while the pool is
                                // (re)filled, and each chunk has one writer.
                                let dst = unsafe { h.slice_mut(off as u64, n as u64) }
                                    .context("chunk in range")?;
                                fill_pattern(dst, off as u64, seed);
                            }
                            None => {
                                buf.resize(n, 0);
                                fill_pattern(&mut buf, off as u64, seed);
                                mem.write(off as u64, &buf)?;
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("fill thread panicked"))??;
        }
        Ok(())
    })
}

fn agent_config(
    engine: &str,
    layout: &KvLayout,
    backend: BackendKind,
    inflight: usize,
    max_desc: u64,
    copy: CopyMethod,
) -> AgentConfig {
    let mut cfg = AgentConfig::new(engine, layout.clone(), backend);
    cfg.inflight = inflight.max(1);
    cfg.plan_options.max_desc_bytes = max_desc;
    cfg.copy_method = copy;
    cfg
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let layout = a.layout.layout()?;
    let mem = filled_pool(
        &layout,
        a.seed,
        a.shm.as_deref(),
        a.layout.gpu_share,
        a.region_alloc,
    )?;
    let agent = Agent::start(
        agent_config(
            "kvbench-serve",
            &layout,
            a.backend,
            4,
            64 << 20,
            CopyMethod::Auto,
        ),
        mem,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    println!(
        "kvbench serve: {} ({}) on {} ({layout}, {}, {} allocation{}), seed {}",
        a.backend,
        agent
            .backend_kinds()
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(","),
        listener.local_addr()?,
        layout.params().mem,
        a.region_alloc,
        if a.region_alloc == RegionAlloc::Separate {
            " per region"
        } else {
            ""
        },
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
    share: GpuShare,
    alloc: RegionAlloc,
) -> anyhow::Result<(String, Arc<Agent>, tokio::sync::oneshot::Sender<()>)> {
    let mem = filled_pool(layout, seed, None, share, alloc)?;
    let agent = Agent::start(
        agent_config(
            "kvbench-peer",
            layout,
            backend,
            4,
            64 << 20,
            CopyMethod::Auto,
        ),
        mem,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let served = agent.clone();
    // The peer (and its pool) goes when the returned sender is dropped.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = transfer::grpc::serve(served, listener, shutdown).await {
            eprintln!("kvbench: peer control plane failed: {e}");
        }
    });
    Ok((addr, agent, stop))
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
    if a.peer.is_some() && a.op.contains(&Op::Write) && a.backend.len() * a.copy.len() > 1 {
        bail!(
            "with --peer, a WRITE changes the peer's pool and later READs could not be checked: \
             run writes with one --backend and one --copy"
        );
    }
    let bytes = blocks as u64 * layout.bytes_per_block();
    let local_kind = layout.params().mem;
    let plans = match (a.plan.is_empty(), local_kind) {
        (false, _) => a.plan.clone(),
        (true, MemKind::Gpu(_)) => vec![PlanKind::Naive, PlanKind::Coalesced, PlanKind::Blocks],
        (true, MemKind::Host) => vec![PlanKind::Naive, PlanKind::Coalesced],
    };
    // The in-process peer's layout: ours, in its own memory.
    let peer_layout_local = {
        let mut p = layout.params().clone();
        p.mem = a.peer_mem.unwrap_or(local_kind);
        KvLayout::new(p)?
    };
    // Allocate our pool first: no GPU is a start-up error (exit 2).
    let local_mem = filled_pool(
        &layout,
        LOCAL_SEED,
        None,
        a.layout.gpu_share,
        a.region_alloc,
    )?;
    eprintln!("kvbench: measuring the copy ceilings");
    let memcpy = memcpy_ceiling(bytes as usize, 5);
    let (d2d, h2d) = match local_mem.gpu() {
        Some(gpu) => {
            // Past a few GiB the rates no longer change, and pinning 10 GiB
            // of host memory alone takes seconds.
            let (d, h) = transfer::gpu::copy_ceilings(gpu, bytes.min(2 << 30) as usize, 5)?;
            eprintln!(
                "kvbench: {} ({}): device-to-device {d:.1} GB/s, pinned host-to-device {h:.1} GB/s",
                gpu.name(),
                gpu.uuid()
            );
            (Some(d), Some(h))
        }
        None => (None, None),
    };
    let mut ceilings = Ceilings {
        memcpy,
        d2d,
        h2d,
        ..Ceilings::default()
    };
    let mut results = Vec::new();
    let mut peer_desc = String::new();
    for &backend in &a.backend {
        // The copy method only matters to cuda-ipc (and auto's cuda-ipc).
        let copies: Vec<CopyMethod> = if matches!(backend, BackendKind::CudaIpc | BackendKind::Auto)
        {
            a.copy.clone()
        } else {
            vec![CopyMethod::Auto]
        };
        for copy in copies {
            // A fresh in-process peer each time: an earlier WRITE changed the last one.
            let (endpoint, in_process, _stop_peer) = match &a.peer {
                Some(p) => (p.clone(), None, None),
                None => {
                    let (ep, agent, stop) = local_peer(
                        &peer_layout_local,
                        backend,
                        a.peer_seed,
                        a.layout.gpu_share,
                        a.region_alloc,
                    )
                    .await?;
                    (ep, Some(agent), Some(stop))
                }
            };
            let peer_md = transfer::grpc::fetch_metadata(&endpoint)
                .await
                .with_context(|| format!("peer {endpoint}"))?;
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
            let peer_kind = peer_layout.params().mem;
            if let (Some(gpu), MemKind::Gpu(other)) = (local_mem.gpu(), peer_kind) {
                if other != gpu.ordinal() && ceilings.peer_in.is_none() {
                    // The peer reports its own ordinal: the same GPU here when both
                    // processes see the same devices (one host, same CUDA_VISIBLE_DEVICES).
                    let other = transfer::gpu::device(other)?;
                    let (i, o) = transfer::gpu::peer_copy_ceiling(
                        gpu,
                        &other,
                        bytes.min(2 << 30) as usize,
                        5,
                    )?;
                    eprintln!(
                        "kvbench: peer copy gpu:{} -> gpu:{} {i:.1} GB/s, back {o:.1} GB/s",
                        other.ordinal(),
                        gpu.ordinal()
                    );
                    (ceilings.peer_in, ceilings.peer_out) = (Some(i), Some(o));
                }
            }
            let agent = Agent::start(
                agent_config(
                    "kvbench-run",
                    &layout,
                    backend,
                    a.inflight,
                    a.max_desc_bytes,
                    copy,
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
                    refill(&local_mem, LOCAL_SEED)?;
                    refilled = true;
                }
                let (dst, src) = match op {
                    Op::Read => (local_kind, peer_kind),
                    Op::Write => (peer_kind, local_kind),
                };
                let ceiling = ceilings.of(dst, src, local_kind);
                for &placement in &a.placement {
                    // Both plans move the same block ids, drawn per repetition.
                    let mut rng = StdRng::seed_from_u64(a.seed ^ placement as u64);
                    let maps: Vec<(Vec<u32>, Vec<u32>)> = (0..a.reps + a.warmup)
                        .map(|_| {
                            (
                                place_blocks(
                                    placement,
                                    blocks,
                                    layout.num_blocks(),
                                    a.runs,
                                    &mut rng,
                                ),
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
                    for &plan in &plans {
                        eprintln!("kvbench: {backend}/{copy} {op} {dst}<-{src} {placement} {plan}");
                        let mut samples = Vec::with_capacity(a.reps);
                        let mut device = Vec::with_capacity(a.reps);
                        let mut planning = Vec::with_capacity(a.reps);
                        let mut submitting = Vec::with_capacity(a.reps);
                        let mut descriptors = 0;
                        let mut verified = false;
                        let mut used = backend;
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
                            if a.gap_ms > 0 {
                                tokio::time::sleep(Duration::from_millis(a.gap_ms)).await;
                            }
                            let t = Instant::now();
                            let done = agent
                                .transfer(spec, |_| {})
                                .await
                                .with_context(|| format!("{backend} {op} {placement} {plan}"))?;
                            let elapsed = t.elapsed();
                            descriptors = done.descriptors;
                            used = done.backend;
                            // The very first transfer of a case is checked: it
                            // takes the cold paths (handshake, fresh staging
                            // buffers, kernel load) where ordering bugs hide.
                            if i == 0 && op == Op::Write && in_process.is_none() {
                                verified = verify_write_by_readback(
                                    &agent, &endpoint, &layout, &local_mem, local, remote, plan,
                                    a.timeout,
                                )
                                .await?;
                            } else if i == 0 {
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
                            if i < a.warmup {
                                continue;
                            }
                            samples.push(elapsed);
                            planning.push(done.plan_time);
                            submitting.push(done.submit_time);
                            if let Some(d) = done.device_time {
                                device.push(d);
                            }
                        }
                        let latency = LatencyStats::of(&samples);
                        let device_gbps = (!device.is_empty())
                            .then(|| bytes as f64 / (LatencyStats::of(&device).p50_us / 1e6) / 1e9);
                        let name = if used == BackendKind::CudaIpc {
                            format!("{used}/{copy}")
                        } else {
                            used.to_string()
                        };
                        let row = CaseResult {
                            backend: name,
                            op: op.to_string(),
                            placement,
                            plan: plan.to_string(),
                            bytes,
                            descriptors,
                            reps: samples.len(),
                            latency,
                            gbps_p50: bytes as f64 / (latency.p50_us / 1e6) / 1e9,
                            verified,
                            memory: format!("{dst} <- {src}"),
                            ceiling: String::new(),
                            ceiling_gbps: 0.0,
                            of_ceiling: 0.0,
                            device_gbps,
                            plan_us: LatencyStats::of(&planning).p50_us,
                            submit_us: LatencyStats::of(&submitting).p50_us,
                        };
                        results.push(match ceiling {
                            Some((n, g)) => row.against(n, g),
                            None => row,
                        });
                    }
                }
            }
        }
    }
    let report = Report {
        layout: layout.to_string(),
        region_alloc: a.region_alloc.to_string(),
        tokens: a.tokens,
        blocks,
        bytes_per_transfer: bytes,
        pool_blocks: layout.num_blocks(),
        peer: peer_desc,
        run_lengths: a.runs.to_string(),
        inflight: a.inflight,
        max_desc_bytes: a.max_desc_bytes,
        ceilings,
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
        match report.chart().write_png(&a.png, 960, 540) {
            Ok(()) => println!("wrote {}", a.png.display()),
            // The chart is optional: a machine without a font still gets the table and JSON.
            Err(transfer::chart::ChartError::NoFont(why)) => eprintln!("kvbench: no chart ({why})"),
            Err(e) => return Err(e).with_context(|| format!("writing {}", a.png.display())),
        }
    }
    Ok(())
}
