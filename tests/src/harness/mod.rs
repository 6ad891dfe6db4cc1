//! The end-to-end test harness: finds workspace binaries, starts them as real processes on
//! loopback (logs to a file, killed on drop), waits for readiness by polling with a deadline, and
//! talks HTTP/1 to them through hyper's legacy client. Nothing here sleeps a fixed time to wait
//! for a condition: waits poll until a deadline and fail with a message naming what was awaited.

mod client;
pub use client::*;

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

/// Time limit of one HTTP exchange made by the helpers below.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a started process gets to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Interval between polls of a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The path of workspace binary `name` (`engine-sim`, `pd-sidecar`, ...) in the cargo target
/// directory the running test was built into. Panics, saying how to build it, when it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let mut candidates = Vec::new();
    let mut profile = "debug".to_string();
    if let Ok(exe) = std::env::current_exe() {
        // Tests run as target/<profile>/deps/<test>-<hash>; other tools from target/<profile>/.
        if let Some(dir) = exe.parent() {
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(profile_dir) = dir.parent() {
                    if let Some(p) = profile_dir.file_name() {
                        profile = p.to_string_lossy().into_owned();
                    }
                    candidates.push(profile_dir.join(&file));
                }
            } else {
                candidates.push(dir.join(&file));
            }
        }
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        let mut target = PathBuf::from(target);
        if target.is_relative() {
            // Relative to the workspace root, where cargo is normally invoked.
            target = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(target);
        }
        for p in [profile.as_str(), "debug", "release"] {
            candidates.push(target.join(p).join(&file));
        }
    }
    match candidates.iter().find(|c| c.is_file()) {
        Some(found) => found.clone(),
        None => panic!(
            "binary `{name}` not found (looked at {candidates:?}); build it first with \
             `cargo build --workspace --bins` (or run `make test`)"
        ),
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

static PROC_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A child process whose stdout and stderr go to a log file; killed when dropped. When the test
/// is panicking, the drop prints the log's path and its last lines.
pub struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl Proc {
    /// Starts workspace binary `bin` (see [`bin_path`]) with `args` and extra `env`.
    pub fn spawn(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::spawn_path(&bin_path(bin), args, env)
    }

    /// Starts the program at `path`.
    pub fn spawn_path(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let name = path
            .file_stem()
            .map_or_else(|| "proc".to_string(), |s| s.to_string_lossy().into_owned());
        let dir = std::env::temp_dir().join("tandem-tests");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let n = PROC_COUNTER.fetch_add(1, Ordering::Relaxed);
        let log_path = dir.join(format!("{name}-{}-{n}.log", std::process::id()));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("cloning the log file handle");
        let mut cmd = Command::new(path);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} {args:?}: {e}", path.display()));
        Proc {
            name,
            child,
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Polls `GET url` until it answers 200; fails early if the process exits.
    pub async fn try_wait_ready(&mut self, url: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} exited ({status}) before {url} was ready; log {}:\n{}",
                    self.name,
                    self.log_path.display(),
                    self.log_tail(40)
                ));
            }
            if let Ok((StatusCode::OK, _, _)) =
                try_http(Method::GET, url, &[], Bytes::new(), Duration::from_secs(2)).await
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} (pid {}) not ready at {url} after {timeout:?}; log {}:\n{}",
                    self.name,
                    self.pid(),
                    self.log_path.display(),
                    self.log_tail(40)
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Like [`Proc::try_wait_ready`], panicking on failure.
    pub async fn wait_ready(&mut self, url: &str, timeout: Duration) {
        if let Err(e) = self.try_wait_ready(url, timeout).await {
            panic!("{e}");
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} (pid {}) log: {} (last lines) ---\n{}\n--- end of {} log ---",
                self.name,
                self.child.id(),
                self.log_path.display(),
                self.log_tail(60),
                self.name
            );
        }
    }
}

/// A running `engine-sim` on 127.0.0.1 and a free port.
pub struct EngineSim {
    proc: Proc,
    port: u16,
    engine_id: String,
}

impl EngineSim {
    /// Starts `engine-sim` with `extra_args` (not `--port`/`--host`, which are chosen here) and
    /// waits until it is ready.
    pub async fn start(extra_args: &[&str]) -> EngineSim {
        EngineSim::start_with_env(extra_args, &[]).await
    }

    /// Like [`EngineSim::start`], with extra environment variables.
    pub async fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> EngineSim {
        let mut last_err = String::new();
        // A port picked by free_port can be taken before the simulator binds it: retry then.
        for _ in 0..3 {
            match EngineSim::try_start_on(free_port(), extra_args, env).await {
                Ok(sim) => return sim,
                Err(e) => last_err = e,
            }
        }
        panic!("engine-sim did not start: {last_err}");
    }

    /// Starts `engine-sim` on `port` (say, the port of one that was killed, so that the
    /// endpoints pointing at it see it come back), retrying until the port can be bound or
    /// [`READY_TIMEOUT`] has passed.
    pub async fn start_on_port(port: u16, extra_args: &[&str]) -> EngineSim {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match EngineSim::try_start_on(port, extra_args, &[]).await {
                Ok(sim) => return sim,
                Err(e) if Instant::now() >= deadline => {
                    panic!("engine-sim did not start on port {port}: {e}")
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    async fn try_start_on(
        port: u16,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<EngineSim, String> {
        let given_id = extra_args
            .iter()
            .position(|a| *a == "--engine-id")
            .and_then(|i| extra_args.get(i + 1))
            .map(|s| s.to_string());
        let engine_id = given_id
            .clone()
            .unwrap_or_else(|| format!("sim-{}", uuid::Uuid::new_v4().simple()));
        let port_s = port.to_string();
        let mut args = vec!["--host", "127.0.0.1", "--port", port_s.as_str()];
        if given_id.is_none() {
            args.extend(["--engine-id", engine_id.as_str()]);
        }
        args.extend_from_slice(extra_args);
        let mut proc = Proc::spawn("engine-sim", &args, env);
        let url = format!("http://127.0.0.1:{port}");
        proc.try_wait_ready(&format!("{url}/health"), READY_TIMEOUT)
            .await?;
        let sim = EngineSim {
            proc,
            port,
            engine_id,
        };
        // Make sure the answer came from this process, not another one on a reused port.
        if sim.state().await["engine_id"] == sim.engine_id.as_str() {
            Ok(sim)
        } else {
            Err(format!("port {port} was answered by another engine-sim"))
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>` (for `x-prefiller-host-port` and the like).
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn engine_id(&self) -> &str {
        &self.engine_id
    }

    /// The port of this simulator's KV-transfer agent (what a prefill returns as `remote_port`).
    pub async fn kv_port(&self) -> u64 {
        self.state().await["kv_port"]
            .as_u64()
            .expect("kv_port in /sim/state")
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    async fn get_json(&self, path: &str) -> Value {
        let (status, _, body) = http_get(&format!("{}{path}", self.url())).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        json(&body)
    }

    /// The request log (`GET /sim/requests`).
    pub async fn requests(&self) -> Vec<Value> {
        match self.get_json("/sim/requests").await {
            Value::Array(a) => a,
            other => panic!("/sim/requests is not an array: {other}"),
        }
    }

    /// The logged requests on the inference routes (`/v1/...`, `/inference/...`).
    pub async fn inference_requests(&self) -> Vec<Value> {
        self.requests()
            .await
            .into_iter()
            .filter(|r| {
                let p = r["path"].as_str().unwrap_or_default();
                p.starts_with("/v1/") || p.starts_with("/inference/")
            })
            .collect()
    }

    /// Empties the request log.
    pub async fn clear_requests(&self) {
        let (status, _, _) = http_delete(&format!("{}/sim/requests", self.url())).await;
        assert!(status.is_success(), "DELETE /sim/requests: {status}");
    }

    /// Replaces the fault configuration (`POST /sim/faults`).
    pub async fn set_faults(&self, faults: Value) {
        let (status, _, body) =
            http_post_json(&format!("{}/sim/faults", self.url()), &faults, &[]).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "POST /sim/faults: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// `GET /sim/state`: held_requests, held_blocks, released_total, expired_total, ...
    pub async fn state(&self) -> Value {
        self.get_json("/sim/state").await
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        let (status, _, body) = http_get(&format!("{}/metrics", self.url())).await;
        assert_eq!(status, StatusCode::OK);
        String::from_utf8_lossy(&body).into_owned()
    }
}

/// A running HTTP server process of ours (`pd-sidecar`, `pd-router`) on 127.0.0.1, with its
/// Prometheus metrics on a second port.
pub struct ServedProc {
    proc: Proc,
    port: u16,
    metrics_port: u16,
}

impl ServedProc {
    /// Spawns `bin` with the flags `args(port, metrics_port)` on two free ports and waits until
    /// `/health` and the metrics answer; retries on new ports when a chosen one was taken
    /// meanwhile.
    pub async fn try_start(
        bin: &str,
        args: impl Fn(u16, u16) -> Vec<String>,
        env: &[(&str, &str)],
    ) -> Result<ServedProc, String> {
        let mut last_err = String::new();
        for _ in 0..3 {
            let (port, metrics_port) = (free_port(), free_port());
            let args = args(port, metrics_port);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut proc = Proc::spawn(bin, &args, env);
            let ready = proc
                .try_wait_ready(&format!("http://127.0.0.1:{port}/health"), READY_TIMEOUT)
                .await;
            let served = ServedProc {
                proc,
                port,
                metrics_port,
            };
            match ready {
                Ok(()) => match served.metrics().await {
                    Ok(_) => return Ok(served),
                    Err(e) => last_err = e,
                },
                Err(e) => last_err = e,
            }
        }
        Err(format!("{bin} did not start: {last_err}"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// `http://127.0.0.1:<port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }

    /// The Prometheus text of `--metrics-port`.
    pub async fn metrics(&self) -> Result<String, String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let (status, _, body) =
            try_http(Method::GET, &url, &[], Bytes::new(), Duration::from_secs(5)).await?;
        if status != StatusCode::OK {
            return Err(format!("GET {url}: {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// A running `pd-sidecar` on 127.0.0.1 in front of one engine, with plain HTTP
/// and its metrics on a second free port.
pub struct Sidecar(ServedProc);

impl std::ops::Deref for Sidecar {
    type Target = ServedProc;
    fn deref(&self) -> &ServedProc {
        &self.0
    }
}

impl std::ops::DerefMut for Sidecar {
    fn deref_mut(&mut self) -> &mut ServedProc {
        &mut self.0
    }
}

impl Sidecar {
    /// Starts a sidecar for the engine on `decode_port` with `extra` flags
    /// (a repeated flag overrides these defaults) and waits until it serves and
    /// its metrics answer; retries when a chosen port was taken meanwhile.
    pub async fn try_start(
        decode_port: u16,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Result<Sidecar, String> {
        let args = |port: u16, metrics_port: u16| {
            let mut args = vec![
                format!("--port={port}"),
                format!("--model-server-port={decode_port}"),
                "--secure-proxy=false".into(),
                format!("--metrics-port={metrics_port}"),
            ];
            args.extend(extra.iter().cloned());
            args
        };
        ServedProc::try_start("pd-sidecar", args, env)
            .await
            .map(Sidecar)
    }

    /// Like [`Sidecar::try_start`], panicking on failure.
    pub async fn start(decode_port: u16, extra: &[&str]) -> Sidecar {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Sidecar::try_start(decode_port, &extra, &[("RUST_LOG", "debug")])
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A sidecar for the engine on `decode_port` as the end-to-end tests want it: every request
/// naming a prefiller is disaggregated (`--prefill-threshold-tokens=0`) and prefill retries
/// wait 10 ms; `extra` flags come after these (a repeated flag overrides).
pub async fn start_test_sidecar(decode_port: u16, extra: &[&str]) -> Sidecar {
    let args: Vec<&str> = [
        "--prefill-threshold-tokens=0",
        "--prefill-retry-backoff=10ms",
    ]
    .iter()
    .chain(extra)
    .copied()
    .collect();
    Sidecar::start(decode_port, &args).await
}

/// The value of the sample named exactly `series` (metric name and labels as rendered) in a
/// Prometheus text page; None when absent or unparsable.
pub fn prom_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix(series)?;
        // `series` must be the whole name and label set, not a prefix of a longer name.
        if !value.starts_with(' ') {
            return None;
        }
        value.split_whitespace().next()?.parse::<f64>().ok()
    })
}

/// A running `pd-router` on 127.0.0.1 in front of decode endpoints (normally
/// sidecars), with its metrics on a second free port.
pub struct Router(ServedProc);

impl std::ops::Deref for Router {
    type Target = ServedProc;
    fn deref(&self) -> &ServedProc {
        &self.0
    }
}

impl std::ops::DerefMut for Router {
    fn deref_mut(&mut self) -> &mut ServedProc {
        &mut self.0
    }
}

impl Router {
    /// Starts a router for `decode_urls` (`http://host:port`) and
    /// `prefill_host_ports` (`host:port`) with `extra` flags, and waits until it
    /// serves and its metrics answer; retries when a chosen port was taken meanwhile.
    pub async fn try_start(
        decode_urls: &[String],
        prefill_host_ports: &[String],
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Result<Router, String> {
        let args = |port: u16, metrics_port: u16| {
            let mut args = vec![
                "--bind=127.0.0.1".to_string(),
                format!("--port={port}"),
                format!("--metrics-port={metrics_port}"),
            ];
            args.extend(decode_urls.iter().map(|d| format!("--decode={d}")));
            args.extend(prefill_host_ports.iter().map(|p| format!("--prefill={p}")));
            args.extend(extra.iter().cloned());
            args
        };
        ServedProc::try_start("pd-router", args, env)
            .await
            .map(Router)
    }

    /// Like [`Router::try_start`] with debug logs, panicking on failure.
    pub async fn start(
        decode_urls: &[String],
        prefill_host_ports: &[String],
        extra: &[&str],
    ) -> Router {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Router::try_start(
            decode_urls,
            prefill_host_ports,
            &extra,
            &[("RUST_LOG", "debug")],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// One sample of the router's metrics (see [`prom_sample`]); panics when the metrics
    /// listener does not answer.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().await.unwrap_or_else(|e| panic!("{e}"));
        prom_sample(&text, series)
    }

    /// The status of `GET /ready`.
    pub async fn ready(&self) -> StatusCode {
        http_get(&self.url("/ready")).await.0
    }
}
