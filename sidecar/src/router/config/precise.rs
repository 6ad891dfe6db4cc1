//! The precise prefix-cache index's settings: llm-d's `precise-prefix-cache-producer` (and
//! the all-in-one `precise-prefix-cache-scorer`) parameters, `tokenProcessorConfig`,
//! `kvEventsConfig` and `indexerConfig` with their nested keys as llm-d-router and
//! llm-d-kv-cache name them, read into [`PreciseConfig`] for the KV-event index.
//!
//! Owns these parameters and their defaults; it does not open sockets or index anything.

use serde_json::Value;

use super::plugins::{
    any, at, bool_param, f64_param, leaf, map, note_given, str_param, u32_param, uint_param, Key,
    Sub,
};
use super::scheduling::Unapplied;

const TOKEN_PROCESSOR: &[Key] = &[
    leaf("blockSizeTokens"),
    leaf("blockSize"),
    leaf("hashSeed"),
    leaf("hashAlgorithm"),
];
const POD_DISCOVERY: &[Key] = &[
    leaf("socketPort"),
    leaf("replaySocketPort"),
    leaf("podLabelSelector"),
    leaf("podNamespace"),
];
const KV_EVENTS: &[Key] = &[
    leaf("zmqEndpoint"),
    leaf("topicFilter"),
    leaf("concurrency"),
    leaf("engineType"),
    leaf("discoverPods"),
    map("podDiscoveryConfig", POD_DISCOVERY),
];
const IN_MEMORY_INDEX: &[Key] = &[leaf("size"), leaf("podCacheSize")];
const ADDRESS: &[Key] = &[leaf("address")];
const SIZE: &[Key] = &[leaf("size")];
const BLOCK_INDEX: &[Key] = &[
    map("inMemoryConfig", IN_MEMORY_INDEX),
    map("redisConfig", ADDRESS),
    map("valkeyConfig", ADDRESS),
    map("costAwareMemoryConfig", SIZE),
    leaf("enableMetrics"),
    leaf("metricsLoggingInterval"),
];
const BACKEND: &[Key] = &[leaf("name"), leaf("weight")];
const TOKENIZERS_POOL: &[Key] = &[
    leaf("modelName"),
    leaf("workersCount"),
    leaf("minPrefixOverlapRatio"),
    map(
        "local",
        &[
            leaf("autoDiscoveryDir"),
            leaf("autoDiscoveryTokenizerFileName"),
            any("modelTokenizerMap"),
        ],
    ),
    map("uds", &[leaf("socketFile")]),
    map(
        "hf",
        &[
            leaf("enabled"),
            leaf("huggingFaceToken"),
            leaf("tokenizersCacheDir"),
        ],
    ),
];
const INDEXER: &[Key] = &[
    map("kvBlockIndexConfig", BLOCK_INDEX),
    Key("kvCacheBackendConfigs", Sub::List(BACKEND)),
    map("tokenizersPoolConfig", TOKENIZERS_POOL),
    map("prefixStoreConfig", &[leaf("cacheSize"), leaf("blockSize")]),
    // Older llm-d-kv-cache-manager configs kept the token processor inside the indexer.
    map("tokenProcessorConfig", TOKEN_PROCESSOR),
];
pub(crate) const PRECISE: &[Key] = &[
    map("tokenProcessorConfig", TOKEN_PROCESSOR),
    map("indexerConfig", INDEXER),
    map("kvEventsConfig", KV_EVENTS),
    leaf("speculativeIndexing"),
    leaf("speculativeTTL"),
];

/// A KV-cache medium and the weight of its blocks in the score
/// (`indexerConfig.kvCacheBackendConfigs`; llm-d's defaults are gpu 1.0, cpu 0.8).
#[derive(Clone, Debug, PartialEq)]
pub struct MediumWeight {
    pub name: String,
    pub weight: f64,
}

/// The precise prefix-cache index's settings: llm-d's `precise-prefix-cache-producer` (or
/// the all-in-one `precise-prefix-cache-scorer`) parameters, for the index fed by the
/// engines' KV events. Every field is what the config said (None: not given); the methods
/// give llm-d's defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PreciseConfig {
    /// The plugin that defines the index.
    pub producer: String,
    /// Scorer plugins (of the profiles) whose prefix score the index is to feed.
    pub scorers: Vec<String>,
    /// `tokenProcessorConfig.blockSizeTokens` (or the deprecated `blockSize`): tokens per
    /// block, the engines' `--block-size`.
    pub block_size: Option<u32>,
    /// `tokenProcessorConfig.hashSeed`: the engines' `PYTHONHASHSEED`.
    pub hash_seed: Option<String>,
    /// `tokenProcessorConfig.hashAlgorithm` (llm-d's own index keys; noted as unapplied).
    pub hash_algorithm: Option<String>,
    /// `kvEventsConfig.zmqEndpoint`: centralized mode, every engine publishes here.
    pub zmq_endpoint: Option<String>,
    /// `kvEventsConfig.topicFilter`.
    pub topic_filter: Option<String>,
    pub concurrency: Option<u32>,
    /// `kvEventsConfig.engineType`; only `vllm` is accepted.
    pub engine_type: Option<String>,
    /// `kvEventsConfig.discoverPods`: per-endpoint mode.
    pub discover_pods: Option<bool>,
    /// `kvEventsConfig.podDiscoveryConfig.socketPort`: each engine's PUB socket.
    pub socket_port: Option<u16>,
    /// `kvEventsConfig.podDiscoveryConfig.replaySocketPort`: each engine's replay ROUTER socket.
    pub replay_socket_port: Option<u16>,
    pub pod_label_selector: Option<String>,
    pub pod_namespace: Option<String>,
    /// `indexerConfig.kvBlockIndexConfig.inMemoryConfig.size`: block keys held in all.
    pub index_size: Option<u64>,
    /// `indexerConfig.kvBlockIndexConfig.inMemoryConfig.podCacheSize`: endpoints per key.
    pub pod_cache_size: Option<u32>,
    /// `indexerConfig.kvCacheBackendConfigs` (empty: not given).
    pub backends: Vec<MediumWeight>,
    /// `indexerConfig.kvBlockIndexConfig.enableMetrics`.
    pub enable_metrics: Option<bool>,
    pub speculative_indexing: bool,
    pub speculative_ttl: Option<std::time::Duration>,
}

/// Where the per-endpoint mode subscribes: `tcp://<endpoint host>:<socket_port>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerEndpoint {
    pub socket_port: u16,
    /// The engine's replay socket, when configured (llm-d: disabled unless set).
    pub replay_socket_port: Option<u16>,
}

impl PreciseConfig {
    /// vLLM's default block size, llm-d's default `blockSizeTokens`.
    pub const DEFAULT_BLOCK_SIZE: u32 = 16;
    /// llm-d's default `socketPort` (and vLLM's default publisher port).
    pub const DEFAULT_SOCKET_PORT: u16 = 5557;
    /// llm-d's default `topicFilter`.
    pub const DEFAULT_TOPIC_FILTER: &'static str = "kv@";

    pub fn block_size(&self) -> u32 {
        self.block_size.unwrap_or(Self::DEFAULT_BLOCK_SIZE)
    }

    pub fn topic_filter(&self) -> &str {
        self.topic_filter
            .as_deref()
            .unwrap_or(Self::DEFAULT_TOPIC_FILTER)
    }

    /// llm-d's centralized ("global socket") mode: the ZMQ address the router binds (`*`) or
    /// connects to, to which every engine publishes.
    pub fn centralized_endpoint(&self) -> Option<&str> {
        self.zmq_endpoint.as_deref()
    }

    /// llm-d's per-pod mode: subscribe to each endpoint's own publisher. On when
    /// `discoverPods` is true, or not given and no `zmqEndpoint` is (llm-d-router turns pod
    /// discovery on by default; configs that name a `zmqEndpoint` alone mean the centralized
    /// mode).
    /// How long a pick counts in the exact index before the engine's events
    /// confirm it: `speculativeTTL` (2s, llm-d's default) when
    /// `speculativeIndexing` is on.
    pub fn speculative_ttl(&self) -> Option<std::time::Duration> {
        self.speculative_indexing.then(|| {
            self.speculative_ttl
                .unwrap_or(std::time::Duration::from_secs(2))
        })
    }

    pub fn per_endpoint(&self) -> Option<PerEndpoint> {
        let on = self.discover_pods.unwrap_or(self.zmq_endpoint.is_none());
        on.then(|| PerEndpoint {
            socket_port: self.socket_port.unwrap_or(Self::DEFAULT_SOCKET_PORT),
            replay_socket_port: self.replay_socket_port,
        })
    }
}

/// A TCP port; 0 and negative values mean "not set", as llm-d reads them.
fn port_param(label: &str, params: &Value, path: &str) -> Result<Option<u16>, String> {
    match at(params, path) {
        None => Ok(None),
        Some(v) if v.as_i64().is_some_and(|n| n <= 0) => Ok(None),
        Some(v) => match v.as_u64().and_then(|n| u16::try_from(n).ok()) {
            Some(p) => Ok(Some(p)),
            None => Err(format!(
                "plugin {label}: parameter \"{path}\" must be a port (1-65535), got {v}"
            )),
        },
    }
}

/// The parameters of precise-prefix-cache-producer (and of the all-in-one scorer).
pub(crate) fn precise_config(
    name: &str,
    label: &str,
    p: &Value,
    out: &mut Vec<Unapplied>,
) -> Result<PreciseConfig, String> {
    // The token processor: at the top (llm-d-router) or inside indexerConfig (older configs).
    let token = |key: &str, read: &dyn Fn(&str) -> Result<Option<String>, String>| {
        let top = read(&format!("tokenProcessorConfig.{key}"))?;
        let old = read(&format!("indexerConfig.tokenProcessorConfig.{key}"))?;
        match (top, old) {
            (Some(a), Some(b)) if a != b => Err(format!(
                "plugin {label}: tokenProcessorConfig.{key} ({a}) and \
                 indexerConfig.tokenProcessorConfig.{key} ({b}) disagree"
            )),
            (a, b) => Ok(a.or(b)),
        }
    };
    let num = |path: &str| -> Result<Option<String>, String> {
        Ok(u32_param(label, p, path, 1)?.map(|n| n.to_string()))
    };
    let seed = |path: &str| -> Result<Option<String>, String> {
        // PYTHONHASHSEED is a number; llm-d types it as a string, YAML may leave it unquoted.
        match at(p, path) {
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            _ => str_param(label, p, path),
        }
    };
    let text = |path: &str| str_param(label, p, path);
    let tokens = token("blockSizeTokens", &num)?;
    let legacy = token("blockSize", &num)?;
    let block_size = match (tokens, legacy) {
        (Some(t), Some(b)) if t != b => {
            return Err(format!(
                "plugin {label}: tokenProcessorConfig.blockSizeTokens {t} and the deprecated \
                 blockSize {b} disagree; give blockSizeTokens only"
            ))
        }
        (t, b) => t.or(b).and_then(|n| n.parse().ok()),
    };
    let hash_seed = token("hashSeed", &seed)?;
    let hash_algorithm = token("hashAlgorithm", &text)?;
    if let Some(alg) = &hash_algorithm {
        if alg != "cbor-fnv" && alg != "xxh64" {
            return Err(format!(
                "plugin {label}: tokenProcessorConfig.hashAlgorithm \"{alg}\" is not one of \
                 cbor-fnv, xxh64"
            ));
        }
        out.push(Unapplied::new(
            format!("plugin {label} parameter tokenProcessorConfig.hashAlgorithm"),
            "pd-router keys its index by its own chain of the events' token ids",
        ));
    }
    let zmq_endpoint = str_param(label, p, "kvEventsConfig.zmqEndpoint")?.filter(|e| !e.is_empty());
    if let Some(e) = &zmq_endpoint {
        if !e.contains("://") {
            return Err(format!(
                "plugin {label}: kvEventsConfig.zmqEndpoint \"{e}\" is not a ZMQ address such \
                 as tcp://*:5557"
            ));
        }
    }
    let engine_type = str_param(label, p, "kvEventsConfig.engineType")?;
    if let Some(t) = &engine_type {
        if t != "vllm" {
            return Err(format!(
                "plugin {label}: kvEventsConfig.engineType \"{t}\": pd-router decodes vLLM's KV \
                 events only (engineType: vllm)"
            ));
        }
    }
    let mut backends = Vec::new();
    if let Some(Value::Array(items)) = at(p, "indexerConfig.kvCacheBackendConfigs") {
        for (i, item) in items.iter().enumerate() {
            let path = format!("indexerConfig.kvCacheBackendConfigs[{i}]");
            let name = str_param(label, item, "name")
                .map_err(|e| e.replace("\"name\"", &format!("\"{path}.name\"")))?
                .ok_or_else(|| format!("plugin {label}: {path} needs a name (gpu, cpu, ...)"))?;
            let weight = f64_param(label, item, "weight", (0.0, f64::MAX))
                .map_err(|e| e.replace("\"weight\"", &format!("\"{path}.weight\"")))?
                .unwrap_or(0.0);
            backends.push(MediumWeight { name, weight });
        }
    }
    let cfg = PreciseConfig {
        producer: name.to_string(),
        scorers: Vec::new(),
        block_size,
        hash_seed,
        hash_algorithm,
        zmq_endpoint,
        topic_filter: str_param(label, p, "kvEventsConfig.topicFilter")?,
        concurrency: u32_param(label, p, "kvEventsConfig.concurrency", 1)?,
        engine_type,
        discover_pods: bool_param(label, p, "kvEventsConfig.discoverPods")?,
        socket_port: port_param(label, p, "kvEventsConfig.podDiscoveryConfig.socketPort")?,
        replay_socket_port: port_param(
            label,
            p,
            "kvEventsConfig.podDiscoveryConfig.replaySocketPort",
        )?,
        pod_label_selector: str_param(
            label,
            p,
            "kvEventsConfig.podDiscoveryConfig.podLabelSelector",
        )?,
        pod_namespace: str_param(label, p, "kvEventsConfig.podDiscoveryConfig.podNamespace")?,
        index_size: uint_param(
            label,
            p,
            "indexerConfig.kvBlockIndexConfig.inMemoryConfig.size",
            1,
        )?,
        pod_cache_size: u32_param(
            label,
            p,
            "indexerConfig.kvBlockIndexConfig.inMemoryConfig.podCacheSize",
            1,
        )?,
        backends,
        enable_metrics: bool_param(label, p, "indexerConfig.kvBlockIndexConfig.enableMetrics")?,
        speculative_indexing: bool_param(label, p, "speculativeIndexing")?.unwrap_or(false),
        speculative_ttl: str_param(label, p, "speculativeTTL")?
            .map(|t| {
                crate::config::parse_duration(&t)
                    .map_err(|e| format!("plugin {label} parameter speculativeTTL: {e}"))
            })
            .transpose()?,
    };
    note_given(
        out,
        label,
        p,
        &[
            "indexerConfig.kvBlockIndexConfig.redisConfig",
            "indexerConfig.kvBlockIndexConfig.valkeyConfig",
            "indexerConfig.kvBlockIndexConfig.costAwareMemoryConfig",
        ],
        "pd-router keeps its index in its own memory",
    );
    note_given(
        out,
        label,
        p,
        &["indexerConfig.kvBlockIndexConfig.metricsLoggingInterval"],
        "the index's metrics are on pd-router's /metrics, never logged",
    );
    note_given(
        out,
        label,
        p,
        &[
            "indexerConfig.tokenizersPoolConfig",
            "indexerConfig.prefixStoreConfig",
        ],
        "pd-router tokenizes with --tokenizer",
    );
    note_given(
        out,
        label,
        p,
        &["kvEventsConfig.concurrency"],
        "pd-router decodes the events on its own tasks",
    );
    note_given(
        out,
        label,
        p,
        &[
            "kvEventsConfig.podDiscoveryConfig.podLabelSelector",
            "kvEventsConfig.podDiscoveryConfig.podNamespace",
        ],
        "pd-router's endpoints come from its flags, endpoints file and DNS names, not from pod \
         discovery",
    );
    Ok(cfg)
}
