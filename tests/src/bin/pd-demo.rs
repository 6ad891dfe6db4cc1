//! `pd-demo`: a prefill/decode cluster on loopback, a built-in workload through it, and a plain
//! account of what happened (`make demo`).
//!
//! Starts 2 `engine-sim` prefill engines, 2 `engine-sim` decode engines and one `pd-sidecar` in
//! front of each decode engine, then runs three phases (short prompts, long prompts, a failing
//! prefill engine), cross-checks what the client saw against the sidecars' Prometheus counters
//! and the engines' request logs, prints a table and writes `demo-out/demo.json`. Exits 0 when
//! every check passed, 1 when one failed, 2 when the demo could not run.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::json;
use tandem_tests::demo::client::DemoClient;
use tandem_tests::demo::cluster::{Cluster, ClusterSpec};
use tandem_tests::demo::report::{self, PhaseResult};
use tandem_tests::demo::workload::{self, WorkloadParams};
use tandem_tests::demo::{run_phase, Mode};
use tandem_tests::harness::bin_path;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    /// Clients name the prefill engine; one pd-sidecar per decode engine.
    Sidecar,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Sidecar => Mode::Sidecar,
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "pd-demo",
    version,
    about = "A local P/D cluster on loopback: simulator engines, pd-sidecar, real requests, a table"
)]
struct Args {
    /// How the cluster is put together.
    #[arg(long, value_enum, default_value_t = ModeArg::Sidecar)]
    mode: ModeArg,
    /// Requests per phase.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(4..=10_000))]
    requests: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_tokens: u64,
    /// Where demo.json goes.
    #[arg(long, default_value = "demo-out")]
    out_dir: PathBuf,
}

/// The sidecar settings the workload depends on.
const THRESHOLD_TOKENS: u64 = 256;
const PREFILL_MAX_RETRIES: u32 = 2;
const PREFILL_RETRY_BACKOFF: &str = "20ms";

fn cluster_spec(mode: Mode) -> ClusterSpec {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    match mode {
        Mode::Sidecar => ClusterSpec {
            prefill_engines: 2,
            decode_engines: 2,
            // Prefill costs 25 ms; decode makes the first token in 5 ms, then one every 10 ms.
            prefill_args: s(&["--prefill-delay-ms", "25"]),
            decode_args: s(&["--ttft-ms", "5", "--itl-ms", "10"]),
            sidecar_args: vec![
                "--bind=127.0.0.1".into(),
                "--kv-connector=nixlv2".into(),
                format!("--prefill-threshold-tokens={THRESHOLD_TOKENS}"),
                format!("--prefill-max-retries={PREFILL_MAX_RETRIES}"),
                format!("--prefill-retry-backoff={PREFILL_RETRY_BACKOFF}"),
            ],
        },
    }
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
    for name in ["engine-sim", "pd-sidecar"] {
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
    let mode = Mode::from(args.mode);
    let spec = cluster_spec(mode);
    let params = WorkloadParams {
        requests_per_phase: args.requests as usize,
        max_tokens: args.max_tokens,
        prefill_engines: spec.prefill_engines,
        decode_engines: spec.decode_engines,
        prefill_max_retries: PREFILL_MAX_RETRIES,
        threshold_tokens: THRESHOLD_TOKENS,
    };
    let phases = workload::builtin(&params);
    let concurrency = args.concurrency as usize;

    let progress = Progress::new();
    progress.line(&format!(
        "pd-demo: starting {} prefill + {} decode engine-sims and {} pd-sidecars on 127.0.0.1 ...",
        spec.prefill_engines, spec.decode_engines, spec.decode_engines
    ));
    let cluster = Cluster::start(spec).await?;

    println!(
        "Tandem P/D demo, mode `{}`: {}.",
        mode.name(),
        mode.describe()
    );
    println!();
    println!(
        "Cluster on 127.0.0.1 (started in {:.2} s):",
        cluster.started_in.as_secs_f64()
    );
    for l in cluster.topology_lines() {
        println!("{l}");
    }
    println!();
    println!(
        "Workload: {} phases of {} requests, {concurrency} in flight, max_tokens {}; chat and \
         completions, streaming and not, alternating:",
        phases.len(),
        params.requests_per_phase,
        params.max_tokens
    );
    for p in &phases {
        println!("  {:<16} {}", p.title, p.about);
    }
    println!();
    let _ = std::io::stdout().flush();

    let client = DemoClient::new();
    let mut results: Vec<PhaseResult> = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        let done = Arc::new(AtomicUsize::new(0));
        let label = format!("[{}/{}] {}", i + 1, phases.len(), phase.title);
        let ticker = progress.track(&label, phase.requests.len(), Arc::clone(&done));
        let run = run_phase(
            mode,
            &cluster,
            &client,
            phase,
            concurrency,
            Arc::clone(&done),
        )
        .await;
        ticker.abort();
        let run = run?;
        let r = report::analyze(phase, &run, &params);
        progress.finish(&format!(
            "{label}: {}/{} answered in {:.2} s, {}",
            r.ok,
            r.requests,
            run.wall.as_secs_f64(),
            if r.passed() {
                "as expected"
            } else {
                "NOT as expected"
            }
        ));
        results.push(r);
    }

    println!("Results (local/remote/fallback: the sidecars' decisions; TTFT: first SSE event of the streaming requests; total: whole answer; held blocks: KV still held by the prefill engines afterwards):");
    println!("{}", report::table(&results));
    println!();
    println!("What happened:");
    for l in report::narrative(&results, &params) {
        println!("  - {l}");
    }
    println!();

    let checks: Vec<_> = results.iter().flat_map(|r| r.checks.iter()).collect();
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
    let passed = failed.is_empty();
    let elapsed = started.elapsed();

    let out_path = args.out_dir.join("demo.json");
    let doc = json!({
        "demo": "pd-demo",
        "version": env!("CARGO_PKG_VERSION"),
        "mode": mode.name(),
        "passed": passed,
        "run_time_s": (elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "cluster": cluster.topology_json(),
        "workload": {
            "requests_per_phase": params.requests_per_phase,
            "concurrency": concurrency,
            "max_tokens": params.max_tokens,
            "prefill_threshold_tokens": THRESHOLD_TOKENS,
            "prefill_max_retries": PREFILL_MAX_RETRIES,
            "prefill_retry_backoff": PREFILL_RETRY_BACKOFF,
        },
        "phases": results.iter().map(PhaseResult::to_json).collect::<Vec<_>>(),
        "summary": report::narrative(&results, &params),
        "failed_checks": failed.iter().map(|c| c.what.clone()).collect::<Vec<_>>(),
    });
    let written = std::fs::create_dir_all(&args.out_dir)
        .and_then(|()| {
            std::fs::write(
                &out_path,
                serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n",
            )
        })
        .map_err(|e| format!("writing {}: {e}", out_path.display()));

    if passed {
        println!(
            "All {} checks passed (client, sidecar metrics and engine logs agree). Run time {:.1} s.",
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
        println!("Process logs:");
        for (name, path) in &cluster.logs {
            println!("  {name:<10} {}", path.display());
        }
    }
    match &written {
        Ok(()) => println!("Numbers written to {}.", out_path.display()),
        Err(e) => eprintln!("pd-demo: error: {e}"),
    }
    let logs: Vec<PathBuf> = cluster.logs.iter().map(|(_, p)| p.clone()).collect();
    drop(cluster);
    if passed {
        // Nothing to look into: do not leave a log file per process behind each run.
        for p in logs {
            let _ = std::fs::remove_file(p);
        }
    }
    written?;
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

    fn line(&self, s: &str) {
        eprintln!("{s}");
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
            eprintln!("{label}: sending {total} requests ...");
        }
        tokio::spawn(async move {
            if !tty {
                return;
            }
            let width = 24;
            loop {
                let d = done.load(Ordering::Relaxed).min(total);
                let filled = d * width / total.max(1);
                eprint!(
                    "\r\x1b[K{label} [{}{}] {d}/{total}",
                    "#".repeat(filled),
                    ".".repeat(width - filled)
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
