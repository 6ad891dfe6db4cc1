//! The building blocks of `pd-demo`: the four ways of serving the same workload ([`Mode`]),
//! starting a cluster for one ([`cluster`]), replaying the workload through it ([`workload`],
//! [`client`], [`run_mode`]), and reporting what happened ([`report`]).
//!
//! Every mode runs on the same four engines' worth of hardware and a fresh cluster (cold caches),
//! behind `pd-router`; only the router's EndpointPickerConfig and the engines' roles differ (and,
//! for the precise mode, the engines publish their KV events to the router). Every engine runs
//! with `--byte-tokens`, so its token ids are the router's prompt bytes: what the precise index
//! needs to match, and kept in every mode so that the modes stay comparable.

pub mod client;
pub mod cluster;
pub mod prom;
pub mod report;
pub mod workload;

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{DemoClient, Outcome};
use cluster::{Cluster, ClusterSpec, Decisions, EngineTotals, KvFeed};
use workload::Session;

/// How long the prefill engines get to see their KV holds released after a mode's run.
pub const RELEASE_DEADLINE: Duration = Duration::from_secs(10);

/// Prompt tokens the decode engine lacks at or above which selective P/D prefills remotely.
pub const SELECTIVE_THRESHOLD: u64 = 512;

/// Tokens per block of the router's prefix index (the engines' block size).
pub const BLOCK_SIZE: u64 = 16;

/// The engine-sim flag that makes its token ids the router's prompt bytes.
pub const BYTE_TOKENS: &str = "--byte-tokens";

/// How long the engines' KV events get to reach the router before a precise run.
pub const KV_EVENTS_DEADLINE: Duration = Duration::from_secs(20);

/// How the cluster serves requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No P/D: every engine prefills and decodes its own requests; the router balances load.
    Aggregated,
    /// Every request is prefilled on a prefill engine and its KV pulled by a decode engine;
    /// the router balances load.
    PdAlways,
    /// The router sends each request to the decode engine with the most of its prefix cached
    /// (load permitting) and prefills remotely only when that engine lacks at least
    /// [`SELECTIVE_THRESHOLD`] tokens of it.
    PdSelective,
    /// As [`Mode::PdSelective`], but the router scores prefixes on its precise index: the
    /// blocks each engine reports holding in its KV events (vLLM's, over ZMQ), evictions
    /// included, instead of the prompts the router once sent it.
    PdSelectivePrecise,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Aggregated,
        Mode::PdAlways,
        Mode::PdSelective,
        Mode::PdSelectivePrecise,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Aggregated => "aggregated",
            Mode::PdAlways => "pd-always",
            Mode::PdSelective => "pd-selective",
            Mode::PdSelectivePrecise => "pd-selective-precise",
        }
    }

    pub fn describe(self) -> String {
        match self {
            Mode::Aggregated => {
                "4 engines each prefill and decode; pd-router picks the least busy (no P/D, \
                 cache-blind)"
                    .into()
            }
            Mode::PdAlways => "2 prefill + 2 decode engines; every request prefilled remotely, \
                 KV pulled by the decode engine; pd-router picks the least busy pair \
                 (cache-blind)"
                .into(),
            Mode::PdSelective => format!(
                "2 prefill + 2 decode engines; pd-router picks by prefix cache and load, and \
                 prefills remotely only when the decode engine lacks >= {SELECTIVE_THRESHOLD} \
                 prompt tokens"
            ),
            Mode::PdSelectivePrecise => "as pd-selective, but the prefix cache is known from \
                 the engines' KV events over ZMQ (what each engine holds), not from what \
                 pd-router sent where; a pick counts for 2 s until the events confirm it \
                 (llm-d's speculative indexing)"
                .into(),
        }
    }

    pub fn prefill_engines(self) -> usize {
        match self {
            Mode::Aggregated => 0,
            Mode::PdAlways | Mode::PdSelective | Mode::PdSelectivePrecise => 2,
        }
    }

    /// Whether the engines publish their KV events to the router (its precise index).
    pub fn kv_events(self) -> bool {
        self == Mode::PdSelectivePrecise
    }

    /// The router's EndpointPickerConfig for this mode (llm-d's format).
    pub fn router_config(self) -> String {
        let header =
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";
        let load_only_profile = |name: &str| {
            format!(
                "- name: {name}\n  plugins:\n  - pluginRef: load-aware-scorer\n    weight: 1\n  \
                 - pluginRef: max-score-picker\n"
            )
        };
        match self {
            Mode::Aggregated => format!(
                "{header}# No P/D: nonCachedTokens 0 never prefills remotely.\nplugins:\n\
                 - type: load-aware-scorer\n- type: max-score-picker\n\
                 - type: prefix-based-pd-decider\n  parameters:\n    nonCachedTokens: 0\n\
                 schedulingProfiles:\n{}",
                load_only_profile("decode")
            ),
            Mode::PdAlways => format!(
                "{header}# P/D for every request (nonCachedTokens 1), cache-blind picks.\nplugins:\n\
                 - type: load-aware-scorer\n- type: max-score-picker\n\
                 - type: prefix-based-pd-decider\n  parameters:\n    nonCachedTokens: 1\n\
                 schedulingProfiles:\n{}{}",
                load_only_profile("decode"),
                load_only_profile("prefill")
            ),
            Mode::PdSelective | Mode::PdSelectivePrecise => {
                let (scorer, note, parameters) = if self == Mode::PdSelective {
                    (
                        "prefix-cache-scorer",
                        "prefix cache as the router recorded its own picks",
                        format!(
                            "    blockSize: {BLOCK_SIZE}\n    maxPrefixBlocksToMatch: 1024\n    \
                             lruCapacityPerServer: 31250\n"
                        ),
                    )
                } else {
                    (
                        "precise-prefix-cache-scorer",
                        "prefix cache as the engines' KV events say",
                        format!(
                            "    tokenProcessorConfig:\n      blockSize: {BLOCK_SIZE}\n    \
                             kvEventsConfig:\n      # Per pod: the router connects to each \
                             endpoint's publisher,\n      # the endpoints file's kvEventsUrl \
                             (socketPort is the fallback).\n      discoverPods: true\n      \
                             podDiscoveryConfig:\n        socketPort: 5557\n    \
                             # A pick counts until the engine's events confirm it (llm-d's \
                             default TTL).\n    speculativeIndexing: true\n    \
                             speculativeTTL: 2s\n"
                        ),
                    )
                };
                let profile = |name: &str| {
                    format!(
                        "- name: {name}\n  plugins:\n  - pluginRef: {scorer}\n    \
                         weight: 2\n  - pluginRef: load-aware-scorer\n    weight: 1\n  \
                         - pluginRef: max-score-picker\n"
                    )
                };
                format!(
                    "{header}# Cache-aware picks ({note}); P/D only when the decode engine \
                     lacks >= {SELECTIVE_THRESHOLD} tokens.\nplugins:\n\
                     - type: {scorer}\n  parameters:\n{parameters}\
                     - type: load-aware-scorer\n- type: max-score-picker\n\
                     - type: prefix-based-pd-decider\n  parameters:\n    nonCachedTokens: \
                     {SELECTIVE_THRESHOLD}\nschedulingProfiles:\n{}{}",
                    profile("decode"),
                    profile("prefill")
                )
            }
        }
    }

    /// The cluster this mode runs on: 4 engines in all, each with `--byte-tokens` (added
    /// when `engine_args` lacks it); `decode_args` go to the decode engines only.
    pub fn cluster_spec(
        self,
        engine_args: &[String],
        decode_args: &[String],
        out_dir: &Path,
    ) -> ClusterSpec {
        let prefill = self.prefill_engines();
        let mut engine_args = engine_args.to_vec();
        if !engine_args.iter().any(|a| a == BYTE_TOKENS) {
            engine_args.push(BYTE_TOKENS.into());
        }
        ClusterSpec {
            prefill_engines: prefill,
            decode_engines: 4 - prefill,
            engine_args,
            decode_engine_args: decode_args.to_vec(),
            // The router decides; the sidecar prefills remotely whenever it names a prefiller.
            sidecar_args: vec![
                "--bind=127.0.0.1".into(),
                "--kv-connector=nixlv2".into(),
                "--prefill-threshold-tokens=0".into(),
            ],
            router_config: self.router_config(),
            router_config_path: out_dir.join(format!("router-{}.yaml", self.name())),
            endpoints_path: self
                .kv_events()
                .then(|| out_dir.join(format!("endpoints-{}.yaml", self.name()))),
        }
    }
}

/// The raw record of one mode's run; [`report::analyze`] turns it into numbers and verdicts.
pub struct ModeRun {
    pub mode: Mode,
    pub outcomes: Vec<Outcome>,
    /// Engine counters over the run (after minus before).
    pub engines: EngineTotals,
    pub decisions: Decisions,
    /// What the router's precise index got from the engines' KV events (precise mode only).
    pub kv_feed: Option<KvFeed>,
    /// KV blocks still held by prefill engines after waiting up to [`RELEASE_DEADLINE`].
    pub held_left: u64,
    /// From the first request sent to the last answer.
    pub wall: Duration,
    pub cluster_started_in: Duration,
    pub topology: serde_json::Value,
}

/// Starts a cluster for `mode`, replays `sessions` with `users` in flight, waits for KV holds
/// to be released, and collects the counters.
pub async fn run_mode(
    mode: Mode,
    engine_args: &[String],
    decode_args: &[String],
    out_dir: &Path,
    sessions: Arc<Vec<Session>>,
    users: usize,
    done: Arc<AtomicUsize>,
) -> Result<(ModeRun, Cluster), String> {
    let cluster = Cluster::start(mode.cluster_spec(engine_args, decode_args, out_dir)).await?;
    // A publisher drops what it sends before the router has subscribed: make sure every
    // engine's events arrive before the first request.
    cluster.wait_kv_events_connected(KV_EVENTS_DEADLINE).await?;
    let before = cluster.engine_totals().await?;
    let client = DemoClient::new();
    let started = Instant::now();
    let outcomes = client
        .replay(&cluster.entry_url(), sessions, users, done)
        .await;
    let wall = started.elapsed();
    let held_left = cluster.wait_blocks_released(RELEASE_DEADLINE).await?;
    let after = cluster.engine_totals().await?;
    let decisions = cluster.decisions().await?;
    let kv_feed = cluster.kv_feed().await?;
    let engines = EngineTotals {
        kv_bytes_pulled: after.kv_bytes_pulled - before.kv_bytes_pulled,
        kv_pull_micros: after.kv_pull_micros - before.kv_pull_micros,
        kv_pulls_ok: after.kv_pulls_ok - before.kv_pulls_ok,
        kv_pulls_failed: after.kv_pulls_failed - before.kv_pulls_failed,
        kv_integrity_failures: after.kv_integrity_failures - before.kv_integrity_failures,
        prefix_cache_queries: after.prefix_cache_queries - before.prefix_cache_queries,
        prefix_cache_hits: after.prefix_cache_hits - before.prefix_cache_hits,
        prompt_tokens_computed: after.prompt_tokens_computed - before.prompt_tokens_computed,
        held_blocks: after.held_blocks,
        released_blocks: after.released_blocks - before.released_blocks,
        expired_blocks: after.expired_blocks - before.expired_blocks,
    };
    let run = ModeRun {
        mode,
        outcomes,
        engines,
        decisions,
        kv_feed,
        held_left,
        wall,
        cluster_started_in: cluster.started_in,
        topology: cluster.topology_json(),
    };
    Ok((run, cluster))
}
