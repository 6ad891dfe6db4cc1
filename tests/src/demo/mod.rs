//! The building blocks of `pd-demo`: start a P/D cluster on loopback ([`cluster`]), drive
//! phases of a workload through it ([`workload`], [`client`], [`run_phase`]), and report what
//! happened from three sources that must agree: what the client saw, the sidecars' Prometheus
//! counters and the engines' own request logs ([`report`]).
//!
//! Extending it: a new workload is a function returning [`workload::Phase`]s; a new mode (a
//! router in front, real KV bytes, ...) is a [`Mode`] variant with its own [`cluster::ClusterSpec`]
//! and request targets in [`prepare`].

pub mod client;
pub mod cluster;
pub mod prom;
pub mod report;
pub mod workload;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use client::{DemoClient, Outcome, Prepared};
use cluster::{Cluster, EngineRequest, SidecarCounters};
use workload::Phase;

/// How long the prefill engines get to see their KV holds released after a phase.
pub const RELEASE_DEADLINE: Duration = Duration::from_secs(5);

/// How the cluster is put together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The client names the prefill engine (`x-prefiller-host-port`) and sends to the sidecar of
    /// a decode engine, as a router would.
    Sidecar,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sidecar => "sidecar",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Mode::Sidecar => {
                "the client plays the router: it picks a decode engine's pd-sidecar and names a \
                 prefill engine in x-prefiller-host-port"
            }
        }
    }
}

/// The raw record of one phase; [`report::analyze`] turns it into numbers and verdicts.
pub struct PhaseRun {
    pub outcomes: Vec<Outcome>,
    /// Sidecar counters during the phase, summed over sidecars.
    pub counters: SidecarCounters,
    /// Inference requests each prefill engine logged during the phase.
    pub prefill_log: Vec<Vec<EngineRequest>>,
    /// Inference requests each decode engine logged during the phase.
    pub decode_log: Vec<Vec<EngineRequest>>,
    /// Injected failures not consumed by the end of the phase, per fault.
    pub faults_left: Vec<u64>,
    /// KV blocks still held per prefill engine after waiting up to [`RELEASE_DEADLINE`].
    pub held_left: Vec<u64>,
    pub held_wait: Duration,
    /// KV blocks the prefill engines released on a decode engine's notification.
    pub released_blocks: u64,
    /// From the first request sent to the last answer.
    pub wall: Duration,
}

/// The HTTP requests of a phase in `mode`.
pub fn prepare(mode: Mode, cluster: &Cluster, phase: &Phase) -> Vec<Prepared> {
    match mode {
        Mode::Sidecar => phase
            .requests
            .iter()
            .map(|r| {
                let mut headers = Vec::new();
                if let Some(p) = r.prefiller {
                    headers.push((
                        "x-prefiller-host-port".to_string(),
                        cluster.prefill[p].host_port(),
                    ));
                }
                Prepared {
                    id: r.id.clone(),
                    url: cluster.sidecars[r.decode].url(r.route.path()),
                    headers,
                    body: Bytes::from(r.body.to_string()),
                    stream: r.stream,
                }
            })
            .collect(),
    }
}

/// Runs one phase: clear the engines' logs, inject its faults, send its requests, clear the
/// faults, wait for KV holds to be released, and collect counters and logs.
pub async fn run_phase(
    mode: Mode,
    cluster: &Cluster,
    client: &DemoClient,
    phase: &Phase,
    concurrency: usize,
    done: Arc<AtomicUsize>,
) -> Result<PhaseRun, String> {
    cluster.clear_request_logs().await?;
    let before = cluster.sidecar_counters().await?;
    let released_before = cluster.released_blocks().await?;
    for f in &phase.faults {
        Cluster::set_faults(&cluster.prefill[f.prefill_engine], &f.config).await?;
    }
    let prepared = prepare(mode, cluster, phase);
    let started = Instant::now();
    let outcomes = client.run_all(prepared, concurrency, done).await;
    let wall = started.elapsed();
    let mut faults_left = Vec::new();
    for f in &phase.faults {
        let engine = &cluster.prefill[f.prefill_engine];
        let now = cluster::get_json(&format!("{}/sim/faults", engine.url())).await?;
        faults_left.push(now["fail_next"].as_u64().unwrap_or(0));
        Cluster::set_faults(engine, &json!({})).await?;
    }
    let (held_left, held_wait) = cluster.wait_blocks_released(RELEASE_DEADLINE).await?;
    let counters = cluster.sidecar_counters().await?.delta(&before);
    let released_blocks = cluster
        .released_blocks()
        .await?
        .saturating_sub(released_before);
    let mut prefill_log = Vec::new();
    for e in &cluster.prefill {
        prefill_log.push(Cluster::engine_requests(e).await?);
    }
    let mut decode_log = Vec::new();
    for e in &cluster.decode {
        decode_log.push(Cluster::engine_requests(e).await?);
    }
    Ok(PhaseRun {
        outcomes,
        counters,
        prefill_log,
        decode_log,
        faults_left,
        held_left,
        held_wait,
        released_blocks,
        wall,
    })
}
