//! The scheduling profiles: llm-d's `EndpointPickerConfig` YAML (plugins, then profiles
//! referencing them) turned into scorers, pickers, the prefix index and the P/D threshold.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Map, Value};

/// Prefix index parameters (llm-d's `prefix-cache-scorer` parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixParams {
    /// Tokens per hashed block.
    pub block_size: usize,
    /// Leading blocks looked at per request; later blocks are neither hashed nor matched.
    pub max_blocks: usize,
    /// Block hashes remembered per endpoint (LRU).
    pub lru_capacity: usize,
}

impl Default for PrefixParams {
    fn default() -> Self {
        PrefixParams {
            block_size: 16,
            max_blocks: 256,
            lru_capacity: 31_250,
        }
    }
}

/// A scorer of a profile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScorerSpec {
    /// Share of the prompt's leading blocks the endpoint has cached.
    PrefixCache,
    /// Router-side requests in flight; relative to the busiest candidate, or to
    /// `threshold` when given.
    LoadAware { threshold: Option<u64> },
    /// The engine's waiting queue, min-max normalised over the candidates.
    Queue,
    /// 1 - the engine's KV-cache usage.
    KvCacheUtilization,
}

/// How a profile turns scores into one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickerSpec {
    /// Highest weighted score; ties broken at random.
    MaxScore,
    /// Uniformly random, scores ignored.
    Random,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WeightedScorer {
    /// The plugin's name (for logs).
    pub name: String,
    pub scorer: ScorerSpec,
    pub weight: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProfileSpec {
    pub name: String,
    pub scorers: Vec<WeightedScorer>,
    pub picker: PickerSpec,
}

/// What the router schedules with: the two profiles, the prefix index and the
/// P/D threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduling {
    pub prefix: PrefixParams,
    pub decode: ProfileSpec,
    /// Absent when the config has no `prefill` profile (then P/D is impossible).
    pub prefill: Option<ProfileSpec>,
    /// Uncached tokens on the decode pick at which a remote prefill is used; 0 = never.
    pub threshold: u64,
}

/// The built-in default threshold, also the default of the deciders' parameters.
pub const DEFAULT_THRESHOLD: u64 = 256;

pub(crate) fn default_profile(name: &str) -> ProfileSpec {
    ProfileSpec {
        name: name.to_string(),
        scorers: vec![
            WeightedScorer {
                name: "prefix-cache-scorer".into(),
                scorer: ScorerSpec::PrefixCache,
                weight: 2.0,
            },
            WeightedScorer {
                name: "load-aware-scorer".into(),
                scorer: ScorerSpec::LoadAware { threshold: None },
                weight: 1.0,
            },
        ],
        picker: PickerSpec::MaxScore,
    }
}

impl Default for Scheduling {
    /// Both profiles: prefix-cache-scorer (weight 2) + load-aware-scorer (weight 1) +
    /// max-score-picker; threshold 256; block size 16.
    fn default() -> Self {
        Scheduling {
            prefix: PrefixParams::default(),
            decode: default_profile("decode"),
            prefill: Some(default_profile("prefill")),
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    scheduling_profiles: Vec<RawProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlugin {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    #[serde(default)]
    parameters: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    name: String,
    #[serde(default)]
    plugins: Vec<RawProfileRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawProfileRef {
    plugin_ref: String,
    weight: Option<f64>,
}

/// Plugin types the router knows, for the "unknown type" message.
pub(crate) const PLUGIN_TYPES: [&str; 13] = [
    "prefix-cache-scorer",
    "load-aware-scorer",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "kv-cache-scorer",
    "max-score-picker",
    "random-picker",
    "decode-filter",
    "prefill-filter",
    "prefill-header-handler",
    "single-profile-handler",
    "pd-profile-handler",
    "prefix-based-pd-decider",
];

/// What a defined plugin is.
#[derive(Clone, Debug)]
pub(crate) enum Plugin {
    Scorer(ScorerSpec),
    Picker(PickerSpec),
    /// Accepted, does nothing: the endpoints are split into decode and prefill by flag.
    Filter,
    /// Accepted at the top level; the router always runs decode then (maybe) prefill.
    Handler,
    /// Sets the P/D threshold (None: the plugin's default).
    Decider(Option<u64>),
}

/// The plugin's `parameters` as a map, with every key checked against `allowed`.
pub(crate) fn parameters(
    label: &str,
    params: &Value,
    allowed: &[&str],
) -> Result<Map<String, Value>, String> {
    let map = match params {
        Value::Null => Map::new(),
        Value::Object(m) => m.clone(),
        other => {
            return Err(format!(
                "plugin {label}: parameters must be a mapping, got {other}"
            ))
        }
    };
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            let supported = if allowed.is_empty() {
                "it takes no parameters".to_string()
            } else {
                format!("supported: {}", allowed.join(", "))
            };
            return Err(format!(
                "plugin {label}: unknown parameter \"{key}\" ({supported})"
            ));
        }
    }
    Ok(map)
}

/// A non-negative integer parameter, at least `min`.
pub(crate) fn uint_param(
    label: &str,
    map: &Map<String, Value>,
    key: &str,
    min: u64,
) -> Result<Option<u64>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(format!(
                "plugin {label}: parameter \"{key}\" must be an integer >= {min}, got {v}"
            )),
        },
    }
}

pub(crate) fn to_usize(label: &str, key: &str, n: u64) -> Result<usize, String> {
    usize::try_from(n).map_err(|_| format!("plugin {label}: parameter \"{key}\" is too large"))
}

/// Reads one plugin definition; prefix-cache-scorer parameters go to `prefix`.
pub(crate) fn define_plugin(
    label: &str,
    raw: &RawPlugin,
    prefix: &mut Option<PrefixParams>,
) -> Result<Plugin, String> {
    let plugin = match raw.kind.as_str() {
        "prefix-cache-scorer" => {
            let p = parameters(
                label,
                &raw.parameters,
                &[
                    "blockSize",
                    "maxPrefixBlocksToMatch",
                    "lruCapacityPerServer",
                ],
            )?;
            let d = PrefixParams::default();
            let params = PrefixParams {
                block_size: match uint_param(label, &p, "blockSize", 1)? {
                    Some(n) => to_usize(label, "blockSize", n)?,
                    None => d.block_size,
                },
                max_blocks: match uint_param(label, &p, "maxPrefixBlocksToMatch", 1)? {
                    Some(n) => to_usize(label, "maxPrefixBlocksToMatch", n)?,
                    None => d.max_blocks,
                },
                lru_capacity: match uint_param(label, &p, "lruCapacityPerServer", 1)? {
                    Some(n) => to_usize(label, "lruCapacityPerServer", n)?,
                    None => d.lru_capacity,
                },
            };
            match prefix {
                Some(existing) if *existing != params => {
                    return Err(format!(
                        "plugin {label}: a second prefix-cache-scorer with different parameters; \
                         pd-router keeps one prefix index per endpoint, so all prefix-cache-scorer \
                         plugins must share blockSize, maxPrefixBlocksToMatch and lruCapacityPerServer"
                    ))
                }
                _ => *prefix = Some(params),
            }
            Plugin::Scorer(ScorerSpec::PrefixCache)
        }
        "load-aware-scorer" => {
            let p = parameters(label, &raw.parameters, &["threshold"])?;
            Plugin::Scorer(ScorerSpec::LoadAware {
                threshold: uint_param(label, &p, "threshold", 1)?,
            })
        }
        "queue-scorer" => {
            parameters(label, &raw.parameters, &[])?;
            Plugin::Scorer(ScorerSpec::Queue)
        }
        // kv-cache-scorer is the older name of the same scorer.
        "kv-cache-utilization-scorer" | "kv-cache-scorer" => {
            parameters(label, &raw.parameters, &[])?;
            Plugin::Scorer(ScorerSpec::KvCacheUtilization)
        }
        "max-score-picker" | "random-picker" => {
            let p = parameters(label, &raw.parameters, &["maxNumOfEndpoints"])?;
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
            parameters(label, &raw.parameters, &[])?;
            Plugin::Filter
        }
        "prefill-header-handler" | "single-profile-handler" => {
            parameters(label, &raw.parameters, &[])?;
            Plugin::Handler
        }
        "pd-profile-handler" => {
            let p = parameters(label, &raw.parameters, &["threshold"])?;
            Plugin::Decider(uint_param(label, &p, "threshold", 0)?)
        }
        "prefix-based-pd-decider" => {
            let p = parameters(label, &raw.parameters, &["nonCachedTokens"])?;
            Plugin::Decider(uint_param(label, &p, "nonCachedTokens", 0)?)
        }
        other => {
            return Err(format!(
                "plugin {label}: unknown type \"{other}\"; supported types: {}",
                PLUGIN_TYPES.join(", ")
            ))
        }
    };
    Ok(plugin)
}

pub(crate) fn build_profile(
    raw: &RawProfile,
    plugins: &HashMap<String, Plugin>,
    names: &[String],
) -> Result<ProfileSpec, String> {
    let at = format!("schedulingProfiles[{}]", raw.name);
    let mut scorers: Vec<WeightedScorer> = Vec::new();
    let mut picker: Option<(String, PickerSpec)> = None;
    for r in &raw.plugins {
        let plugin = plugins.get(&r.plugin_ref).ok_or_else(|| {
            format!(
                "{at}: unknown pluginRef \"{}\"; defined plugins: {}",
                r.plugin_ref,
                if names.is_empty() {
                    "(none)".to_string()
                } else {
                    names.join(", ")
                }
            )
        })?;
        if let Some(w) = r.weight {
            if !w.is_finite() || w < 0.0 {
                return Err(format!(
                    "{at}: pluginRef \"{}\": weight must be a number >= 0, got {w}",
                    r.plugin_ref
                ));
            }
        }
        match plugin {
            Plugin::Scorer(spec) => {
                if scorers.iter().any(|s| s.name == r.plugin_ref) {
                    return Err(format!(
                        "{at}: pluginRef \"{}\" is listed twice",
                        r.plugin_ref
                    ));
                }
                scorers.push(WeightedScorer {
                    name: r.plugin_ref.clone(),
                    scorer: *spec,
                    weight: r.weight.unwrap_or(1.0),
                });
            }
            other => {
                if r.weight.is_some() {
                    return Err(format!(
                        "{at}: pluginRef \"{}\": weight applies to scorers only",
                        r.plugin_ref
                    ));
                }
                match other {
                    Plugin::Picker(spec) => {
                        if let Some((first, _)) = &picker {
                            return Err(format!(
                                "{at}: two pickers (\"{first}\" and \"{}\"); a profile has one",
                                r.plugin_ref
                            ));
                        }
                        picker = Some((r.plugin_ref.clone(), *spec));
                    }
                    Plugin::Filter => {}
                    Plugin::Handler | Plugin::Decider(_) => {
                        return Err(format!(
                            "{at}: pluginRef \"{}\" is a profile handler or decider, not a \
                             filter, scorer or picker; list it under plugins only",
                            r.plugin_ref
                        ))
                    }
                    Plugin::Scorer(_) => unreachable!("handled above"),
                }
            }
        }
    }
    Ok(ProfileSpec {
        name: raw.name.clone(),
        scorers,
        picker: picker.map_or(PickerSpec::MaxScore, |(_, p)| p),
    })
}

/// Parses an EndpointPickerConfig YAML document.
pub fn parse_scheduling(text: &str) -> Result<Scheduling, String> {
    let raw: RawConfig = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    if let Some(kind) = &raw.kind {
        if kind != "EndpointPickerConfig" {
            return Err(format!(
                "kind: expected EndpointPickerConfig, got \"{kind}\""
            ));
        }
    }
    // apiVersion is informative only: llm-d has shipped several.
    let _ = raw.api_version;

    let mut plugins: HashMap<String, Plugin> = HashMap::new();
    let mut names: Vec<String> = Vec::new();
    let mut prefix: Option<PrefixParams> = None;
    let mut threshold: Option<(String, u64)> = None;
    let mut has_decider = false;
    for (i, p) in raw.plugins.iter().enumerate() {
        let name = p.name.clone().unwrap_or_else(|| p.kind.clone());
        if name.is_empty() {
            return Err(format!("plugins[{i}]: empty name"));
        }
        let label = if name == p.kind {
            format!("\"{name}\"")
        } else {
            format!("\"{name}\" (type {})", p.kind)
        };
        if plugins.contains_key(&name) {
            return Err(format!(
                "plugins[{i}]: plugin name {label} is defined twice; give one a distinct `name:`"
            ));
        }
        let plugin = define_plugin(&label, p, &mut prefix)?;
        if let Plugin::Decider(t) = &plugin {
            has_decider = true;
            if let Some(t) = *t {
                if let Some((other, prev)) = &threshold {
                    if *prev != t {
                        return Err(format!(
                            "plugin {label}: threshold {t} disagrees with plugin \"{other}\"'s {prev}; \
                             pd-profile-handler's threshold and prefix-based-pd-decider's \
                             nonCachedTokens are the same setting"
                        ));
                    }
                }
                threshold = Some((name.clone(), t));
            }
        }
        names.push(name.clone());
        plugins.insert(name, plugin);
    }

    let mut decode = None;
    let mut prefill = None;
    for profile in &raw.scheduling_profiles {
        let slot = match profile.name.as_str() {
            "decode" => &mut decode,
            "prefill" => &mut prefill,
            other => {
                return Err(format!(
                    "schedulingProfiles: unknown profile \"{other}\"; pd-router runs a \"decode\" \
                     profile and, for P/D, a \"prefill\" profile (rename a single-profile \
                     \"default\" to \"decode\")"
                ))
            }
        };
        if slot.is_some() {
            return Err(format!(
                "schedulingProfiles: profile \"{}\" is defined twice",
                profile.name
            ));
        }
        *slot = Some(build_profile(profile, &plugins, &names)?);
    }
    let decode = decode.ok_or_else(|| {
        "schedulingProfiles: a profile named \"decode\" is required (it picks the decode endpoint)"
            .to_string()
    })?;
    // Without a decider the config describes a single-profile setup: never P/D.
    let threshold = match (threshold, has_decider) {
        (Some((_, t)), _) => t,
        (None, true) => DEFAULT_THRESHOLD,
        (None, false) => 0,
    };
    Ok(Scheduling {
        prefix: prefix.unwrap_or_default(),
        decode,
        prefill,
        threshold,
    })
}
