//! One plugin definition of an EndpointPickerConfig: the `type`s pd-router knows, each
//! parameter checked key by key (nested mappings too, so a misspelt
//! `kvEventsConfig.podDiscoveryConfig.sockePort` is named) and read into typed values.
//!
//! Owns the plugin catalogue and what each parameter means here; what pd-router accepts but
//! does not do is returned as [`Unapplied`] notes. It does not resolve references between
//! plugins or build profiles (that is `scheduling.rs`).

use serde_json::Value;

use super::precise::PreciseConfig;
use super::precise::{precise_config, PRECISE};
use super::scheduling::{PickerSpec, PrefixParams, RawPlugin, ScorerSpec, Unapplied};

/// What the value under a parameter key may be.
#[derive(Clone, Copy)]
pub(crate) enum Sub {
    /// A scalar (string, number, bool) or null.
    Leaf,
    /// A mapping with these keys (or null).
    Map(&'static [Key]),
    /// A list of mappings with these keys (or null).
    List(&'static [Key]),
    /// Anything: kept opaque because nothing here reads it.
    Any,
}

/// One accepted parameter key.
#[derive(Clone, Copy)]
pub(crate) struct Key(pub &'static str, pub Sub);

pub(super) const fn leaf(name: &'static str) -> Key {
    Key(name, Sub::Leaf)
}

pub(super) const fn map(name: &'static str, keys: &'static [Key]) -> Key {
    Key(name, Sub::Map(keys))
}

pub(super) const fn any(name: &'static str) -> Key {
    Key(name, Sub::Any)
}

// llm-d's parameter shapes (llm-d-router's plugin configs and llm-d-kv-cache's index configs).

const PREFIX_SCORER: &[Key] = &[
    leaf("blockSize"),
    leaf("maxPrefixBlocksToMatch"),
    leaf("lruCapacityPerServer"),
    leaf("prefixMatchInfoProducerName"),
    leaf("matchLengthWeight"),
    leaf("matchLengthScaleTokens"),
];
const APPROX_PRODUCER: &[Key] = &[
    leaf("blockSizeTokens"),
    leaf("blockSize"),
    leaf("maxPrefixTokensToMatch"),
    leaf("maxPrefixBlocksToMatch"),
    leaf("lruCapacityPerServer"),
    leaf("autoTune"),
];
const DISAGG_HANDLER: &[Key] = &[
    leaf("stageOrder"),
    map(
        "profiles",
        &[leaf("decode"), leaf("prefill"), leaf("encode")],
    ),
    map("deciders", &[leaf("prefill"), leaf("encode")]),
    // The deprecated flat shape (llm-d-router still reads it).
    leaf("decodeProfile"),
    leaf("prefillProfile"),
    leaf("encodeProfile"),
    leaf("prefillDeciderPluginName"),
    leaf("encodeDeciderPluginName"),
    leaf("deciderPluginName"),
];
const LABEL_SELECTOR: &[Key] = &[
    any("matchLabels"),
    Key(
        "matchExpressions",
        Sub::List(&[leaf("key"), leaf("operator"), Key("values", Sub::Any)]),
    ),
];

const BY_LABEL: &[Key] = &[leaf("label"), any("validValues"), leaf("allowsNoLabel")];
const TOKEN_PRODUCER: &[Key] = &[
    leaf("modelName"),
    map(
        "vllm",
        &[
            leaf("url"),
            leaf("http"),
            leaf("timeout"),
            leaf("mmTimeout"),
        ],
    ),
    map("udsTokenizerConfig", &[leaf("socketFile")]),
    any("estimate"),
];
const K8S_SOURCE: &[Key] = &[leaf("group"), leaf("version"), leaf("kind")];
const METRICS_SOURCE: &[Key] = &[
    leaf("scheme"),
    leaf("path"),
    leaf("port"),
    leaf("insecureSkipVerify"),
    leaf("caCertPath"),
    leaf("clientCertPath"),
    leaf("clientKeyPath"),
    leaf("interval"),
];
const METRICS_EXTRACTOR: &[Key] = &[
    leaf("engineLabelKey"),
    leaf("defaultEngine"),
    any("engineConfigs"),
];
const ACTIVE_REQUEST: &[Key] = &[
    leaf("requestTimeout"),
    leaf("idleThreshold"),
    leaf("maxBusyScore"),
    leaf("inFlightLoadProducerName"),
];
const HEADER_HANDLER: &[Key] = &[leaf("prefillProfile"), leaf("encodeProfile")];
const PREFIX_DECIDER: &[Key] = &[leaf("nonCachedTokens"), leaf("promptTokens")];
const THRESHOLD: &[Key] = &[leaf("threshold")];
const PICKER: &[Key] = &[leaf("maxNumOfEndpoints")];

/// llm-d's label for a pod's P/D role.
pub const ROLE_LABEL: &str = "llm-d.ai/role";

/// Plugin types the router knows, for the "unknown type" message.
pub(crate) const PLUGIN_TYPES: &[&str] = &[
    "prefix-cache-scorer",
    "load-aware-scorer",
    "active-request-scorer",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "kv-cache-scorer",
    "precise-prefix-cache-scorer",
    "approx-prefix-cache-producer",
    "precise-prefix-cache-producer",
    "max-score-picker",
    "random-picker",
    "decode-filter",
    "prefill-filter",
    "encode-filter",
    "label-selector-filter",
    "by-label-selector",
    "by-label",
    "single-profile-handler",
    "disagg-profile-handler",
    "pd-profile-handler",
    "prefill-header-handler",
    "disagg-headers-handler",
    "prefix-based-pd-decider",
    "always-disagg-pd-decider",
    "always-disagg-multimodal-decider",
    "token-producer",
    "tokenizer",
    "endpoint-notification-source",
    "k8s-notification-source",
    "metrics-data-source",
    "core-metrics-extractor",
];

/// How a decider plugin decides P/D.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decider {
    /// pd-profile-handler's `threshold` (None: not given).
    Handler(Option<u64>),
    /// prefix-based-pd-decider.
    Prefix {
        non_cached: Option<u64>,
        prompt_tokens: Option<u64>,
    },
    /// always-disagg-pd-decider.
    Always,
    /// always-disagg-multimodal-decider: decides the encode stage, which pd-router has not.
    Encode,
}

/// disagg-profile-handler's parameters, both shapes folded into one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Disagg {
    pub decode_profile: Option<String>,
    pub prefill_profile: Option<String>,
    pub encode_profile: Option<String>,
    pub prefill_decider: Option<String>,
    pub encode_decider: Option<String>,
}

/// What a defined plugin is.
#[derive(Clone, Debug)]
pub(crate) enum Plugin {
    Scorer(ScorerSpec),
    /// prefix-cache-scorer: scores from a producer's index, named or the default one.
    PrefixScorer {
        producer: Option<String>,
        /// Its own (legacy) index parameters, when it gives any.
        params: Option<PrefixParams>,
    },
    /// The all-in-one precise-prefix-cache-scorer: a producer and a scorer in one.
    PreciseScorer(PreciseConfig),
    ApproxProducer(PrefixParams),
    PreciseProducer(PreciseConfig),
    Picker(PickerSpec),
    /// The decode and prefill sets come from the flags, so a role filter holds by
    /// construction; other filters are noted in `unapplied`.
    Filter,
    /// A profile handler that runs no decision of its own.
    Handler,
    Disagg(Disagg),
    Decider(Decider),
    /// Accepted, does nothing here (noted in `unapplied`).
    Inert,
}

/// One plugin read: what it is, and what of it has no effect.
pub(crate) struct Defined {
    pub plugin: Plugin,
    pub unapplied: Vec<Unapplied>,
}

/// Checks `value` (a parameter mapping, or the value under a nested key) against `keys`;
/// `path` is where it sits ("" for the parameters themselves).
fn check_keys(label: &str, path: &str, value: &Value, keys: &[Key]) -> Result<(), String> {
    let m = match value {
        Value::Null => return Ok(()),
        Value::Object(m) => m,
        other => {
            let what = if path.is_empty() {
                "parameters".to_string()
            } else {
                format!("parameter \"{path}\"")
            };
            return Err(format!(
                "plugin {label}: {what} must be a mapping, got {other}"
            ));
        }
    };
    for (k, v) in m {
        let at = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let Some(Key(_, sub)) = keys.iter().find(|key| key.0 == k) else {
            let names: Vec<&str> = keys.iter().map(|key| key.0).collect();
            let supported = match (names.is_empty(), path.is_empty()) {
                (true, true) => "it takes no parameters".to_string(),
                (true, false) => format!("{path} takes no keys"),
                (false, true) => format!("supported: {}", names.join(", ")),
                (false, false) => format!("supported in {path}: {}", names.join(", ")),
            };
            return Err(format!(
                "plugin {label}: unknown parameter \"{at}\" ({supported})"
            ));
        };
        match (sub, v) {
            (_, Value::Null) | (Sub::Any, _) => {}
            (Sub::Leaf, Value::Object(_) | Value::Array(_)) => {
                return Err(format!(
                    "plugin {label}: parameter \"{at}\" must be a single value, got {v}"
                ))
            }
            (Sub::Leaf, _) => {}
            (Sub::Map(keys), _) => check_keys(label, &at, v, keys)?,
            (Sub::List(keys), Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    check_keys(label, &format!("{at}[{i}]"), item, keys)?;
                }
            }
            (Sub::List(_), _) => {
                return Err(format!(
                    "plugin {label}: parameter \"{at}\" must be a list, got {v}"
                ))
            }
        }
    }
    Ok(())
}

/// The plugin's `parameters`, every key (nested ones too) checked against `keys`.
pub(crate) fn parameters(label: &str, params: &Value, keys: &[Key]) -> Result<Value, String> {
    check_keys(label, "", params, keys)?;
    Ok(params.clone())
}

/// The value at a dotted path of parameters, None when absent or null.
pub(super) fn at<'a>(params: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(params, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

/// A non-negative integer parameter, at least `min`.
pub(crate) fn uint_param(
    label: &str,
    params: &Value,
    path: &str,
    min: u64,
) -> Result<Option<u64>, String> {
    match at(params, path) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(format!(
                "plugin {label}: parameter \"{path}\" must be an integer >= {min}, got {v}"
            )),
        },
    }
}

pub(super) fn u32_param(
    label: &str,
    params: &Value,
    path: &str,
    min: u64,
) -> Result<Option<u32>, String> {
    uint_param(label, params, path, min)?
        .map(|n| u32::try_from(n).map_err(|_| too_large(label, path)))
        .transpose()
}

fn usize_param(label: &str, params: &Value, path: &str, min: u64) -> Result<Option<usize>, String> {
    uint_param(label, params, path, min)?
        .map(|n| usize::try_from(n).map_err(|_| too_large(label, path)))
        .transpose()
}

fn too_large(label: &str, path: &str) -> String {
    format!("plugin {label}: parameter \"{path}\" is too large")
}

pub(super) fn str_param(label: &str, params: &Value, path: &str) -> Result<Option<String>, String> {
    match at(params, path) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!(
            "plugin {label}: parameter \"{path}\" must be a string, got {v}"
        )),
    }
}

pub(super) fn bool_param(label: &str, params: &Value, path: &str) -> Result<Option<bool>, String> {
    match at(params, path) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(format!(
            "plugin {label}: parameter \"{path}\" must be true or false, got {v}"
        )),
    }
}

pub(super) fn f64_param(
    label: &str,
    params: &Value,
    path: &str,
    range: (f64, f64),
) -> Result<Option<f64>, String> {
    match at(params, path) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x >= range.0 && x <= range.1 => Ok(Some(x)),
            _ => Err(format!(
                "plugin {label}: parameter \"{path}\" must be a number from {} to {}, got {v}",
                range.0, range.1
            )),
        },
    }
}

/// One note per given key of `paths`: accepted, no effect, because `why`.
pub(super) fn note_given(
    out: &mut Vec<Unapplied>,
    label: &str,
    params: &Value,
    paths: &[&str],
    why: &str,
) {
    for path in paths {
        if at(params, path).is_some() {
            out.push(Unapplied::new(
                format!("plugin {label} parameter {path}"),
                why,
            ));
        }
    }
}

/// llm-d's prefix-cache-scorer index parameters of the GIE shape (`blockSize` in tokens).
fn legacy_prefix_params(label: &str, p: &Value) -> Result<Option<PrefixParams>, String> {
    let keys = [
        "blockSize",
        "maxPrefixBlocksToMatch",
        "lruCapacityPerServer",
    ];
    if keys.iter().all(|k| at(p, k).is_none()) {
        return Ok(None);
    }
    let d = PrefixParams::default();
    Ok(Some(PrefixParams {
        block_size: usize_param(label, p, "blockSize", 1)?.unwrap_or(d.block_size),
        max_blocks: usize_param(label, p, "maxPrefixBlocksToMatch", 1)?.unwrap_or(d.max_blocks),
        lru_capacity: usize_param(label, p, "lruCapacityPerServer", 1)?.unwrap_or(d.lru_capacity),
    }))
}

/// llm-d-router's approx-prefix-cache-producer: its defaults (16-token blocks, prompts
/// matched up to 131072 tokens, 31250 blocks per endpoint) and its cap rules
/// (`maxPrefixTokensToMatch` wins; both caps 0 = the whole prompt).
fn approx_params(label: &str, p: &Value, out: &mut Vec<Unapplied>) -> Result<PrefixParams, String> {
    let tokens = usize_param(label, p, "blockSizeTokens", 1)?;
    let legacy = usize_param(label, p, "blockSize", 1)?;
    let block_size = match (tokens, legacy) {
        (Some(t), Some(b)) if t != b => {
            return Err(format!(
                "plugin {label}: blockSizeTokens {t} and the deprecated blockSize {b} disagree; \
                 give blockSizeTokens only"
            ))
        }
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => 16,
    };
    let max_tokens = usize_param(label, p, "maxPrefixTokensToMatch", 0)?;
    let max_blocks = usize_param(label, p, "maxPrefixBlocksToMatch", 0)?;
    let max_blocks = match (max_tokens, max_blocks) {
        (Some(t), _) if t > 0 => {
            if t < block_size {
                return Err(format!(
                    "plugin {label}: maxPrefixTokensToMatch {t} is less than one block of \
                     {block_size} tokens, so no block would ever match"
                ));
            }
            t / block_size
        }
        (_, Some(b)) if b > 0 => b,
        (Some(0), _) | (_, Some(0)) => usize::MAX,
        _ => 131_072 / block_size,
    };
    if bool_param(label, p, "autoTune")? == Some(true) {
        out.push(Unapplied::new(
            format!("plugin {label} parameter autoTune"),
            "the block size is not taken from engine metrics; blockSizeTokens is used as given",
        ));
    }
    Ok(PrefixParams {
        block_size,
        max_blocks: max_blocks.max(1),
        lru_capacity: usize_param(label, p, "lruCapacityPerServer", 1)?.unwrap_or(31_250),
    })
}

/// A label filter that selects on `llm-d.ai/role` only: the flags' decode/prefill split
/// already does what it would.
fn role_only(params: &Value, kind: &str) -> bool {
    match kind {
        "by-label" => at(params, "label").and_then(Value::as_str) == Some(ROLE_LABEL),
        _ => {
            let labels_ok = at(params, "matchLabels")
                .and_then(Value::as_object)
                .is_none_or(|m| m.keys().all(|k| k == ROLE_LABEL));
            let exprs_ok = at(params, "matchExpressions")
                .and_then(Value::as_array)
                .is_none_or(|v| {
                    v.iter()
                        .all(|e| e.get("key").and_then(Value::as_str) == Some(ROLE_LABEL))
                });
            let any =
                at(params, "matchLabels").is_some() || at(params, "matchExpressions").is_some();
            any && labels_ok && exprs_ok
        }
    }
}

fn disagg_params(label: &str, p: &Value) -> Result<Disagg, String> {
    let s = |path: &str| str_param(label, p, path).map(|v| v.filter(|s| !s.is_empty()));
    let nested = Disagg {
        decode_profile: s("profiles.decode")?,
        prefill_profile: s("profiles.prefill")?,
        encode_profile: s("profiles.encode")?,
        prefill_decider: s("deciders.prefill")?,
        encode_decider: s("deciders.encode")?,
    };
    let flat = Disagg {
        decode_profile: s("decodeProfile")?,
        prefill_profile: s("prefillProfile")?,
        encode_profile: s("encodeProfile")?,
        // deciderPluginName is pd-profile-handler's older alias.
        prefill_decider: s("prefillDeciderPluginName")?.or(s("deciderPluginName")?),
        encode_decider: s("encodeDeciderPluginName")?,
    };
    let given = |d: &Disagg| {
        [
            &d.decode_profile,
            &d.prefill_profile,
            &d.encode_profile,
            &d.prefill_decider,
            &d.encode_decider,
        ]
        .iter()
        .any(|v| v.is_some())
    };
    if given(&nested) && given(&flat) {
        return Err(format!(
            "plugin {label}: mixes the nested parameters (profiles, deciders) with the deprecated \
             flat ones (decodeProfile, prefillDeciderPluginName, ...); use one shape"
        ));
    }
    if let Some(order) = str_param(label, p, "stageOrder")? {
        let norm = order.to_ascii_lowercase().replace(['-', '_'], "");
        match norm.as_str() {
            "" | "decodefirst" | "decode" => {}
            "prefillfirst" | "prefill" => {
                return Err(format!(
                    "plugin {label}: stageOrder \"{order}\" is not supported: pd-router picks \
                     the decode endpoint first and decides P/D from its cache (decode-first)"
                ))
            }
            _ => {
                return Err(format!(
                    "plugin {label}: stageOrder \"{order}\" is not one of decode-first, \
                     prefill-first"
                ))
            }
        }
    }
    Ok(if given(&flat) { flat } else { nested })
}

/// Reads one plugin definition; `name` is its name (defaulting to its type), `label` how
/// messages name it.
pub(crate) fn define_plugin(name: &str, label: &str, raw: &RawPlugin) -> Result<Defined, String> {
    let mut out = Vec::new();
    let no_params = || parameters(label, &raw.parameters, &[]).map(|_| ());
    let inert = |keys: &'static [Key], why: &str, out: &mut Vec<Unapplied>| {
        parameters(label, &raw.parameters, keys)?;
        out.push(Unapplied::new(format!("plugin {label}"), why));
        Ok::<_, String>(Plugin::Inert)
    };
    let plugin = match raw.kind.as_str() {
        "prefix-cache-scorer" => {
            let p = parameters(label, &raw.parameters, PREFIX_SCORER)?;
            let producer =
                str_param(label, &p, "prefixMatchInfoProducerName")?.filter(|s| !s.is_empty());
            let params = legacy_prefix_params(label, &p)?;
            if producer.is_some() && params.is_some() {
                return Err(format!(
                    "plugin {label}: blockSize, maxPrefixBlocksToMatch and lruCapacityPerServer \
                     belong to the producer named by prefixMatchInfoProducerName; set them there"
                ));
            }
            let weight = f64_param(label, &p, "matchLengthWeight", (0.0, 1.0))?;
            if weight.is_some_and(|w| w > 0.0) {
                out.push(Unapplied::new(
                    format!("plugin {label} parameter matchLengthWeight"),
                    "pd-router scores the matched share of the prompt's blocks only",
                ));
            }
            // Read only with a matchLengthWeight, as in llm-d.
            uint_param(label, &p, "matchLengthScaleTokens", 1)?;
            Plugin::PrefixScorer { producer, params }
        }
        "precise-prefix-cache-scorer" => {
            let p = parameters(label, &raw.parameters, PRECISE)?;
            Plugin::PreciseScorer(precise_config(name, label, &p, &mut out)?)
        }
        "precise-prefix-cache-producer" => {
            let p = parameters(label, &raw.parameters, PRECISE)?;
            Plugin::PreciseProducer(precise_config(name, label, &p, &mut out)?)
        }
        "approx-prefix-cache-producer" => {
            let p = parameters(label, &raw.parameters, APPROX_PRODUCER)?;
            Plugin::ApproxProducer(approx_params(label, &p, &mut out)?)
        }
        "load-aware-scorer" => {
            let p = parameters(label, &raw.parameters, THRESHOLD)?;
            Plugin::Scorer(ScorerSpec::LoadAware {
                threshold: uint_param(label, &p, "threshold", 1)?,
            })
        }
        "active-request-scorer" => {
            let p = parameters(label, &raw.parameters, ACTIVE_REQUEST)?;
            // With its defaults llm-d's score is (max - n) / max over the candidates: the
            // router's load-aware score over its own in-flight counts.
            let idle = uint_param(label, &p, "idleThreshold", 0)?.unwrap_or(0);
            let busy = f64_param(label, &p, "maxBusyScore", (0.0, 1.0))?.unwrap_or(1.0);
            if idle != 0 || busy != 1.0 {
                out.push(Unapplied::new(
                    format!("plugin {label} parameters idleThreshold, maxBusyScore"),
                    "pd-router scores 1 - n/max(n) over the candidates' requests in flight",
                ));
            }
            note_given(
                &mut out,
                label,
                &p,
                &["requestTimeout", "inFlightLoadProducerName"],
                "pd-router counts its own requests in flight until each answer ends",
            );
            Plugin::Scorer(ScorerSpec::LoadAware { threshold: None })
        }
        "queue-scorer" => {
            no_params()?;
            Plugin::Scorer(ScorerSpec::Queue)
        }
        // kv-cache-scorer is the older name of the same scorer.
        "kv-cache-utilization-scorer" | "kv-cache-scorer" => {
            no_params()?;
            Plugin::Scorer(ScorerSpec::KvCacheUtilization)
        }
        "max-score-picker" | "random-picker" => {
            let p = parameters(label, &raw.parameters, PICKER)?;
            if let Some(n) = uint_param(label, &p, "maxNumOfEndpoints", 1)? {
                if n != 1 {
                    return Err(format!(
                        "plugin {label}: maxNumOfEndpoints={n} is not supported (pd-router \
                         forwards each request to exactly one endpoint; use 1)"
                    ));
                }
            }
            Plugin::Picker(if raw.kind == "random-picker" {
                PickerSpec::Random
            } else {
                PickerSpec::MaxScore
            })
        }
        "decode-filter" | "prefill-filter" => {
            no_params()?;
            Plugin::Filter
        }
        "encode-filter" => {
            no_params()?;
            out.push(Unapplied::new(
                format!("plugin {label}"),
                "pd-router has no encode stage",
            ));
            Plugin::Filter
        }
        "label-selector-filter" | "by-label-selector" | "by-label" => {
            let keys = if raw.kind == "by-label" {
                BY_LABEL
            } else {
                LABEL_SELECTOR
            };
            let p = parameters(label, &raw.parameters, keys)?;
            if !role_only(&p, &raw.kind) {
                out.push(Unapplied::new(
                    format!("plugin {label}"),
                    "pd-router does not see pod labels: every endpoint of the profile's role \
                     (--decode or --prefill) is a candidate",
                ));
            }
            Plugin::Filter
        }
        "single-profile-handler" => {
            no_params()?;
            Plugin::Handler
        }
        "prefill-header-handler" | "disagg-headers-handler" => {
            // pd-router sets x-prefiller-host-port itself.
            parameters(label, &raw.parameters, HEADER_HANDLER)?;
            Plugin::Handler
        }
        "disagg-profile-handler" => {
            let p = parameters(label, &raw.parameters, DISAGG_HANDLER)?;
            Plugin::Disagg(disagg_params(label, &p)?)
        }
        "pd-profile-handler" => {
            let p = parameters(label, &raw.parameters, THRESHOLD)?;
            Plugin::Decider(Decider::Handler(uint_param(label, &p, "threshold", 0)?))
        }
        "prefix-based-pd-decider" => {
            let p = parameters(label, &raw.parameters, PREFIX_DECIDER)?;
            Plugin::Decider(Decider::Prefix {
                non_cached: uint_param(label, &p, "nonCachedTokens", 0)?,
                prompt_tokens: uint_param(label, &p, "promptTokens", 0)?,
            })
        }
        "always-disagg-pd-decider" => {
            no_params()?;
            Plugin::Decider(Decider::Always)
        }
        "always-disagg-multimodal-decider" => {
            no_params()?;
            Plugin::Decider(Decider::Encode)
        }
        "token-producer" | "tokenizer" => inert(
            TOKEN_PRODUCER,
            "pd-router tokenizes with --tokenizer (and the model's chat template)",
            &mut out,
        )?,
        "endpoint-notification-source" => inert(
            &[],
            "pd-router's endpoints come from its flags, endpoints file and DNS names",
            &mut out,
        )?,
        "k8s-notification-source" => inert(
            K8S_SOURCE,
            "pd-router watches no Kubernetes objects",
            &mut out,
        )?,
        "metrics-data-source" => inert(
            METRICS_SOURCE,
            "pd-router scrapes each endpoint's /metrics itself (--refresh-metrics-interval, \
             metricsUrl in the endpoints file)",
            &mut out,
        )?,
        "core-metrics-extractor" => inert(
            METRICS_EXTRACTOR,
            "pd-router reads vLLM's metric names",
            &mut out,
        )?,
        other => {
            return Err(format!(
                "plugin {label}: unknown type \"{other}\"; supported types: {}",
                PLUGIN_TYPES.join(", ")
            ))
        }
    };
    Ok(Defined {
        plugin,
        unapplied: out,
    })
}

#[cfg(test)]
mod tests;
