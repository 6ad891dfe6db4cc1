//! `proxy-bench`: what do `pd-sidecar` and `pd-router` add to a request?
//!
//! Closed-loop load at several concurrencies, streaming and not, against an
//! `engine-sim` with zero delay (or `--engine-ttft-ms`, so that requests stay
//! in flight as LLM requests do and the load is one the machine can serve): direct, through `pd-sidecar` in local mode,
//! through `pd-sidecar` in remote-prefill mode (a second simulator as the
//! prefill engine), through `pd-router` (the engine as its decode endpoint;
//! every request parsed, hashed, scored and forwarded), through `pd-router`
//! in front of the sidecar, and through nginx as a plain reverse proxy when
//! nginx is installed (`--targets` picks which). Then 1,000 concurrent streams through a fresh sidecar for its
//! peak RSS. Prints a table and writes JSON. Numbers are reported, never
//! asserted: this is a benchmark, not a test.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tandem_tests::harness::{
    free_port, wait_ready, EngineSim, Proc, Router, Sidecar, READY_TIMEOUT,
};
use tandem_tests::sim::generate::{engine_duration_ms, SERVER_TIMING_REQUEST_HEADER};

#[derive(Parser, Debug)]
#[command(
    name = "proxy-bench",
    about = "Added latency and footprint of pd-sidecar and pd-router"
)]
struct Args {
    /// Seconds of measurement per cell (after a short warm-up).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    concurrency: Vec<usize>,
    /// Concurrent streams for the footprint run (0 = skip).
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Skip nginx even when it is installed.
    #[arg(long)]
    no_nginx: bool,
    /// Output tokens per request.
    #[arg(long, default_value_t = 8)]
    tokens: u32,
    /// Time to first token of the engines, in ms. 0 (the default) measures a proxy at full
    /// throughput (closed loop: at high concurrency the added latency is mostly queueing on a
    /// saturated CPU). With, say, 20, each request is in flight at least 20 ms, as LLM requests
    /// are, so concurrency 64 means 64 open requests at a rate the machine can serve, and the
    /// added latency is the proxy's own.
    #[arg(long, default_value_t = 0)]
    engine_ttft_ms: u64,
    /// Prompt length in tokens (4 bytes each) of every request; 0 sends a 2-token prompt. The
    /// router parses, hashes and scores the whole prompt, so this sets its per-request work.
    #[arg(long, default_value_t = 0)]
    prompt_tokens: usize,
    /// Extra pd-sidecar flag (repeatable), e.g. --sidecar-arg=--worker-threads=1.
    #[arg(long = "sidecar-arg", allow_hyphen_values = true)]
    sidecar_args: Vec<String>,
    /// Extra pd-router flag (repeatable), e.g. --router-arg=--worker-threads=1.
    #[arg(long = "router-arg", allow_hyphen_values = true)]
    router_args: Vec<String>,
    /// Targets to measure (direct is always kept: the others are compared with it).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,sidecar-local,sidecar-remote,router,router-sidecar,nginx"
    )]
    targets: Vec<String>,
    /// JSON output path.
    #[arg(long, default_value = "bench-out/proxy-bench.json")]
    out: PathBuf,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build(http)
}

#[derive(Clone)]
struct Target {
    name: &'static str,
    url: String,
    headers: Vec<(String, String)>,
}

struct Cell {
    target: &'static str,
    stream: bool,
    concurrency: usize,
    requests: usize,
    errors: usize,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Client-measured latency minus the engine's own time (NaN when the engine did not report
    /// it): what the network and the proxies in between took, without the engine's timer jitter.
    outside_p50_us: f64,
    outside_p99_us: f64,
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx] as f64
}

/// Sends one request and reads the whole answer; returns the engine's own time for it in µs (its
/// `server-timing: engine;dur=<ms>` header, or the SSE comment a stream ends with) when reported.
async fn one_request(
    client: &HttpClient,
    target: &Target,
    body: &Bytes,
) -> Result<Option<f64>, String> {
    let mut req = Request::post(&target.url)
        .header("content-type", "application/json")
        .header(SERVER_TIMING_REQUEST_HEADER, "1");
    for (k, v) in &target.headers {
        req = req.header(k, v);
    }
    let req = req
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let from_header = resp
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .and_then(engine_dur_us);
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    Ok(from_header.or_else(|| {
        let text = std::str::from_utf8(&bytes).ok()?;
        let at = text.rfind(": server-timing ")?;
        let line = text[at..].lines().next()?;
        engine_dur_us(line)
    }))
}

/// The engine's time in a Server-Timing value, in µs.
fn engine_dur_us(value: &str) -> Option<f64> {
    engine_duration_ms(value).map(|ms| ms * 1e3)
}

/// A prompt of about `tokens` tokens (4 bytes each), or a 2-token one for 0.
fn prompt(tokens: usize) -> String {
    if tokens == 0 {
        return "benchmark prompt".into();
    }
    let mut s = String::with_capacity(tokens * 4 + 32);
    let mut i = 0;
    while s.len() < tokens * 4 {
        s.push_str(&format!("Sentence {i} of the shared benchmark prompt. "));
        i += 1;
    }
    s.truncate(tokens * 4);
    s
}

async fn run_cell(target: &Target, stream: bool, concurrency: usize, args: &Args) -> Cell {
    let (tokens, seconds) = (args.tokens, args.seconds);
    let body = Bytes::from(
        json!({"model": "sim-model", "prompt": prompt(args.prompt_tokens), "max_tokens": tokens, "stream": stream})
            .to_string(),
    );
    let client = client();
    // Warm-up: open the connections.
    let warm_until = Instant::now() + Duration::from_millis(300);
    let measure_until = warm_until + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let target = target.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut outside = Vec::with_capacity(4096);
            let mut errors = 0usize;
            loop {
                let start = Instant::now();
                if start >= measure_until {
                    break;
                }
                let result = one_request(&client, &target, &body).await;
                let took = start.elapsed().as_secs_f64() * 1e6;
                if start >= warm_until {
                    match result {
                        Ok(engine) => {
                            lat.push(took as u64);
                            if let Some(engine) = engine {
                                outside.push((took - engine).max(0.0) as u64);
                            }
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (lat, outside, errors)
        }));
    }
    let mut all = Vec::new();
    let mut all_outside = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, outside, e) = t.await.expect("load task");
        all.extend(lat);
        all_outside.extend(outside);
        errors += e;
    }
    all.sort_unstable();
    all_outside.sort_unstable();
    // Only when every request reported the engine's time are the two comparable.
    if all_outside.len() != all.len() {
        all_outside.clear();
    }
    Cell {
        target: target.name,
        stream,
        concurrency,
        requests: all.len(),
        errors,
        rps: all.len() as f64 / seconds,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        outside_p50_us: percentile(&all_outside, 0.50),
        outside_p99_us: percentile(&all_outside, 0.99),
    }
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

async fn start_sidecar(decode_port: u16, extra: &[String]) -> Sidecar {
    let mut args = vec!["--prefill-threshold-tokens=0".to_string()];
    args.extend(extra.iter().cloned());
    match Sidecar::try_start(decode_port, &args, &[("RUST_LOG", "warn")]).await {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// nginx as a plain reverse proxy. Dropping it stops the master with `nginx -s stop`, which
/// takes the workers down too (killing the master alone would leave them running).
struct Nginx {
    proc: Proc,
    port: u16,
    stop: std::process::Command,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.stop.status().is_ok() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.proc.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

async fn start_nginx(decode_port: u16) -> Option<Nginx> {
    let nginx = which("nginx")?;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("proxy-bench-nginx-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs")).ok()?;
    let conf = format!(
        "worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         upstream engine {{ server 127.0.0.1:{decode_port}; keepalive 1024; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://engine;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
        d = dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).ok()?;
    let conf_s = conf_path.to_string_lossy().into_owned();
    let dir_s = dir.to_string_lossy().into_owned();
    let mut proc = Proc::spawn_path(&nginx, &["-p", &dir_s, "-c", &conf_s], &[]);
    let mut stop = std::process::Command::new(&nginx);
    stop.args(["-p", &dir_s, "-c", &conf_s, "-s", "stop"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    match proc
        .try_wait_ready(&format!("http://127.0.0.1:{port}/health"), READY_TIMEOUT)
        .await
    {
        Ok(()) => Some(Nginx { proc, port, stop }),
        Err(e) => {
            eprintln!("nginx did not start ({e}); skipping it");
            None
        }
    }
}

/// Peak RSS of a fresh sidecar while `n` streams are open at once.
async fn stream_footprint(n: usize, extra: &[String]) -> Option<(u64, usize)> {
    // Streams that stay open ~2 s each, so all n overlap.
    let sim = EngineSim::start(&["--itl-ms", "50", "--output-tokens", "40"]).await;
    let sidecar = start_sidecar(sim.port(), extra).await;
    let target = Target {
        name: "footprint",
        url: sidecar.url("/v1/completions"),
        headers: vec![],
    };
    let body = Bytes::from(
        json!({"model": "sim-model", "prompt": "p", "max_tokens": 40, "stream": true}).to_string(),
    );
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, target, body) = (client.clone(), target.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            one_request(&client, &target, &body).await.is_ok()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap_or(false));
    }
    let hwm = vm_hwm_kib(sidecar.pid());
    drop(sidecar);
    hwm.map(|h| (h, ok))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ttft = args.engine_ttft_ms.to_string();
    let decode = EngineSim::start(&["--ttft-ms", &ttft]).await;
    let prefill = EngineSim::start(&["--ttft-ms", &ttft]).await;
    let sidecar = start_sidecar(decode.port(), &args.sidecar_args).await;
    let path = "/v1/completions";
    let mut targets = vec![
        Target {
            name: "direct",
            url: format!("{}{path}", decode.url()),
            headers: vec![],
        },
        Target {
            name: "sidecar-local",
            url: sidecar.url(path),
            headers: vec![],
        },
        Target {
            name: "sidecar-remote",
            url: sidecar.url(path),
            headers: vec![("x-prefiller-host-port".into(), prefill.host_port())],
        },
    ];
    // pd-router with the engine as its only decode endpoint (what the router adds), and in
    // front of the sidecar (router + sidecar, no prefill).
    let want = |name: &str| args.targets.iter().any(|t| t == name);
    let router = if want("router") {
        Some(
            Router::try_start(&[decode.url()], &[], &args.router_args, &[])
                .await
                .map_err(anyhow::Error::msg)?,
        )
    } else {
        None
    };
    let router_sidecar = if want("router-sidecar") {
        Some(
            Router::try_start(&[sidecar.url("")], &[], &args.router_args, &[])
                .await
                .map_err(anyhow::Error::msg)?,
        )
    } else {
        None
    };
    for (name, r) in [("router", &router), ("router-sidecar", &router_sidecar)] {
        if let Some(r) = r {
            targets.push(Target {
                name,
                url: r.url(path),
                headers: vec![],
            });
        }
    }
    targets.retain(|t| t.name == "direct" || want(t.name));
    let nginx = if args.no_nginx || !want("nginx") {
        None
    } else {
        start_nginx(decode.port()).await
    };
    if let Some(Nginx { port, .. }) = &nginx {
        targets.push(Target {
            name: "nginx",
            url: format!("http://127.0.0.1:{port}{path}"),
            headers: vec![],
        });
    } else {
        eprintln!("nginx not found (or --no-nginx): the nginx rows are skipped");
    }
    wait_ready(&format!("{}/health", decode.url()), READY_TIMEOUT).await;

    let mut cells = Vec::new();
    for stream in [false, true] {
        for &c in &args.concurrency {
            for t in &targets {
                eprintln!(
                    "measuring {:<16} stream={:<5} concurrency={c}",
                    t.name, stream
                );
                cells.push(run_cell(t, stream, c, &args).await);
            }
        }
    }
    let sidecar_hwm = vm_hwm_kib(sidecar.pid());
    let router_hwm = router.as_ref().and_then(|r| vm_hwm_kib(r.pid()));
    let footprint = if args.streams > 0 {
        stream_footprint(args.streams, &args.sidecar_args).await
    } else {
        None
    };

    println!(
        "{:<15} {:>6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "target",
        "stream",
        "conc",
        "req/s",
        "p50 us",
        "p99 us",
        "out p50",
        "out p99",
        "+p50 us",
        "+p99 us",
        "errors"
    );
    let mut rows = Vec::new();
    for cell in &cells {
        let direct = cells.iter().find(|d| {
            d.target == "direct" && d.stream == cell.stream && d.concurrency == cell.concurrency
        });
        // Added latency: from the time outside the engine where both cells have it, else from
        // the client's whole latency.
        let (add50, add99) = match direct {
            Some(d) if cell.target != "direct" => {
                if cell.outside_p50_us.is_finite() && d.outside_p50_us.is_finite() {
                    (
                        cell.outside_p50_us - d.outside_p50_us,
                        cell.outside_p99_us - d.outside_p99_us,
                    )
                } else {
                    (cell.p50_us - d.p50_us, cell.p99_us - d.p99_us)
                }
            }
            _ => (0.0, 0.0),
        };
        println!(
            "{:<15} {:>6} {:>5} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>6}",
            cell.target,
            cell.stream,
            cell.concurrency,
            cell.rps,
            cell.p50_us,
            cell.p99_us,
            cell.outside_p50_us,
            cell.outside_p99_us,
            add50,
            add99,
            cell.errors
        );
        let finite = |v: f64| v.is_finite().then_some(v);
        rows.push(json!({
            "target": cell.target, "stream": cell.stream, "concurrency": cell.concurrency,
            "requests": cell.requests, "errors": cell.errors, "rps": cell.rps,
            "p50_us": cell.p50_us, "p99_us": cell.p99_us,
            "outside_engine_p50_us": finite(cell.outside_p50_us),
            "outside_engine_p99_us": finite(cell.outside_p99_us),
            "added_p50_us": add50, "added_p99_us": add99,
        }));
    }
    if let Some(kib) = sidecar_hwm {
        println!(
            "pd-sidecar peak RSS over the runs above: {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    if let Some(kib) = router_hwm {
        println!(
            "pd-router peak RSS over the runs above: {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    if let Some((kib, ok)) = footprint {
        println!(
            "pd-sidecar peak RSS with {} concurrent streams ({ok} completed): {:.1} MiB",
            args.streams,
            kib as f64 / 1024.0
        );
    }
    let report = json!({
        "benchmark": "proxy-bench",
        "seconds_per_cell": args.seconds,
        "output_tokens": args.tokens,
        "engine_ttft_ms": args.engine_ttft_ms,
        "prompt_tokens": args.prompt_tokens,
        "nginx": nginx.is_some(),
        "sidecar_args": args.sidecar_args,
        "router_args": args.router_args,
        "cells": rows,
        "sidecar_peak_rss_kib": sidecar_hwm,
        "router_peak_rss_kib": router_hwm,
        "streams_footprint": footprint.map(|(kib, ok)| json!({"streams": args.streams, "completed": ok, "peak_rss_kib": kib})),
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
