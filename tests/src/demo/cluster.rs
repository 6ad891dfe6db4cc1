//! A small P/D cluster on loopback for the demo: `engine-sim` processes, one `pd-sidecar` in
//! front of each decode engine, and `pd-router` in front of everything. Owns starting it (in
//! parallel), its topology, and fallible readers of what the processes know (router decisions,
//! the router's precise index, engine state). Every process is killed when the cluster is
//! dropped.
//!
//! With KV events (`ClusterSpec::endpoints_path`), llm-d's per-pod mode: each engine binds its
//! own ZMQ publisher (`tcp://*:<free port>`, topic `kv@127.0.0.1:<engine port>@<model>`) and
//! pd-router, given an endpoints file naming each endpoint's `kvEventsUrl`
//! (`tcp://127.0.0.1:<that port>`), connects to every one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::prom;
use super::workload::MODEL;
use crate::harness::{free_port, try_http, EngineSim, Router, Sidecar, POLL_INTERVAL};

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
    /// Flags of the decode engines (every engine in an aggregated mode) after
    /// `engine_args`; a flag given in both takes this value (`--kv-mem=gpu:1`).
    pub decode_engine_args: Vec<String>,
    /// Flags of every sidecar besides the ports.
    pub sidecar_args: Vec<String>,
    /// The router's EndpointPickerConfig, written to `router_config_path`.
    pub router_config: String,
    pub router_config_path: PathBuf,
    /// Some: every engine publishes its KV events, and the router gets its endpoints from
    /// this file (written here), each with its engine's `kvEventsUrl`, instead of flags.
    pub endpoints_path: Option<PathBuf>,
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

/// What the router's precise index got from the engines' KV events
/// (`pd_router_kv_events_total`, `pd_router_kv_index_blocks`, summed over the endpoints).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KvFeed {
    pub events: u64,
    pub block_stored: u64,
    pub block_removed: u64,
    /// Blocks in the index now.
    pub index_blocks: u64,
}

/// The processes of a running cluster.
pub struct Cluster {
    pub spec: ClusterSpec,
    pub prefill: Vec<EngineSim>,
    pub decode: Vec<EngineSim>,
    /// `sidecars[i]` fronts `decode[i]` (none without prefill engines).
    pub sidecars: Vec<Sidecar>,
    pub router: Router,
    /// With KV events: `(the router's name for the endpoint, its engine's publisher URL, the
    /// engine's URL)`, one per engine.
    pub kv_events: Vec<(String, String, String)>,
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
        let mut publishers = Vec::new();
        for i in 0..spec.prefill_engines + spec.decode_engines {
            let mut args = spec.engine_args.clone();
            if i >= spec.prefill_engines {
                args.extend(spec.decode_engine_args.iter().cloned());
            }
            let port = if spec.endpoints_path.is_some() {
                let (port, events) = (free_port(), free_port());
                let url = format!("tcp://127.0.0.1:{events}");
                args.push("--kv-events-config".into());
                args.push(
                    json!({
                        "enable_kv_cache_events": true,
                        "publisher": "zmq",
                        // As vLLM, engine-sim binds an endpoint with `*` (else it connects).
                        "endpoint": format!("tcp://*:{events}"),
                        "topic": format!("kv@127.0.0.1:{port}@{MODEL}"),
                    })
                    .to_string(),
                );
                publishers.push(url);
                Some(port)
            } else {
                None
            };
            tasks.push(tokio::spawn(async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                match port {
                    Some(port) => EngineSim::start_on_port(port, &args).await,
                    None => EngineSim::start(&args).await,
                }
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
        let mut router_args = vec![format!(
            "--config={}",
            spec.router_config_path.to_string_lossy()
        )];
        let mut kv_events = Vec::new();
        let mut router = match &spec.endpoints_path {
            None => Router::try_start(&decode_urls, &prefill_hosts, &router_args, &[]).await?,
            Some(path) => {
                // Engines were started prefill first, as `publishers` is ordered.
                let (prefill_pubs, decode_pubs) = publishers.split_at(spec.prefill_engines);
                let mut file = String::from("decode:\n");
                for ((url, publisher), engine) in decode_urls.iter().zip(decode_pubs).zip(&decode) {
                    file.push_str(&format!("- url: {url}\n  kvEventsUrl: {publisher}\n"));
                    kv_events.push((url.clone(), publisher.clone(), engine.url()));
                }
                file.push_str(if prefill.is_empty() {
                    "prefill: []\n"
                } else {
                    "prefill:\n"
                });
                for ((host_port, publisher), engine) in
                    prefill_hosts.iter().zip(prefill_pubs).zip(&prefill)
                {
                    file.push_str(&format!(
                        "- hostPort: {host_port}\n  kvEventsUrl: {publisher}\n"
                    ));
                    kv_events.push((host_port.clone(), publisher.clone(), engine.url()));
                }
                std::fs::write(path, file).map_err(|e| format!("{}: {e}", path.display()))?;
                router_args.push(format!("--endpoints={}", path.to_string_lossy()));
                Router::try_start(&[], &[], &router_args, &[]).await?
            }
        };
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
            kv_events,
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

    /// With KV events, waits until every engine's events reach the router: a PUB socket drops
    /// what it sends before its subscriber is connected, so the engines' (empty) caches are
    /// reset, each reset an `AllBlocksCleared`, until the router has counted one from each.
    pub async fn wait_kv_events_connected(&self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        for (label, publisher, engine) in &self.kv_events {
            loop {
                let samples = prom::parse(&self.router.metrics().await?);
                let cleared = samples.iter().any(|s| {
                    s.name == "pd_router_kv_events_total"
                        && s.label("endpoint") == Some(label.as_str())
                        && s.label("type") == Some("AllBlocksCleared")
                        && s.value >= 1.0
                });
                if cleared {
                    break;
                }
                if started.elapsed() >= timeout {
                    return Err(format!(
                        "the KV events of {engine} ({publisher}) did not reach pd-router's index \
                         for {label} within {timeout:?}"
                    ));
                }
                let url = format!("{engine}/reset_prefix_cache");
                try_http(Method::POST, &url, &[], Bytes::new(), READ_TIMEOUT).await?;
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        Ok(())
    }

    /// What the router's precise index got from the engines' KV events; None without them.
    pub async fn kv_feed(&self) -> Result<Option<KvFeed>, String> {
        if self.kv_events.is_empty() {
            return Ok(None);
        }
        let samples = prom::parse(&self.router.metrics().await?);
        let by_type = prom::sum_by(&samples, "pd_router_kv_events_total", "type");
        let get = |k: &str| by_type.get(k).copied().unwrap_or(0.0).max(0.0) as u64;
        Ok(Some(KvFeed {
            events: by_type.values().sum::<f64>().max(0.0) as u64,
            block_stored: get("BlockStored"),
            block_removed: get("BlockRemoved"),
            index_blocks: prom::sum(&samples, "pd_router_kv_index_blocks").max(0.0) as u64,
        }))
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
        if let Some(path) = &self.spec.endpoints_path {
            out.push(format!(
                "  endpoints  {} (KV events from each engine's publisher)",
                path.display()
            ));
            for (label, publisher, _) in &self.kv_events {
                out.push(format!("    {label:<24} kvEventsUrl {publisher}"));
            }
        }
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
            "decode_engine_args": self.spec.decode_engine_args,
            "sidecar_args": if self.sidecars.is_empty() { json!(null) } else { json!(self.spec.sidecar_args) },
            "router_config": self.spec.router_config_path.to_string_lossy(),
            "endpoints_file": self.spec.endpoints_path.as_ref().map(|p| p.to_string_lossy()),
            "kv_events": self.kv_events.iter().map(|(label, publisher, engine)| json!({
                "endpoint": label, "kv_events_url": publisher, "engine": engine,
            })).collect::<Vec<_>>(),
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
