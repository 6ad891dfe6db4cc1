//! Command line, environment and YAML configuration of `pd-router`.
//!
//! `Args` is what clap parses (every flag also reads `TANDEM_ROUTER_*`);
//! [`RouterConfig`] is the validated form the server runs with. The scheduling
//! part comes from a YAML file in the shape of llm-d's `EndpointPickerConfig`
//! (plugins, then scheduling profiles that reference them) or from a built-in
//! default. Anything the router cannot honour is a start-up error naming the
//! key or plugin: a config is never half applied. Nothing here opens sockets.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{parse_duration, split_host_port};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "pd-router",
    version,
    about = "Picks the prefill/decode pair for each OpenAI request (prefix-cache and load aware) \
             and forwards it to the decode pod's pd-sidecar"
)]
pub struct Args {
    /// Port the router listens on.
    #[arg(long, env = "TANDEM_ROUTER_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Address the router binds.
    #[arg(long, env = "TANDEM_ROUTER_BIND", default_value = "0.0.0.0")]
    pub bind: String,

    /// Port of the Prometheus /metrics listener; 0 = off.
    #[arg(
        long = "metrics-port",
        env = "TANDEM_ROUTER_METRICS_PORT",
        default_value_t = 9090
    )]
    pub metrics_port: u16,

    /// A decode endpoint, normally a decode pod's pd-sidecar: `http://host:port`, `https://host:port`
    /// or `host:port` (http). Repeat the flag (or comma-separate) for more.
    #[arg(long = "decode", env = "TANDEM_ROUTER_DECODE", value_delimiter = ',')]
    pub decode: Vec<String>,

    /// A prefill engine as `host:port`: the value sent in `x-prefiller-host-port`. Repeatable;
    /// none = never disaggregate.
    #[arg(long = "prefill", env = "TANDEM_ROUTER_PREFILL", value_delimiter = ',')]
    pub prefill: Vec<String>,

    /// Scheduling profiles as YAML in the shape of llm-d's EndpointPickerConfig.
    #[arg(long, env = "TANDEM_ROUTER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Disaggregate when the decode pick lacks at least this many prompt tokens in its cache;
    /// 0 = never. Overrides the config's decider.
    #[arg(long = "threshold-tokens", env = "TANDEM_ROUTER_THRESHOLD_TOKENS")]
    pub threshold_tokens: Option<u64>,

    /// Largest request body accepted on the inference routes; larger gets 413.
    #[arg(long = "max-body-bytes", env = "TANDEM_ROUTER_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Idle keep-alive of upstream connections; keep it below the upstream's own.
    #[arg(long = "upstream-idle-timeout", env = "TANDEM_ROUTER_UPSTREAM_IDLE_TIMEOUT",
          default_value = "4s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Max idle keep-alive connections per upstream host.
    #[arg(
        long = "max-idle-conns-per-host",
        env = "TANDEM_ROUTER_MAX_IDLE_CONNS_PER_HOST",
        default_value_t = 1024
    )]
    pub max_idle_conns_per_host: usize,

    /// Do not verify the certificates of `https://` decode endpoints (the sidecars' self-signed ones).
    #[arg(long = "tls-insecure-skip-verify", env = "TANDEM_ROUTER_TLS_INSECURE_SKIP_VERIFY",
          default_value_t = false, num_args = 0..=1, default_missing_value = "true",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub tls_insecure_skip_verify: bool,

    /// Time in-flight requests get to finish after SIGTERM.
    #[arg(long = "shutdown-grace-period", env = "TANDEM_ROUTER_SHUTDOWN_GRACE_PERIOD",
          default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace_period: Duration,

    /// Runtime worker threads; 0 = one per CPU.
    #[arg(
        long = "worker-threads",
        env = "TANDEM_ROUTER_WORKER_THREADS",
        default_value_t = 0
    )]
    pub worker_threads: usize,

    /// Log filter (tracing syntax: `info`, `debug`, `sidecar::router=debug`); RUST_LOG wins.
    #[arg(
        long = "log-level",
        env = "TANDEM_ROUTER_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,

    /// Log as JSON lines instead of text.
    #[arg(long = "log-json", env = "TANDEM_ROUTER_LOG_JSON", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub log_json: bool,
}

/// A decode endpoint: where requests are forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeTarget {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// `host:port`.
    pub authority: String,
}

impl DecodeTarget {
    /// `scheme://host:port`, also the endpoint's metric label.
    pub fn label(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

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

fn default_profile(name: &str) -> ProfileSpec {
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

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub bind: String,
    pub port: u16,
    pub metrics_port: u16,
    pub decode: Vec<DecodeTarget>,
    /// `host:port` values for `x-prefiller-host-port`.
    pub prefill: Vec<String>,
    pub scheduling: Scheduling,
    pub max_body_bytes: usize,
    pub upstream_idle_timeout: Duration,
    pub max_idle_conns_per_host: usize,
    pub tls_insecure_skip_verify: bool,
    pub shutdown_grace_period: Duration,
    pub worker_threads: usize,
    pub log_filter: String,
    pub log_json: bool,
}

/// Parses a `--decode` value.
pub fn parse_decode(value: &str) -> Result<DecodeTarget, String> {
    let v = value.trim();
    let (scheme, rest) = if let Some(rest) = v.strip_prefix("http://") {
        ("http", rest)
    } else if let Some(rest) = v.strip_prefix("https://") {
        ("https", rest)
    } else if v.contains("://") {
        return Err(format!(
            "--decode={value:?}: only http:// and https:// endpoints are supported"
        ));
    } else {
        ("http", v)
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') {
        return Err(format!(
            "--decode={value:?}: give the endpoint as scheme://host:port, without a path"
        ));
    }
    if split_host_port(authority).is_none() {
        return Err(format!("--decode={value:?}: expected host:port"));
    }
    Ok(DecodeTarget {
        scheme,
        authority: authority.to_string(),
    })
}

/// Parses a `--prefill` value (a legacy `http://` prefix is accepted and dropped).
pub fn parse_prefill(value: &str) -> Result<String, String> {
    let v = value.trim();
    let v = v.strip_prefix("http://").unwrap_or(v);
    let v = v.strip_suffix('/').unwrap_or(v);
    if v.contains("://") || v.contains('/') || split_host_port(v).is_none() {
        return Err(format!(
            "--prefill={value:?}: expected host:port (the value of x-prefiller-host-port)"
        ));
    }
    Ok(v.to_string())
}

fn no_duplicates<'a>(flag: &str, items: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = HashSet::new();
    for item in items {
        if !seen.insert(item.to_ascii_lowercase()) {
            return Err(format!("{flag}: {item} is listed twice"));
        }
    }
    Ok(())
}

impl RouterConfig {
    /// Resolves flags and the config file; the error names the flag or key.
    pub fn from_args(args: Args) -> Result<RouterConfig, String> {
        if args.decode.is_empty() {
            return Err(
                "at least one --decode endpoint is required (a decode pod's pd-sidecar, \
                 e.g. --decode http://10.0.0.7:8000)"
                    .into(),
            );
        }
        let decode = args
            .decode
            .iter()
            .map(|d| parse_decode(d))
            .collect::<Result<Vec<_>, _>>()?;
        let prefill = args
            .prefill
            .iter()
            .map(|p| parse_prefill(p))
            .collect::<Result<Vec<_>, _>>()?;
        no_duplicates("--decode", decode.iter().map(|d| d.authority.as_str()))?;
        no_duplicates("--prefill", prefill.iter().map(String::as_str))?;
        if args.max_body_bytes == 0 {
            return Err("--max-body-bytes must be greater than 0".into());
        }
        let mut scheduling = match &args.config {
            None => Scheduling::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--config={}: {e}", path.display()))?;
                parse_scheduling(&text).map_err(|e| format!("--config={}: {e}", path.display()))?
            }
        };
        if let Some(t) = args.threshold_tokens {
            scheduling.threshold = t;
        }
        if !prefill.is_empty() && scheduling.threshold > 0 && scheduling.prefill.is_none() {
            return Err(format!(
                "--prefill endpoints are given and the P/D threshold is {} but the config has no \
                 \"prefill\" scheduling profile to pick among them; add one (or set the decider's \
                 threshold to 0)",
                scheduling.threshold
            ));
        }
        let log_filter = match std::env::var("RUST_LOG") {
            Ok(f) if !f.is_empty() => f,
            _ => format!("{},hyper=warn,hyper_util=warn,rustls=warn", args.log_level),
        };
        Ok(RouterConfig {
            bind: args.bind,
            port: args.port,
            metrics_port: args.metrics_port,
            decode,
            prefill,
            scheduling,
            max_body_bytes: args.max_body_bytes,
            upstream_idle_timeout: args.upstream_idle_timeout,
            max_idle_conns_per_host: args.max_idle_conns_per_host,
            tls_insecure_skip_verify: args.tls_insecure_skip_verify,
            shutdown_grace_period: args.shutdown_grace_period,
            worker_threads: args.worker_threads,
            log_filter,
            log_json: args.log_json,
        })
    }

    /// Parses argv (program name first) into a validated config.
    pub fn parse_from<I, T>(argv: I) -> Result<RouterConfig, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        RouterConfig::from_args(args)
    }
}

// ---------------------------------------------------------------------------
// The YAML file.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    scheduling_profiles: Vec<RawProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    #[serde(default)]
    parameters: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    #[serde(default)]
    plugins: Vec<RawProfileRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProfileRef {
    plugin_ref: String,
    weight: Option<f64>,
}

/// Plugin types the router knows, for the "unknown type" message.
const PLUGIN_TYPES: [&str; 13] = [
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
enum Plugin {
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
fn parameters(label: &str, params: &Value, allowed: &[&str]) -> Result<Map<String, Value>, String> {
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
fn uint_param(
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

fn to_usize(label: &str, key: &str, n: u64) -> Result<usize, String> {
    usize::try_from(n).map_err(|_| format!("plugin {label}: parameter \"{key}\" is too large"))
}

/// Reads one plugin definition; prefix-cache-scorer parameters go to `prefix`.
fn define_plugin(
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
        "queue-scorer" | "kv-cache-utilization-scorer" | "kv-cache-scorer" => {
            return Err(format!(
                "plugin {label}: type \"{}\" is not supported yet (it needs engine metrics \
                 scraping, which pd-router does not do yet); use prefix-cache-scorer and \
                 load-aware-scorer",
                raw.kind
            ))
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

fn build_profile(
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

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters: {blockSize: 32, maxPrefixBlocksToMatch: 128, lruCapacityPerServer: 1000}
- type: load-aware-scorer
- type: max-score-picker
- type: random-picker
- type: decode-filter
- type: prefill-filter
- type: prefill-header-handler
- type: pd-profile-handler
  parameters: {threshold: 512}
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 512}
- type: load-aware-scorer
  name: load-by-threshold
  parameters: {threshold: 64}
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: load-aware-scorer
    weight: 1.5
  - pluginRef: max-score-picker
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: load-by-threshold
  - pluginRef: random-picker
"#;

    fn parse(args: &[&str]) -> Result<RouterConfig, String> {
        RouterConfig::parse_from(std::iter::once("pd-router").chain(args.iter().copied()))
    }

    fn err(yaml: &str) -> String {
        parse_scheduling(yaml).unwrap_err()
    }

    #[test]
    fn default_scheduling_is_prefix_and_load_with_threshold_256() {
        let cfg = parse(&["--decode", "http://127.0.0.1:8000"]).unwrap();
        let s = &cfg.scheduling;
        assert_eq!(s.threshold, 256);
        assert_eq!(s.prefix, PrefixParams::default());
        assert_eq!(s.prefix.block_size, 16);
        for p in [&s.decode, s.prefill.as_ref().unwrap()] {
            assert_eq!(p.picker, PickerSpec::MaxScore);
            assert_eq!(p.scorers.len(), 2);
            assert_eq!(p.scorers[0].scorer, ScorerSpec::PrefixCache);
            assert_eq!(p.scorers[0].weight, 2.0);
            assert_eq!(
                p.scorers[1].scorer,
                ScorerSpec::LoadAware { threshold: None }
            );
            assert_eq!(p.scorers[1].weight, 1.0);
        }
        assert_eq!((cfg.port, cfg.metrics_port), (8080, 9090));
    }

    #[test]
    fn full_example_parses() {
        let s = parse_scheduling(FULL).unwrap();
        assert_eq!(
            s.prefix,
            PrefixParams {
                block_size: 32,
                max_blocks: 128,
                lru_capacity: 1000
            }
        );
        assert_eq!(s.threshold, 512);
        assert_eq!(s.decode.scorers.len(), 2);
        assert_eq!(s.decode.scorers[1].weight, 1.5);
        let prefill = s.prefill.unwrap();
        assert_eq!(prefill.picker, PickerSpec::Random);
        assert_eq!(
            prefill.scorers,
            vec![WeightedScorer {
                name: "load-by-threshold".into(),
                scorer: ScorerSpec::LoadAware {
                    threshold: Some(64)
                },
                weight: 1.0
            }]
        );
    }

    #[test]
    fn decider_defaults_and_zero() {
        let base = "plugins:\n- type: max-score-picker\n";
        let profile =
            "schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: max-score-picker\n";
        // No decider: single profile, never P/D.
        assert_eq!(
            parse_scheduling(&format!("{base}{profile}"))
                .unwrap()
                .threshold,
            0
        );
        let s = parse_scheduling(&format!("{base}- type: pd-profile-handler\n{profile}")).unwrap();
        assert_eq!(s.threshold, DEFAULT_THRESHOLD);
        let s = parse_scheduling(&format!(
            "{base}- type: prefix-based-pd-decider\n  parameters: {{nonCachedTokens: 0}}\n{profile}"
        ))
        .unwrap();
        assert_eq!(s.threshold, 0);
        assert!(s.prefill.is_none());
    }

    #[test]
    fn threshold_flag_overrides_the_config() {
        let dir = std::env::temp_dir().join(format!("pd-router-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("full.yaml");
        std::fs::write(&path, FULL).unwrap();
        let p = path.to_str().unwrap();
        let cfg = parse(&["--decode=a:1", "--config", p]).unwrap();
        assert_eq!(cfg.scheduling.threshold, 512);
        let cfg = parse(&["--decode=a:1", "--config", p, "--threshold-tokens=7"]).unwrap();
        assert_eq!(cfg.scheduling.threshold, 7);
        let missing = parse(&["--decode=a:1", "--config", "/nonexistent/x.yaml"]).unwrap_err();
        assert!(
            missing.contains("--config=/nonexistent/x.yaml"),
            "{missing}"
        );
    }

    #[test]
    fn unknown_plugin_type_is_named() {
        let e = err("plugins:\n- type: precise-prefix-cache-scorer\nschedulingProfiles: []\n");
        assert!(
            e.contains("unknown type \"precise-prefix-cache-scorer\""),
            "{e}"
        );
        assert!(e.contains("prefix-cache-scorer, load-aware-scorer"), "{e}");
    }

    #[test]
    fn unknown_parameter_is_named() {
        let e = err("plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 16, hashBlockSize: 64}\n");
        assert!(e.contains("unknown parameter \"hashBlockSize\""), "{e}");
        assert!(e.contains("blockSize, maxPrefixBlocksToMatch"), "{e}");
        let e = err("plugins:\n- type: decode-filter\n  parameters: {x: 1}\n");
        assert!(
            e.contains("unknown parameter \"x\"") && e.contains("no parameters"),
            "{e}"
        );
        let e = err("plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 0}\n");
        assert!(e.contains("\"blockSize\" must be an integer >= 1"), "{e}");
        let e = err("plugins:\n- type: pd-profile-handler\n  parameters: {threshold: -5}\n");
        assert!(e.contains("\"threshold\""), "{e}");
    }

    #[test]
    fn unknown_top_level_and_profile_keys_are_named() {
        let e = err("plugins: []\nschedulingProfile: []\n");
        assert!(e.contains("schedulingProfile"), "{e}");
        let e = err(
            "schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: x\n    wieght: 2\n",
        );
        assert!(e.contains("wieght"), "{e}");
        let e = err("kind: Deployment\n");
        assert!(e.contains("EndpointPickerConfig"), "{e}");
    }

    #[test]
    fn unsupported_scorers_are_errors_not_ignored() {
        for t in [
            "queue-scorer",
            "kv-cache-utilization-scorer",
            "kv-cache-scorer",
        ] {
            let e = err(&format!("plugins:\n- type: {t}\n"));
            assert!(
                e.contains(&format!("\"{t}\"")) && e.contains("not supported yet"),
                "{e}"
            );
        }
    }

    #[test]
    fn profile_errors() {
        let plugins = "plugins:\n- type: prefix-cache-scorer\n- type: max-score-picker\n- type: random-picker\n- type: pd-profile-handler\n";
        let e = err(&format!(
            "{plugins}schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: nope\n"
        ));
        assert!(
            e.contains("unknown pluginRef \"nope\"") && e.contains("prefix-cache-scorer"),
            "{e}"
        );
        let e = err(&format!(
            "{plugins}schedulingProfiles:\n- name: prefill\n  plugins: []\n"
        ));
        assert!(e.contains("\"decode\" is required"), "{e}");
        let e = err(&format!("{plugins}schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: prefix-cache-scorer\n    weight: -1\n"));
        assert!(e.contains("weight must be a number >= 0"), "{e}");
        let e = err(&format!("{plugins}schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: max-score-picker\n  - pluginRef: random-picker\n"));
        assert!(e.contains("two pickers"), "{e}");
        let e = err(&format!("{plugins}schedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: pd-profile-handler\n"));
        assert!(e.contains("list it under plugins only"), "{e}");
        let e = err(&format!(
            "{plugins}schedulingProfiles:\n- name: default\n  plugins: []\n"
        ));
        assert!(e.contains("unknown profile \"default\""), "{e}");
        let e = err("plugins:\n- type: max-score-picker\n- type: max-score-picker\n");
        assert!(e.contains("defined twice"), "{e}");
        let e = err("plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 2}\n");
        assert!(e.contains("maxNumOfEndpoints=2"), "{e}");
    }

    #[test]
    fn disagreeing_deciders_are_an_error() {
        let e = err("plugins:\n- type: pd-profile-handler\n  parameters: {threshold: 100}\n- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 200}\n");
        assert!(e.contains("disagrees"), "{e}");
    }

    #[test]
    fn endpoints_parse_and_validate() {
        assert_eq!(
            parse_decode("10.0.0.1:8000").unwrap(),
            DecodeTarget {
                scheme: "http",
                authority: "10.0.0.1:8000".into()
            }
        );
        assert_eq!(
            parse_decode("https://d-0:8000/").unwrap().label(),
            "https://d-0:8000"
        );
        assert!(parse_decode("http://d-0:8000/v1").is_err());
        assert!(parse_decode("grpc://d:1").is_err());
        assert!(parse_decode("nohost").is_err());
        assert_eq!(
            parse_prefill("http://10.0.0.2:8000").unwrap(),
            "10.0.0.2:8000"
        );
        assert!(parse_prefill("p-0").is_err());
        let cfg = parse(&[
            "--decode",
            "a:1",
            "--decode=http://b:2",
            "--prefill=p:1,q:2",
        ])
        .unwrap();
        assert_eq!(cfg.decode.len(), 2);
        assert_eq!(cfg.prefill, vec!["p:1".to_string(), "q:2".to_string()]);
        let e = parse(&[]).unwrap_err();
        assert!(e.contains("--decode"), "{e}");
        let e = parse(&["--decode=a:1", "--decode=http://a:1"]).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = parse(&["--decode=a:1", "--no-such-flag"]).unwrap_err();
        assert!(e.contains("--no-such-flag"), "{e}");
    }

    #[test]
    fn prefill_endpoints_need_a_prefill_profile() {
        let dir = std::env::temp_dir().join(format!("pd-router-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decode-only.yaml");
        std::fs::write(
            &path,
            "plugins:\n- type: pd-profile-handler\nschedulingProfiles:\n- name: decode\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let e = parse(&["--decode=a:1", "--prefill=p:1", "--config", p]).unwrap_err();
        assert!(e.contains("no \"prefill\" scheduling profile"), "{e}");
        // Threshold 0: P/D is off, so no prefill profile is needed.
        assert!(parse(&[
            "--decode=a:1",
            "--prefill=p:1",
            "--config",
            p,
            "--threshold-tokens=0"
        ])
        .is_ok());
    }
}
