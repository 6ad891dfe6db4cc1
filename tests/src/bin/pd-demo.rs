//! `pd-demo`: the same workload served four ways by a local cluster on loopback, and one
//! table comparing them (`make demo`).
//!
//! For each mode (aggregated, P/D always, P/D selective with cache-aware routing on the router's
//! approximate prefix index, and the same on its precise index fed by the engines' KV events) it
//! starts four `engine-sim` engines with the timing model on (and `--byte-tokens`, so that the
//! engines' token ids are the router's prompt bytes), a `pd-sidecar` in front of each decode
//! engine and `pd-router` in front of everything, replays the built-in workload (multi-turn chats
//! sharing long system prompts, plus short one-shots) through the router, and stops the cluster.
//! KV blocks really move between the engines over the transfer agent (NIXL by default) and are
//! checked byte for byte. Prints the table, writes `demo-out/demo.json` and `demo-out/demo.png`.
//! Exits 0 when every check passed, 1 when one failed, 2 when the demo could not run.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::json;
use tandem_tests::demo::report::{self, ModeResult};
use tandem_tests::demo::workload::{self, WorkloadParams};
use tandem_tests::demo::{run_mode, Mode, BLOCK_SIZE, BYTE_TOKENS};
use tandem_tests::harness::bin_path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Aggregated,
    PdAlways,
    PdSelective,
    PdSelectivePrecise,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Aggregated => Mode::Aggregated,
            ModeArg::PdAlways => Mode::PdAlways,
            ModeArg::PdSelective => Mode::PdSelective,
            ModeArg::PdSelectivePrecise => Mode::PdSelectivePrecise,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KvBackend {
    Nixl,
    Tcp,
    /// CUDA IPC between the engines' GPU pools (needs --kv-mem gpu:N).
    CudaIpc,
    /// cuda-ipc on one host with GPU pools, NIXL otherwise.
    Auto,
}

#[derive(Parser, Debug)]
#[command(
    name = "pd-demo",
    version,
    about = "The same workload served aggregated, P/D always, P/D selective and P/D selective on \
             the precise (KV-event) prefix index by a local cluster (engine-sim, pd-sidecar, \
             pd-router, real KV transfers), and a table comparing them"
)]
struct Args {
    /// Modes to run, in order.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [ModeArg::Aggregated, ModeArg::PdAlways, ModeArg::PdSelective,
                              ModeArg::PdSelectivePrecise])]
    modes: Vec<ModeArg>,
    /// Simulated users: sessions (chats or one-shots) in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    users: u32,
    /// KV data plane between the engines: nixl (the NIXL libraries `make setup` unpacks), tcp,
    /// cuda-ipc or auto (GPU pools).
    #[arg(long, value_enum, default_value_t = KvBackend::Nixl)]
    kv_backend: KvBackend,
    /// Where the engines' KV pools live (engine-sim --kv-mem): host or gpu:N.
    #[arg(long, default_value = "host")]
    kv_mem: String,
    /// Where the decode engines' KV pools live, when not where --kv-mem says: prefill engines
    /// on one GPU and decode engines on another (`--kv-mem gpu:0 --decode-kv-mem gpu:1`).
    #[arg(long)]
    decode_kv_mem: Option<String>,
    /// Shape of the engines' KV cache (engine-sim --kv-model). The default is 8 KiB per token,
    /// a 16th of Llama-3.1-8B's, so four engines fit a laptop.
    #[arg(long, default_value = "layers=8,kv_heads=4,head_dim=64,dtype=bf16")]
    kv_model: String,
    /// KV blocks per engine (16 tokens each).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(64..))]
    num_blocks: u32,
    /// A small workload (a few seconds per mode), for smoke tests.
    #[arg(long)]
    quick: bool,
    /// Orders the workload's sessions.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where demo.json, demo.png and the router configs go.
    #[arg(long, default_value = "demo-out")]
    out_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check_binaries() {
        eprintln!("pd-demo: error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pd-demo: error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("pd-demo: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `bin_path` panics with a how-to-build message when a binary is missing: report it plainly.
fn check_binaries() -> Result<(), String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut missing = Vec::new();
    for name in ["engine-sim", "pd-sidecar", "pd-router"] {
        if let Err(payload) = std::panic::catch_unwind(|| bin_path(name)) {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| format!("binary `{name}` not found"));
            missing.push(msg);
        }
    }
    std::panic::set_hook(hook);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}\n(`make demo` builds everything: cargo build --release --workspace --bins)",
            missing.join("\n")
        ))
    }
}

async fn run(args: Args) -> Result<bool, String> {
    let started = Instant::now();
    let params = if args.quick {
        WorkloadParams::quick()
    } else {
        WorkloadParams {
            seed: args.seed,
            ..WorkloadParams::standard()
        }
    };
    let sessions = Arc::new(workload::builtin(&params));
    let users = args.users as usize;
    let backend = match args.kv_backend {
        KvBackend::Nixl => "nixl",
        KvBackend::Tcp => "tcp",
        KvBackend::CudaIpc => "cuda-ipc",
        KvBackend::Auto => "auto",
    };
    let engine_args: Vec<String> = vec![
        "--timing-model".into(),
        format!("--kv-backend={backend}"),
        format!("--kv-mem={}", args.kv_mem),
        format!("--kv-model={}", args.kv_model),
        format!("--num-blocks={}", args.num_blocks),
        format!("--block-size={BLOCK_SIZE}"),
        // Token ids are the router's prompt bytes, in every mode so that they stay comparable:
        // the precise index matches a prompt only then.
        BYTE_TOKENS.into(),
    ];
    let decode_args: Vec<String> = args
        .decode_kv_mem
        .iter()
        .map(|m| format!("--kv-mem={m}"))
        .collect();
    let modes: Vec<Mode> = args.modes.iter().map(|m| Mode::from(*m)).collect();

    println!(
        "Tandem P/D demo: one workload, {} ways of serving it.",
        modes.len()
    );
    println!();
    println!(
        "Workload: {} chats of {} turns over {} shared system prompts of ~{} tokens (max_tokens \
         {}), plus {} short one-shots (max_tokens {}); {} requests, all streamed, {users} users \
         in flight.",
        params.chats,
        params.turns,
        params.system_prompts,
        params.system_prompt_tokens,
        params.chat_max_tokens,
        params.one_shots,
        params.one_shot_max_tokens,
        params.requests(),
    );
    println!(
        "Engines: engine-sim {} (timing model of an 8B model on one H100; KV {} over {backend}){}.",
        engine_args.join(" "),
        args.kv_model,
        match &args.decode_kv_mem {
            Some(m) => format!("; decode engines' KV in {m}"),
            None => String::new(),
        }
    );
    println!("Modes:");
    for m in &modes {
        println!("  {:<20} {}", m.name(), m.describe());
    }
    println!();
    let _ = std::io::stdout().flush();

    let progress = Progress::new();
    let mut results: Vec<ModeResult> = Vec::new();
    let mut topologies = Vec::new();
    let mut logs_to_keep = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let label = format!("[{}/{}] {}", i + 1, modes.len(), mode.name());
        let done = Arc::new(AtomicUsize::new(0));
        let ticker = progress.track(&label, params.requests(), Arc::clone(&done));
        let outcome = run_mode(
            *mode,
            &engine_args,
            &decode_args,
            &args.out_dir,
            Arc::clone(&sessions),
            users,
            done,
        )
        .await;
        ticker.abort();
        let (run, cluster) = match outcome {
            Ok(r) => r,
            Err(e) => {
                progress.finish(&format!("{label}: could not run"));
                return Err(e);
            }
        };
        let r = report::analyze(&run);
        progress.finish(&format!(
            "{label}: {}/{} answered in {:.1} s (cluster up in {:.1} s){}",
            r.ok,
            r.requests,
            run.wall.as_secs_f64(),
            run.cluster_started_in.as_secs_f64(),
            if r.passed() { "" } else { ", checks FAILED" }
        ));
        let logs: Vec<(String, PathBuf)> = cluster.logs.clone();
        drop(cluster);
        if r.passed() {
            // Nothing to look into: do not leave a log file per process behind.
            for (_, p) in &logs {
                let _ = std::fs::remove_file(p);
            }
        } else {
            logs_to_keep.extend(
                logs.into_iter()
                    .map(|(n, p)| (format!("{}/{n}", mode.name()), p)),
            );
        }
        topologies.push(json!({"mode": mode.name(), "cluster": run.topology}));
        results.push(r);
    }

    println!();
    println!("{}", report::table(&results));
    println!();
    println!("What it says:");
    for l in report::narrative(&results) {
        println!("  - {l}");
    }
    println!();

    let cross = report::cross_checks(&results);
    let checks: Vec<&report::Check> = results
        .iter()
        .flat_map(|r| r.checks.iter())
        .chain(cross.iter())
        .collect();
    let failed: Vec<&&report::Check> = checks.iter().filter(|c| !c.ok).collect();
    let passed = failed.is_empty();
    let elapsed = started.elapsed();

    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| format!("{}: {e}", args.out_dir.display()))?;
    let json_path = args.out_dir.join("demo.json");
    let png_path = args.out_dir.join("demo.png");
    let doc = json!({
        "demo": "pd-demo",
        "version": env!("CARGO_PKG_VERSION"),
        "passed": passed,
        "run_time_s": (elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "workload": {
            "system_prompts": params.system_prompts,
            "system_prompt_tokens": params.system_prompt_tokens,
            "chats": params.chats,
            "turns": params.turns,
            "chat_max_tokens": params.chat_max_tokens,
            "one_shots": params.one_shots,
            "one_shot_max_tokens": params.one_shot_max_tokens,
            "requests": params.requests(),
            "users": users,
            "seed": params.seed,
        },
        "engine_args": engine_args,
        "kv_backend": backend,
        "kv_mem": args.kv_mem,
        "decode_kv_mem": args.decode_kv_mem,
        "modes": results.iter().map(ModeResult::to_json).collect::<Vec<_>>(),
        "clusters": topologies,
        "summary": report::narrative(&results),
        "failed_checks": failed.iter().map(|c| c.what.clone()).collect::<Vec<_>>(),
    });
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n",
    )
    .map_err(|e| format!("writing {}: {e}", json_path.display()))?;
    report::write_chart(&results, &png_path)?;

    if passed {
        println!(
            "All {} checks passed (every request answered, every KV byte verified, no KV block \
             left held). Run time {:.1} s.",
            checks.len(),
            elapsed.as_secs_f64()
        );
    } else {
        println!(
            "FAILED: {} of {} checks did not pass:",
            failed.len(),
            checks.len()
        );
        for c in &failed {
            println!("  - {}", c.what);
        }
        for r in &results {
            for e in &r.errors {
                println!("  {}: {e}", r.mode.name());
            }
        }
        println!("Process logs:");
        for (name, path) in &logs_to_keep {
            println!("  {name:<24} {}", path.display());
        }
    }
    println!(
        "Written: {}, {} (router configs: {}/router-<mode>.yaml{}).",
        json_path.display(),
        png_path.display(),
        args.out_dir.display(),
        if modes.iter().any(|m| m.kv_events()) {
            ", endpoints files with each engine's kvEventsUrl: endpoints-<mode>.yaml"
        } else {
            ""
        }
    );
    Ok(passed)
}

/// Progress on stderr: a live bar on a terminal, start and end lines otherwise.
struct Progress {
    tty: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Shows `done` of `total` for `label` until the returned task is aborted.
    fn track(
        &self,
        label: &str,
        total: usize,
        done: Arc<AtomicUsize>,
    ) -> tokio::task::JoinHandle<()> {
        let (tty, label) = (self.tty, label.to_string());
        if !tty {
            eprintln!("{label}: starting the cluster and sending {total} requests ...");
        }
        tokio::spawn(async move {
            if !tty {
                return;
            }
            let width = 30;
            let started = Instant::now();
            loop {
                let d = done.load(Ordering::Relaxed).min(total);
                let filled = d * width / total.max(1);
                eprint!(
                    "\r\x1b[K{label} [{}{}] {d}/{total} {:.0} s",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    started.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn finish(&self, s: &str) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
        eprintln!("{s}");
    }
}
