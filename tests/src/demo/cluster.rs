//! A small P/D cluster on loopback for the demo: `engine-sim` processes as prefill and decode
//! engines, one `pd-sidecar` in front of each decode engine. Owns starting it (in parallel), its
//! topology, and fallible readers of what the processes know (sidecar counters, engine state and
//! request logs). Every process is killed when the cluster is dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::prom;
use crate::harness::{try_http, EngineSim, POLL_INTERVAL};

const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What to start: engine counts and the flags of each kind of process.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub prefill_engines: usize,
    pub decode_engines: usize,
    pub prefill_args: Vec<String>,
    pub decode_args: Vec<String>,
    /// Flags of every sidecar besides the ports, which are chosen here.
    pub sidecar_args: Vec<String>,
}

pub use crate::harness::Sidecar;

/// The counters of one sidecar now.
pub async fn counters(sidecar: &Sidecar) -> Result<SidecarCounters, String> {
    let text = sidecar.metrics().await?;
    let samples = prom::parse(&text);
    Ok(SidecarCounters {
        decisions: prom::sum_by(&samples, "pd_sidecar_requests_total", "decision"),
        errors: prom::sum_by(&samples, "pd_sidecar_errors_total", "class"),
        prefill_retries: prom::sum(&samples, "pd_sidecar_prefill_retries_total"),
    })
}

/// The sidecar counters the demo reports, summed over routes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SidecarCounters {
    /// `pd_sidecar_requests_total` by decision (local, remote, fallback, failed, passthrough).
    pub decisions: BTreeMap<String, f64>,
    /// `pd_sidecar_errors_total` by class.
    pub errors: BTreeMap<String, f64>,
    pub prefill_retries: f64,
}

impl SidecarCounters {
    /// `self - before`, keys of either side kept.
    pub fn delta(&self, before: &SidecarCounters) -> SidecarCounters {
        fn sub(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
            let mut out = a.clone();
            for (k, v) in b {
                *out.entry(k.clone()).or_insert(0.0) -= v;
            }
            out.retain(|_, v| *v != 0.0);
            out
        }
        SidecarCounters {
            decisions: sub(&self.decisions, &before.decisions),
            errors: sub(&self.errors, &before.errors),
            prefill_retries: self.prefill_retries - before.prefill_retries,
        }
    }

    /// Sum with another sidecar's counters.
    pub fn add(&mut self, other: &SidecarCounters) {
        for (k, v) in &other.decisions {
            *self.decisions.entry(k.clone()).or_insert(0.0) += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0.0) += v;
        }
        self.prefill_retries += other.prefill_retries;
    }

    pub fn decision(&self, name: &str) -> u64 {
        self.decisions.get(name).copied().unwrap_or(0.0).max(0.0) as u64
    }
}

/// One entry of an engine's request log (`GET /sim/requests`), inference routes only.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub request_id: Option<String>,
    pub path: String,
    pub status: Option<u16>,
    /// The body asked for a remote prefill's KV (`kv_transfer_params.do_remote_prefill`).
    pub remote_prefill: bool,
}

impl EngineRequest {
    fn from_log(v: &Value) -> Option<EngineRequest> {
        let path = v["path"].as_str()?;
        if !(path.starts_with("/v1/") || path.starts_with("/inference/")) {
            return None;
        }
        Some(EngineRequest {
            request_id: v["headers"]["x-request-id"].as_str().map(str::to_string),
            path: path.to_string(),
            status: v["status"].as_u64().map(|s| s as u16),
            remote_prefill: v["body"]["kv_transfer_params"]["do_remote_prefill"] == true,
        })
    }

    pub fn ok(&self) -> bool {
        self.status == Some(200)
    }
}

/// The engines and sidecars of a running cluster.
pub struct Cluster {
    pub spec: ClusterSpec,
    pub prefill: Vec<EngineSim>,
    pub decode: Vec<EngineSim>,
    /// `sidecars[i]` fronts `decode[i]`.
    pub sidecars: Vec<Sidecar>,
    /// Every process's name and log file.
    pub logs: Vec<(String, PathBuf)>,
    pub started_in: Duration,
}

impl Cluster {
    /// Starts every engine in parallel, then one sidecar per decode engine.
    pub async fn start(spec: ClusterSpec) -> Result<Cluster, String> {
        let started = Instant::now();
        let mut engines = Vec::new();
        for (n, args) in [
            (spec.prefill_engines, &spec.prefill_args),
            (spec.decode_engines, &spec.decode_args),
        ] {
            for _ in 0..n {
                let args = args.clone();
                engines.push(tokio::spawn(async move {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    EngineSim::start(&args).await
                }));
            }
        }
        let mut started_engines = Vec::new();
        for e in engines {
            // EngineSim::start panics (printing the engine's log) when it cannot start.
            started_engines.push(
                e.await
                    .map_err(|_| "engine-sim did not start".to_string())?,
            );
        }
        let mut decode = started_engines.split_off(spec.prefill_engines);
        let mut prefill = started_engines;
        let mut sidecar_tasks = Vec::new();
        for d in &decode {
            let (port, args) = (d.port(), spec.sidecar_args.clone());
            sidecar_tasks.push(tokio::spawn(async move {
                Sidecar::try_start(port, &args, &[]).await
            }));
        }
        let mut sidecars = Vec::new();
        for t in sidecar_tasks {
            sidecars.push(t.await.map_err(|e| format!("starting pd-sidecar: {e}"))??);
        }
        let mut logs = Vec::new();
        for (i, p) in prefill.iter_mut().enumerate() {
            logs.push((
                format!("prefill-{i}"),
                p.proc_mut().log_path().to_path_buf(),
            ));
        }
        for (i, (d, s)) in decode.iter_mut().zip(&sidecars).enumerate() {
            logs.push((format!("decode-{i}"), d.proc_mut().log_path().to_path_buf()));
            logs.push((format!("sidecar-{i}"), s.log_path().to_path_buf()));
        }
        Ok(Cluster {
            spec,
            prefill,
            decode,
            sidecars,
            logs,
            started_in: started.elapsed(),
        })
    }

    /// Sidecar counters summed over every sidecar.
    pub async fn sidecar_counters(&self) -> Result<SidecarCounters, String> {
        let mut total = SidecarCounters::default();
        for s in &self.sidecars {
            total.add(&counters(s).await?);
        }
        Ok(total)
    }

    /// Empties every engine's request log.
    pub async fn clear_request_logs(&self) -> Result<(), String> {
        for e in self.prefill.iter().chain(&self.decode) {
            let url = format!("{}/sim/requests", e.url());
            let (status, _, _) =
                try_http(Method::DELETE, &url, &[], Bytes::new(), READ_TIMEOUT).await?;
            if !status.is_success() {
                return Err(format!("DELETE {url}: {status}"));
            }
        }
        Ok(())
    }

    /// The inference requests an engine has logged.
    pub async fn engine_requests(engine: &EngineSim) -> Result<Vec<EngineRequest>, String> {
        let v = get_json(&format!("{}/sim/requests", engine.url())).await?;
        let entries = v.as_array().ok_or("/sim/requests is not an array")?;
        Ok(entries.iter().filter_map(EngineRequest::from_log).collect())
    }

    /// `GET /sim/state` of an engine.
    pub async fn engine_state(engine: &EngineSim) -> Result<Value, String> {
        get_json(&format!("{}/sim/state", engine.url())).await
    }

    /// Replaces an engine's fault configuration (`{}` clears it).
    pub async fn set_faults(engine: &EngineSim, faults: &Value) -> Result<(), String> {
        let url = format!("{}/sim/faults", engine.url());
        let (status, _, body) = try_http(
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            Bytes::from(faults.to_string()),
            READ_TIMEOUT,
        )
        .await?;
        if status != StatusCode::OK {
            return Err(format!(
                "POST {url}: {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(())
    }

    /// KV blocks the prefill engines still hold for remote decodes, per engine.
    pub async fn held_blocks(&self) -> Result<Vec<u64>, String> {
        let mut out = Vec::new();
        for e in &self.prefill {
            out.push(
                Cluster::engine_state(e).await?["held_blocks"]
                    .as_u64()
                    .unwrap_or(0),
            );
        }
        Ok(out)
    }

    /// KV blocks released on notification so far, summed over the prefill engines.
    pub async fn released_blocks(&self) -> Result<u64, String> {
        let mut total = 0;
        for e in &self.prefill {
            total += Cluster::engine_state(e).await?["released_total"]
                .as_u64()
                .unwrap_or(0);
        }
        Ok(total)
    }

    /// Polls until the prefill engines hold no blocks or `timeout` passes; returns what is held
    /// at the end and how long the wait took.
    pub async fn wait_blocks_released(
        &self,
        timeout: Duration,
    ) -> Result<(Vec<u64>, Duration), String> {
        let started = Instant::now();
        loop {
            let held = self.held_blocks().await?;
            if held.iter().all(|b| *b == 0) || started.elapsed() >= timeout {
                return Ok((held, started.elapsed()));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Human-readable topology lines.
    pub fn topology_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, p) in self.prefill.iter().enumerate() {
            out.push(format!(
                "  prefill-{i}  engine-sim  127.0.0.1:{:<5}  {}",
                p.port(),
                self.spec.prefill_args.join(" ")
            ));
        }
        for (i, (d, s)) in self.decode.iter().zip(&self.sidecars).enumerate() {
            out.push(format!(
                "  decode-{i}   engine-sim  127.0.0.1:{:<5}  {}",
                d.port(),
                self.spec.decode_args.join(" ")
            ));
            out.push(format!(
                "    sidecar-{i} pd-sidecar  127.0.0.1:{:<5}  -> decode-{i}, metrics :{}",
                s.port(),
                s.metrics_port()
            ));
        }
        out.push(format!(
            "  sidecar flags: {}",
            self.spec.sidecar_args.join(" ")
        ));
        out
    }

    /// The topology as JSON.
    pub fn topology_json(&self) -> Value {
        json!({
            "prefill": self.prefill.iter().enumerate().map(|(i, p)| json!({
                "name": format!("prefill-{i}"), "port": p.port(), "engine_id": p.engine_id(),
                "args": self.spec.prefill_args,
            })).collect::<Vec<_>>(),
            "decode": self.decode.iter().zip(&self.sidecars).enumerate().map(|(i, (d, s))| json!({
                "name": format!("decode-{i}"), "port": d.port(), "engine_id": d.engine_id(),
                "args": self.spec.decode_args,
                "sidecar": {"port": s.port(), "metrics_port": s.metrics_port(),
                            "args": self.spec.sidecar_args},
            })).collect::<Vec<_>>(),
        })
    }
}

async fn get_text(url: &str) -> Result<String, String> {
    let (status, _, body) = try_http(Method::GET, url, &[], Bytes::new(), READ_TIMEOUT).await?;
    if status != StatusCode::OK {
        return Err(format!("GET {url}: {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

pub async fn get_json(url: &str) -> Result<Value, String> {
    let text = get_text(url).await?;
    serde_json::from_str(&text).map_err(|e| format!("GET {url}: not JSON: {e}"))
}
