//! A small P/D cluster on loopback for the demo: `engine-sim` processes, one `pd-sidecar` in
//! front of each decode engine, and `pd-router` in front of everything. Owns starting it (in
//! parallel), its topology, and fallible readers of what the processes know (router decisions,
//! engine state). Every process is killed when the cluster is dropped.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::prom;
use crate::harness::{try_http, EngineSim, Router, Sidecar, POLL_INTERVAL};

const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What to start.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Engines that only prefill (0: every engine serves whole requests, no sidecars).
    pub prefill_engines: usize,
    /// Engines behind the router's decode profile; each gets a sidecar when there are prefill
    /// engines.
    pub decode_engines: usize,
    /// Flags of every engine-sim besides the ports.
    pub engine_args: Vec<String>,
    /// Flags of every sidecar besides the ports.
    pub sidecar_args: Vec<String>,
    /// The router's EndpointPickerConfig, written to `router_config_path`.
    pub router_config: String,
    pub router_config_path: PathBuf,
}

/// The sums over the engines that the demo reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineTotals {
    pub kv_bytes_pulled: u64,
    pub kv_pull_micros: u64,
    pub kv_pulls_ok: u64,
    pub kv_pulls_failed: u64,
    pub kv_integrity_failures: u64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// Prompt tokens the engines computed (not cached, not pulled).
    pub prompt_tokens_computed: u64,
    pub held_blocks: u64,
    pub released_blocks: u64,
    pub expired_blocks: u64,
}

impl EngineTotals {
    fn add(&mut self, s: &Value) {
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        self.kv_bytes_pulled += n("kv_bytes_pulled");
        self.kv_pull_micros += n("kv_pull_micros");
        self.kv_pulls_ok += n("kv_pulls_ok");
        self.kv_pulls_failed += n("kv_pulls_failed");
        self.kv_integrity_failures += n("kv_integrity_failures");
        self.prefix_cache_queries += n("prefix_cache_queries");
        self.prefix_cache_hits += n("prefix_cache_hits");
        self.prompt_tokens_computed += n("prompt_tokens_computed");
        self.held_blocks += n("held_blocks");
        self.released_blocks += n("released_total");
        self.expired_blocks += n("expired_total");
    }
}

/// The router's decisions (`pd_router_requests_total` by decision).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Decisions {
    pub local: u64,
    pub remote: u64,
}

/// The processes of a running cluster.
pub struct Cluster {
    pub spec: ClusterSpec,
    pub prefill: Vec<EngineSim>,
    pub decode: Vec<EngineSim>,
    /// `sidecars[i]` fronts `decode[i]` (none without prefill engines).
    pub sidecars: Vec<Sidecar>,
    pub router: Router,
    /// Every process's name and log file.
    pub logs: Vec<(String, PathBuf)>,
    pub started_in: Duration,
}

impl Cluster {
    /// Starts every engine in parallel, then the sidecars, then the router.
    pub async fn start(spec: ClusterSpec) -> Result<Cluster, String> {
        let started = Instant::now();
        if let Some(dir) = spec.router_config_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(&spec.router_config_path, &spec.router_config)
            .map_err(|e| format!("{}: {e}", spec.router_config_path.display()))?;
        let mut tasks = Vec::new();
        for _ in 0..spec.prefill_engines + spec.decode_engines {
            let args = spec.engine_args.clone();
            tasks.push(tokio::spawn(async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                EngineSim::start(&args).await
            }));
        }
        let mut engines = Vec::new();
        for t in tasks {
            // EngineSim::start panics (printing the engine's log) when it cannot start.
            engines.push(t.await.map_err(|_| {
                "an engine-sim did not start (its log is printed above)".to_string()
            })?);
        }
        let mut decode = engines.split_off(spec.prefill_engines);
        let mut prefill = engines;
        let mut sidecars = Vec::new();
        if spec.prefill_engines > 0 {
            let mut tasks = Vec::new();
            for d in &decode {
                let (port, args) = (d.port(), spec.sidecar_args.clone());
                tasks.push(tokio::spawn(async move {
                    Sidecar::try_start(port, &args, &[]).await
                }));
            }
            for t in tasks {
                sidecars.push(t.await.map_err(|e| format!("starting pd-sidecar: {e}"))??);
            }
        }
        let decode_urls: Vec<String> = if sidecars.is_empty() {
            decode.iter().map(EngineSim::url).collect()
        } else {
            sidecars.iter().map(|s| s.url("")).collect()
        };
        let prefill_hosts: Vec<String> = prefill.iter().map(EngineSim::host_port).collect();
        let router_args = vec![format!(
            "--config={}",
            spec.router_config_path.to_string_lossy()
        )];
        let mut router = Router::try_start(&decode_urls, &prefill_hosts, &router_args, &[]).await?;
        let mut logs = Vec::new();
        for (i, p) in prefill.iter_mut().enumerate() {
            logs.push((
                format!("prefill-{i}"),
                p.proc_mut().log_path().to_path_buf(),
            ));
        }
        for (i, d) in decode.iter_mut().enumerate() {
            logs.push((
                format!("{}-{i}", Cluster::decode_name(spec.prefill_engines)),
                d.proc_mut().log_path().to_path_buf(),
            ));
        }
        for (i, s) in sidecars.iter().enumerate() {
            logs.push((format!("sidecar-{i}"), s.log_path().to_path_buf()));
        }
        logs.push(("router".into(), router.proc_mut().log_path().to_path_buf()));
        Ok(Cluster {
            spec,
            prefill,
            decode,
            sidecars,
            router,
            logs,
            started_in: started.elapsed(),
        })
    }

    fn decode_name(prefill_engines: usize) -> &'static str {
        if prefill_engines == 0 {
            "engine"
        } else {
            "decode"
        }
    }

    /// Where clients send requests.
    pub fn entry_url(&self) -> String {
        self.router.url("")
    }

    /// `/sim/state` summed over every engine.
    pub async fn engine_totals(&self) -> Result<EngineTotals, String> {
        let mut t = EngineTotals::default();
        for e in self.prefill.iter().chain(&self.decode) {
            t.add(&get_json(&format!("{}/sim/state", e.url())).await?);
        }
        Ok(t)
    }

    /// The router's decisions so far.
    pub async fn decisions(&self) -> Result<Decisions, String> {
        let text = self.router.metrics().await?;
        let by = prom::sum_by(&prom::parse(&text), "pd_router_requests_total", "decision");
        let get = |k: &str| by.get(k).copied().unwrap_or(0.0).max(0.0) as u64;
        Ok(Decisions {
            local: get("local"),
            remote: get("remote"),
        })
    }

    /// Polls until the engines hold no KV blocks for remote decodes or `timeout` passes;
    /// returns what is held at the end.
    pub async fn wait_blocks_released(&self, timeout: Duration) -> Result<u64, String> {
        let started = Instant::now();
        loop {
            let held = self.engine_totals().await?.held_blocks;
            if held == 0 || started.elapsed() >= timeout {
                return Ok(held);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Human-readable topology lines.
    pub fn topology_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, p) in self.prefill.iter().enumerate() {
            out.push(format!("  prefill-{i}  engine-sim  127.0.0.1:{}", p.port()));
        }
        let name = Cluster::decode_name(self.spec.prefill_engines);
        for (i, d) in self.decode.iter().enumerate() {
            match self.sidecars.get(i) {
                Some(s) => out.push(format!(
                    "  {name}-{i}   engine-sim  127.0.0.1:{}  behind pd-sidecar 127.0.0.1:{}",
                    d.port(),
                    s.port()
                )),
                None => out.push(format!("  {name}-{i}   engine-sim  127.0.0.1:{}", d.port())),
            }
        }
        out.push(format!(
            "  router     pd-router   127.0.0.1:{}  config {}",
            self.router.port(),
            self.spec.router_config_path.display()
        ));
        out
    }

    /// The topology as JSON.
    pub fn topology_json(&self) -> Value {
        json!({
            "prefill": self.prefill.iter().map(|p| json!({"port": p.port(), "engine_id": p.engine_id()})).collect::<Vec<_>>(),
            "decode": self.decode.iter().enumerate().map(|(i, d)| json!({
                "port": d.port(), "engine_id": d.engine_id(),
                "sidecar_port": self.sidecars.get(i).map(|s| s.port()),
            })).collect::<Vec<_>>(),
            "router_port": self.router.port(),
            "engine_args": self.spec.engine_args,
            "sidecar_args": if self.sidecars.is_empty() { json!(null) } else { json!(self.spec.sidecar_args) },
            "router_config": self.spec.router_config_path.to_string_lossy(),
        })
    }
}

pub async fn get_json(url: &str) -> Result<Value, String> {
    let (status, _, body) = try_http(Method::GET, url, &[], Bytes::new(), READ_TIMEOUT).await?;
    if status != StatusCode::OK {
        return Err(format!("GET {url}: {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))
}
