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
mod tests {
    use super::super::scheduling::{parse_scheduling, Scheduling, WeightedScorer};
    use super::super::PerEndpoint;
    use super::*;

    fn fixture(name: &str) -> Scheduling {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/llm-d-configs")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        parse_scheduling(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn err(yaml: &str) -> String {
        parse_scheduling(yaml).unwrap_err()
    }

    fn scorers(p: &[WeightedScorer]) -> Vec<(&str, ScorerSpec, f64)> {
        p.iter()
            .map(|w| (w.name.as_str(), w.scorer, w.weight))
            .collect()
    }

    fn unapplied(s: &Scheduling) -> Vec<String> {
        s.unapplied.iter().map(|u| u.at.clone()).collect()
    }

    #[test]
    fn precise_seed_config_parses_with_its_weights_and_event_socket() {
        let s = fixture("precise-seed.yaml");
        assert_eq!(s.decode.name, "default");
        assert_eq!(
            scorers(&s.decode.scorers),
            [
                ("precise-prefix-cache-scorer", ScorerSpec::PrefixCache, 3.0),
                (
                    "kv-cache-utilization-scorer",
                    ScorerSpec::KvCacheUtilization,
                    2.0
                ),
                ("queue-scorer", ScorerSpec::Queue, 2.0),
            ]
        );
        assert_eq!(s.decode.picker, PickerSpec::MaxScore);
        assert!(s.prefill.is_none());
        assert_eq!(s.threshold, 0, "no decider: single profile, never P/D");
        let p = s.precise.as_ref().expect("a precise index");
        assert_eq!(p.producer, "precise-prefix-cache-scorer");
        assert_eq!(p.scorers, ["precise-prefix-cache-scorer"]);
        assert_eq!(p.block_size, Some(32));
        assert_eq!(p.centralized_endpoint(), Some("tcp://*:5557"));
        assert_eq!(p.per_endpoint(), None, "discoverPods: false");
        assert_eq!(p.topic_filter(), "kv@");
        assert_eq!(p.concurrency, Some(2));
        // The approximate fallback hashes blocks of the engines' size.
        assert_eq!(s.prefix.block_size, 32);
        let notes = unapplied(&s);
        for expected in [
            "plugin \"precise-prefix-cache-scorer\" parameter indexerConfig.tokenizersPoolConfig",
            "plugin \"precise-prefix-cache-scorer\" parameter kvEventsConfig.concurrency",
        ] {
            assert!(
                notes.iter().any(|n| n == expected),
                "{expected} in {notes:?}"
            );
        }
    }

    #[test]
    fn llm_d_router_pd_config_maps_producer_and_decider() {
        let s = fixture("pd-disagg.yaml");
        assert_eq!(
            s.prefix,
            PrefixParams {
                block_size: 32,
                max_blocks: 8192 / 32,
                lru_capacity: 20_000
            }
        );
        assert_eq!(s.threshold, 64);
        let prefill = s.prefill.as_ref().unwrap();
        for p in [&s.decode, prefill] {
            assert_eq!(
                scorers(&p.scorers),
                [
                    ("prefix-cache-scorer", ScorerSpec::PrefixCache, 2.0),
                    ("queue-scorer", ScorerSpec::Queue, 1.0)
                ]
            );
        }
        assert!(s.precise.is_none());
        assert_eq!(unapplied(&s), Vec::<String>::new(), "all of it applies");
    }

    #[test]
    fn split_precise_pipeline_exposes_per_endpoint_subscriptions() {
        let s = fixture("precise-producer.yaml");
        let p = s.precise.as_ref().unwrap();
        assert_eq!(p.producer, "precise-prefix-cache-producer");
        assert_eq!(p.scorers, ["prefix-cache-scorer"]);
        assert_eq!((p.block_size(), p.hash_seed.as_deref()), (64, Some("1234")));
        assert_eq!(
            p.per_endpoint(),
            Some(PerEndpoint {
                socket_port: 5556,
                replay_socket_port: Some(5559)
            })
        );
        assert_eq!(p.centralized_endpoint(), None);
        assert_eq!((p.index_size, p.pod_cache_size), (Some(500_000), Some(8)));
        let media: Vec<_> = p
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.weight))
            .collect();
        assert_eq!(media, [("gpu", 1.0), ("cpu", 0.5)]);
        assert_eq!(p.enable_metrics, Some(true));
        assert_eq!(s.prefix.block_size, 64);
        assert_eq!(
            scorers(&s.decode.scorers)
                .iter()
                .map(|s| s.2)
                .collect::<Vec<_>>(),
            [2.0, 1.0, 1.0]
        );
        let notes = unapplied(&s);
        for expected in [
            "plugin \"token-producer\"",
            "plugin \"endpoint-notification-source\"",
            "plugin \"metrics-data-source\"",
            "plugin \"core-metrics-extractor\"",
            "top-level key dataLayer",
        ] {
            assert!(
                notes.iter().any(|n| n == expected),
                "{expected} in {notes:?}"
            );
        }
        assert!(
            !notes.iter().any(|n| n.contains("decode-filter")),
            "{notes:?}"
        );
    }

    #[test]
    fn always_decider_renamed_profiles_and_role_selectors() {
        let s = fixture("pd-always-labels.yaml");
        assert_eq!(s.threshold, 1, "always-disagg: any uncached token");
        assert_eq!(s.decode.name, "serve");
        let prefill = s.prefill.as_ref().unwrap();
        assert_eq!(prefill.name, "warm");
        assert_eq!(prefill.picker, PickerSpec::Random);
        assert_eq!(
            scorers(&s.decode.scorers),
            [
                (
                    "active-request-scorer",
                    ScorerSpec::LoadAware { threshold: None },
                    1.0
                ),
                (
                    "kv-cache-utilization-scorer",
                    ScorerSpec::KvCacheUtilization,
                    0.5
                ),
            ]
        );
        // Only the selector on another label is out of pd-router's reach.
        assert_eq!(
            unapplied(&s),
            ["plugin \"big-gpus\" (type label-selector-filter)"]
        );
    }

    #[test]
    fn unknown_type_is_refused_with_the_supported_names() {
        let e = err("plugins:\n- type: lora-affinity-scorer\n");
        assert!(e.contains("unknown type \"lora-affinity-scorer\""), "{e}");
        for name in [
            "precise-prefix-cache-scorer",
            "precise-prefix-cache-producer",
            "disagg-profile-handler",
            "always-disagg-pd-decider",
            "label-selector-filter",
        ] {
            assert!(e.contains(name), "{name} in {e}");
        }
    }

    #[test]
    fn unknown_nested_parameters_are_named_with_their_path() {
        let precise = "plugins:\n- type: precise-prefix-cache-producer\n  parameters:\n";
        let e = err(&format!(
            "{precise}    kvEventsConfig:\n      podDiscoveryConfig:\n        sockPort: 1\n"
        ));
        assert!(
            e.contains("unknown parameter \"kvEventsConfig.podDiscoveryConfig.sockPort\""),
            "{e}"
        );
        assert!(
            e.contains("supported in kvEventsConfig.podDiscoveryConfig: socketPort"),
            "{e}"
        );
        let e = err(&format!("{precise}    kvEventConfig: {{}}\n"));
        assert!(e.contains("unknown parameter \"kvEventConfig\""), "{e}");
        assert!(
            e.contains("supported: tokenProcessorConfig, indexerConfig"),
            "{e}"
        );
        let e = err(&format!(
            "{precise}    indexerConfig:\n      kvCacheBackendConfigs:\n      - {{name: gpu, wieght: 1}}\n"
        ));
        assert!(
            e.contains("\"indexerConfig.kvCacheBackendConfigs[0].wieght\""),
            "{e}"
        );
        let e = err(&format!("{precise}    kvEventsConfig: 5557\n"));
        assert!(e.contains("\"kvEventsConfig\" must be a mapping"), "{e}");
        for (plugin, key) in [
            ("prefix-based-pd-decider", "nonCachedToken"),
            ("disagg-profile-handler", "decider"),
            ("approx-prefix-cache-producer", "blockSizeToken"),
            ("active-request-scorer", "threshold"),
            ("token-producer", "model"),
            ("always-disagg-pd-decider", "x"),
        ] {
            let e = err(&format!(
                "plugins:\n- type: {plugin}\n  parameters: {{{key}: 1}}\n"
            ));
            assert!(
                e.contains(&format!("\"{plugin}\": unknown parameter \"{key}\"")),
                "{e}"
            );
        }
    }

    #[test]
    fn precise_parameters_are_validated_and_read_in_both_shapes() {
        let precise = |params: &str| {
            parse_scheduling(&format!(
                "plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n{params}\
                 schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: precise-prefix-cache-scorer\n"
            ))
        };
        // llm-d-kv-cache-manager's older shape: the token processor inside indexerConfig,
        // and an unquoted hash seed.
        let s = precise(
            "    indexerConfig:\n      tokenProcessorConfig: {blockSize: 16, hashSeed: 42}\n      \
             prefixStoreConfig: {cacheSize: 1000, blockSize: 256}\n",
        )
        .unwrap();
        let p = s.precise.unwrap();
        assert_eq!(
            (p.block_size, p.hash_seed.as_deref()),
            (Some(16), Some("42"))
        );
        // Neither mode named: llm-d-router's default, one subscription per endpoint.
        assert_eq!(
            p.per_endpoint(),
            Some(PerEndpoint {
                socket_port: 5557,
                replay_socket_port: None
            })
        );
        let bad = [
            (
                "    tokenProcessorConfig: {blockSizeTokens: 16, blockSize: 64}\n",
                "disagree",
            ),
            (
                "    tokenProcessorConfig: {hashAlgorithm: md5}\n",
                "hashAlgorithm \"md5\"",
            ),
            ("    kvEventsConfig: {engineType: sglang}\n", "vLLM's KV"),
            (
                "    kvEventsConfig: {zmqEndpoint: \"*:5557\"}\n",
                "ZMQ address",
            ),
            (
                "    kvEventsConfig:\n      podDiscoveryConfig: {socketPort: 70000}\n",
                "must be a port",
            ),
            (
                "    kvEventsConfig: {discoverPods: yes-please}\n",
                "true or false",
            ),
            ("    tokenProcessorConfig: {blockSizeTokens: 0}\n", ">= 1"),
        ];
        for (params, expected) in bad {
            let e = precise(params).unwrap_err();
            assert!(e.contains(expected), "{params}: {e}");
        }
    }

    #[test]
    fn references_between_plugins_are_checked() {
        let e = err("plugins:\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: nope}\n");
        assert!(
            e.contains("prefixMatchInfoProducerName \"nope\" names no plugin"),
            "{e}"
        );
        let e = err("plugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: queue-scorer}\n");
        assert!(e.contains("is not an approx-prefix-cache-producer"), "{e}");
        let e = err("plugins:\n- type: disagg-profile-handler\n  parameters:\n    deciders: {prefill: nope}\n");
        assert!(
            e.contains("deciders.prefill \"nope\" names no plugin"),
            "{e}"
        );
        let e = err("plugins:\n- type: queue-scorer\n- type: disagg-profile-handler\n  parameters:\n    deciders: {prefill: queue-scorer}\n");
        assert!(e.contains("is not a P/D decider"), "{e}");
        let e = err("plugins:\n- type: precise-prefix-cache-producer\n- type: precise-prefix-cache-producer\n  name: two\n");
        assert!(e.contains("keeps one precise index"), "{e}");
        let e = err("plugins:\n- type: approx-prefix-cache-producer\nschedulingProfiles:\n- name: d\n  plugins:\n  - pluginRef: approx-prefix-cache-producer\n");
        assert!(e.contains("is a data producer or source"), "{e}");
        let e = err("plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 64}\n- type: prefix-cache-scorer\n  parameters: {blockSize: 16}\n");
        assert!(
            e.contains("pd-router keeps one prefix index per endpoint"),
            "{e}"
        );
        let e = err("plugins:\n- type: disagg-profile-handler\n  parameters:\n    deciderPluginName: a\n    deciders: {prefill: a}\n");
        assert!(e.contains("use one shape"), "{e}");
        let e = err(
            "plugins:\n- type: disagg-profile-handler\n  parameters: {stageOrder: prefill-first}\n",
        );
        assert!(e.contains("decode-first"), "{e}");
        let e = err("apiVersion: llm-d.ai/v2\n");
        assert!(
            e.contains("llm-d.ai/v1alpha1, inference.networking.x-k8s.io/v1alpha1"),
            "{e}"
        );
    }

    #[test]
    fn handler_without_prefill_decider_means_no_pd_and_legacy_flat_shape_works() {
        let base = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
                    - type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 32, promptTokens: 100}\n";
        let profiles = "schedulingProfiles:\n- name: d\n- name: p\n";
        let s = parse_scheduling(&format!(
            "{base}- type: disagg-profile-handler\n  parameters:\n    profiles: {{decode: d, prefill: p}}\n{profiles}"
        ))
        .unwrap();
        assert_eq!(s.threshold, 0, "llm-d-router: no deciders.prefill, no P/D");
        assert!(unapplied(&s)
            .iter()
            .any(|n| n == "plugin \"prefix-based-pd-decider\""));
        let s = parse_scheduling(&format!(
            "{base}- type: disagg-profile-handler\n  parameters:\n    decodeProfile: d\n    \
             prefillProfile: p\n    prefillDeciderPluginName: prefix-based-pd-decider\n{profiles}"
        ))
        .unwrap();
        assert_eq!((s.threshold, s.min_prompt_tokens), (32, 100));
        assert_eq!(
            (s.decode.name.as_str(), s.prefill.unwrap().name.as_str()),
            ("d", "p")
        );
        // promptTokens above nonCachedTokens is a gate pick.rs does not apply yet.
        assert!(
            s.unapplied.iter().any(|u| u.at.contains("promptTokens")),
            "{:?}",
            s.unapplied
        );
    }

    #[test]
    fn encode_stage_is_accepted_and_noted() {
        let s = parse_scheduling(
            "plugins:\n- type: encode-filter\n- type: prefill-filter\n- type: decode-filter\n\
             - type: always-disagg-multimodal-decider\n- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 16}\n\
             - type: disagg-profile-handler\n  parameters:\n    deciders: {encode: always-disagg-multimodal-decider, prefill: prefix-based-pd-decider}\n\
             schedulingProfiles:\n- name: encode\n  plugins:\n  - pluginRef: encode-filter\n\
             - name: prefill\n  plugins:\n  - pluginRef: prefill-filter\n- name: decode\n  plugins:\n  - pluginRef: decode-filter\n",
        )
        .unwrap();
        assert_eq!(s.threshold, 16);
        let notes = unapplied(&s);
        for expected in [
            "plugin \"encode-filter\"",
            "plugin \"disagg-profile-handler\" parameter deciders.encode",
            "schedulingProfiles[encode]",
        ] {
            assert!(
                notes.iter().any(|n| n == expected),
                "{expected} in {notes:?}"
            );
        }
    }

    #[test]
    fn legacy_precise_scorer_defers_to_a_producer() {
        let s = parse_scheduling(
            "plugins:\n- type: precise-prefix-cache-producer\n  name: idx\n  parameters:\n    \
             tokenProcessorConfig: {blockSizeTokens: 64}\n- type: precise-prefix-cache-scorer\n  parameters:\n    \
             tokenProcessorConfig: {blockSizeTokens: 16}\n\
             schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: precise-prefix-cache-scorer\n    weight: 5\n",
        )
        .unwrap();
        let p = s.precise.unwrap();
        assert_eq!((p.producer.as_str(), p.block_size), ("idx", Some(64)));
        assert_eq!(p.scorers, ["precise-prefix-cache-scorer"]);
        assert!(s
            .unapplied
            .iter()
            .any(|u| u.at == "plugin \"precise-prefix-cache-scorer\" parameters"));
        let display = s.unapplied[0].to_string();
        assert!(display.contains(": accepted, no effect: "), "{display}");
    }
}
