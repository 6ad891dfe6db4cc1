//! Command line, environment and YAML configuration of `pd-router`.
//!
//! `Args` is what clap parses (every flag also reads `TANDEM_ROUTER_*`);
//! [`RouterConfig`] is the validated form the server runs with. The scheduling
//! part comes from a YAML file in the shape of llm-d's `EndpointPickerConfig`
//! (plugins, then scheduling profiles that reference them) or from a built-in
//! default. The endpoints come from flags and/or an endpoints YAML file, read
//! once at start. Anything the router cannot honour is a start-up error naming
//! the key or plugin: a config is never half applied. Nothing here opens sockets.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};
use http::Uri;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::breaker::BreakerConfig;
use super::probe::ProbeConfig;
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

    /// Decode endpoints by DNS: `http://name:port` (or https://), every address the name resolves
    /// to (the pods behind a headless Service) becoming one endpoint at that port. Re-resolved
    /// every --dns-refresh-interval. Repeatable; combines with --decode.
    #[arg(
        long = "decode-dns",
        env = "TANDEM_ROUTER_DECODE_DNS",
        value_delimiter = ','
    )]
    pub decode_dns: Vec<String>,

    /// Prefill engines by DNS: `name:port`, each resolved address becoming one prefill endpoint
    /// `address:port`. Repeatable; combines with --prefill.
    #[arg(
        long = "prefill-dns",
        env = "TANDEM_ROUTER_PREFILL_DNS",
        value_delimiter = ','
    )]
    pub prefill_dns: Vec<String>,

    /// How often --decode-dns and --prefill-dns names are resolved again. A failed lookup keeps
    /// the addresses of the last one that worked.
    #[arg(long = "dns-refresh-interval", env = "TANDEM_ROUTER_DNS_REFRESH_INTERVAL",
          default_value = "5s", value_parser = parse_duration)]
    pub dns_refresh_interval: Duration,

    /// YAML file listing decode and prefill endpoints (with optional metrics URLs); merged with
    /// --decode/--prefill. Read once at start.
    #[arg(long, env = "TANDEM_ROUTER_ENDPOINTS")]
    pub endpoints: Option<PathBuf>,

    /// Scheduling profiles as YAML in the shape of llm-d's EndpointPickerConfig.
    #[arg(long, env = "TANDEM_ROUTER_CONFIG")]
    pub config: Option<PathBuf>,

    /// tokenizer.json of the served model: exact token counts, and prefix blocks of exactly
    /// `blockSize` tokens (default: estimate 4 bytes per token).
    #[arg(long, env = "TANDEM_ROUTER_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

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

    /// How often each endpoint's engine metrics are scraped; 0 = never (metric scorers neutral).
    #[arg(long = "refresh-metrics-interval", env = "TANDEM_ROUTER_REFRESH_METRICS_INTERVAL",
          default_value = "50ms", value_parser = parse_duration)]
    pub refresh_metrics_interval: Duration,

    /// Scraped metrics older than this count as unknown (neutral score); also the time limit
    /// of one scrape.
    #[arg(long = "metrics-staleness-threshold", env = "TANDEM_ROUTER_METRICS_STALENESS_THRESHOLD",
          default_value = "2s", value_parser = parse_duration)]
    pub metrics_staleness_threshold: Duration,

    /// How often each endpoint's health is checked (GET /health); 0 = never (only forwarded
    /// requests count).
    #[arg(long = "health-check-interval", env = "TANDEM_ROUTER_HEALTH_CHECK_INTERVAL",
          default_value = "2s", value_parser = parse_duration)]
    pub health_check_interval: Duration,

    /// Time limit of one health check.
    #[arg(long = "health-check-timeout", env = "TANDEM_ROUTER_HEALTH_CHECK_TIMEOUT",
          default_value = "1s", value_parser = parse_duration)]
    pub health_check_timeout: Duration,

    /// Path of decode endpoints' health check (`/ready` on a pd-sidecar also checks its engine).
    #[arg(
        long = "decode-health-path",
        env = "TANDEM_ROUTER_DECODE_HEALTH_PATH",
        default_value = "/health"
    )]
    pub decode_health_path: String,

    /// Consecutive failures (health checks or forwarded requests) that open an endpoint's circuit.
    #[arg(long = "unhealthy-threshold", env = "TANDEM_ROUTER_UNHEALTHY_THRESHOLD",
          default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub unhealthy_threshold: u32,

    /// How long an open circuit excludes its endpoint before a probe may close it.
    #[arg(long = "circuit-open-duration", env = "TANDEM_ROUTER_CIRCUIT_OPEN_DURATION",
          default_value = "5s", value_parser = parse_duration)]
    pub circuit_open_duration: Duration,

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

    /// OpenTelemetry traces over OTLP gRPC (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME,
    /// OTEL_TRACES_SAMPLER, ...): a span per request with the pick, the decode leg and TTFT.
    #[arg(long = "tracing", env = "TANDEM_ROUTER_TRACING", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub tracing: bool,

    /// Log as JSON lines instead of text.
    #[arg(long = "log-json", env = "TANDEM_ROUTER_LOG_JSON", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub log_json: bool,

    /// Parse and validate every flag and file (config, endpoints, tokenizer), print the effective
    /// configuration and exit (0; 2 on bad input) without binding any port.
    // No environment variable on purpose: a stray one would turn a serving container into one
    // that exits at once.
    #[arg(long = "check-config", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub check_config: bool,
}

/// A name whose addresses are endpoints (`--decode-dns`, `--prefill-dns`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsName {
    /// `http` or `https` (decode endpoints; prefill endpoints are named by host:port only).
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
}

impl DnsName {
    fn parse(what: &str, scheme: &'static str, authority: &str) -> Result<DnsName, String> {
        let (host, port) =
            split_host_port(authority).ok_or_else(|| format!("{what}: expected name:port"))?;
        Ok(DnsName {
            scheme,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
        })
    }

    /// The decode endpoint at one of the name's addresses.
    pub fn decode_at(&self, ip: std::net::IpAddr) -> DecodeTarget {
        DecodeTarget {
            scheme: self.scheme,
            authority: std::net::SocketAddr::new(ip, self.port).to_string(),
            metrics_url: None,
        }
    }

    /// The prefill endpoint at one of the name's addresses.
    pub fn prefill_at(&self, ip: std::net::IpAddr) -> PrefillTarget {
        PrefillTarget {
            host_port: std::net::SocketAddr::new(ip, self.port).to_string(),
            metrics_url: None,
        }
    }
}

/// A decode endpoint: where requests are forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeTarget {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// `host:port`.
    pub authority: String,
    /// Where its engine metrics are scraped; None = the endpoint's own `/metrics`
    /// (a pd-sidecar passes it through to its engine).
    pub metrics_url: Option<Uri>,
}

impl DecodeTarget {
    /// `scheme://host:port`, also the endpoint's metric label.
    pub fn label(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    pub fn metrics_uri(&self) -> Uri {
        self.metrics_url
            .clone()
            .unwrap_or_else(|| self.uri("/metrics"))
    }

    /// `path` on this endpoint (a validated authority and an absolute path make a valid URI).
    pub fn uri(&self, path: &str) -> Uri {
        format!("{}://{}{path}", self.scheme, self.authority)
            .parse()
            .unwrap_or_else(|e| panic!("decode endpoint {} with {path}: {e}", self.label()))
    }
}

/// A prefill engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillTarget {
    /// `host:port`: the value of `x-prefiller-host-port`, also the metric label.
    pub host_port: String,
    /// Where its metrics are scraped; None = `http://host:port/metrics`.
    pub metrics_url: Option<Uri>,
}

impl PrefillTarget {
    pub fn label(&self) -> String {
        self.host_port.clone()
    }

    pub fn metrics_uri(&self) -> Uri {
        self.metrics_url
            .clone()
            .unwrap_or_else(|| self.uri("/metrics"))
    }

    pub fn uri(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.host_port)
            .parse()
            .unwrap_or_else(|e| panic!("prefill endpoint {} with {path}: {e}", self.host_port))
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

/// A loaded tokenizer.json, shared by every request.
#[derive(Clone)]
pub struct Tokenizer {
    pub path: PathBuf,
    pub inner: Arc<tokenizers::Tokenizer>,
}

impl Tokenizer {
    pub fn load(path: &Path) -> Result<Tokenizer, String> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| Tokenizer {
                path: path.to_path_buf(),
                inner: Arc::new(t),
            })
            .map_err(|e| format!("--tokenizer={}: {e}", path.display()))
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({})", self.path.display())
    }
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub bind: String,
    pub port: u16,
    pub metrics_port: u16,
    pub decode: Vec<DecodeTarget>,
    pub prefill: Vec<PrefillTarget>,
    pub scheduling: Scheduling,
    pub probes: ProbeConfig,
    pub breaker: BreakerConfig,
    /// Health-check path of decode endpoints (prefill endpoints: `/health`).
    pub decode_health_path: String,
    /// `--decode-dns` and `--prefill-dns`: names resolved into more endpoints.
    pub decode_dns: Vec<DnsName>,
    pub prefill_dns: Vec<DnsName>,
    pub dns_refresh_interval: Duration,
    pub max_body_bytes: usize,
    /// Loaded from `--tokenizer`; `None` estimates 4 bytes per token.
    pub tokenizer: Option<Tokenizer>,
    pub upstream_idle_timeout: Duration,
    pub max_idle_conns_per_host: usize,
    pub tls_insecure_skip_verify: bool,
    pub shutdown_grace_period: Duration,
    pub worker_threads: usize,
    pub log_filter: String,
    pub log_json: bool,
    pub tracing: bool,
    /// `--check-config`: validate, print this configuration and exit; never serve.
    pub check_config: bool,
}

/// Parses a `--decode` value.
pub fn parse_decode(value: &str) -> Result<DecodeTarget, String> {
    decode_target(&format!("--decode={value:?}"), value)
}

/// A decode endpoint; `what` names it in errors.
fn decode_target(what: &str, value: &str) -> Result<DecodeTarget, String> {
    let v = value.trim();
    let (scheme, rest) = if let Some(rest) = v.strip_prefix("http://") {
        ("http", rest)
    } else if let Some(rest) = v.strip_prefix("https://") {
        ("https", rest)
    } else if v.contains("://") {
        return Err(format!(
            "{what}: only http:// and https:// endpoints are supported"
        ));
    } else {
        ("http", v)
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') {
        return Err(format!(
            "{what}: give the endpoint as scheme://host:port, without a path"
        ));
    }
    if split_host_port(authority).is_none() || authority.parse::<http::uri::Authority>().is_err() {
        return Err(format!("{what}: expected host:port"));
    }
    Ok(DecodeTarget {
        scheme,
        authority: authority.to_string(),
        metrics_url: None,
    })
}

/// Parses a `--prefill` value (a legacy `http://` prefix is accepted and dropped).
pub fn parse_prefill(value: &str) -> Result<PrefillTarget, String> {
    prefill_target(&format!("--prefill={value:?}"), value)
}

fn prefill_target(what: &str, value: &str) -> Result<PrefillTarget, String> {
    let v = value.trim();
    let v = v.strip_prefix("http://").unwrap_or(v);
    let v = v.strip_suffix('/').unwrap_or(v);
    if v.contains("://")
        || v.contains('/')
        || split_host_port(v).is_none()
        || v.parse::<http::uri::Authority>().is_err()
    {
        return Err(format!(
            "{what}: expected host:port (the value of x-prefiller-host-port)"
        ));
    }
    Ok(PrefillTarget {
        host_port: v.to_string(),
        metrics_url: None,
    })
}

/// A `metricsUrl`: an absolute http(s) URL.
fn metrics_url(what: &str, value: &str) -> Result<Uri, String> {
    let uri: Uri = value
        .trim()
        .parse()
        .map_err(|e| format!("{what}: {value:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(format!(
            "{what}: {value:?} must be an absolute http:// or https:// URL"
        )),
    }
}

fn no_duplicates<'a>(what: &str, items: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = HashSet::new();
    for item in items {
        if !seen.insert(item.to_ascii_lowercase()) {
            return Err(format!("{what} {item} is listed twice"));
        }
    }
    Ok(())
}

/// The keys of a YAML mapping, each checked against `allowed`.
fn check_keys(at: &str, map: &Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(format!(
                "{at}: unknown key \"{key}\" (supported: {})",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

/// A list of endpoint entries: plain strings, or mappings with `key` (the
/// address) and an optional `metricsUrl`. Yields (address, metricsUrl, where).
fn endpoint_entries(
    list: &str,
    value: Option<&Value>,
    key: &str,
) -> Result<Vec<(String, Option<Uri>, String)>, String> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(format!("{list}: expected a list, got {other}")),
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{list}[{i}]");
        match item {
            Value::String(s) => out.push((s.clone(), None, at)),
            Value::Object(map) => {
                check_keys(&at, map, &[key, "metricsUrl"])?;
                let address = match map.get(key) {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        return Err(format!("{at}.{key}: expected a string, got {other}"))
                    }
                    None => return Err(format!("{at}: \"{key}\" is required")),
                };
                let metrics = match map.get("metricsUrl") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(metrics_url(&format!("{at}.metricsUrl"), s)?),
                    Some(other) => {
                        return Err(format!("{at}.metricsUrl: expected a string, got {other}"))
                    }
                };
                out.push((address, metrics, at));
            }
            other => {
                return Err(format!(
                    "{at}: expected a string or a mapping with \"{key}\", got {other}"
                ))
            }
        }
    }
    Ok(out)
}

/// Parses an endpoints file:
/// `decode: [{url, metricsUrl?} | url]`, `prefill: [{hostPort, metricsUrl?} | host:port]`.
pub fn parse_endpoints(text: &str) -> Result<(Vec<DecodeTarget>, Vec<PrefillTarget>), String> {
    let doc: Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let map = match doc {
        Value::Null => Map::new(),
        Value::Object(map) => map,
        other => {
            return Err(format!(
                "expected a mapping with \"decode\" and \"prefill\" lists, got {other}"
            ))
        }
    };
    check_keys("endpoints file", &map, &["decode", "prefill"])?;
    let decode = endpoint_entries("decode", map.get("decode"), "url")?
        .into_iter()
        .map(|(url, metrics, at)| {
            let mut d = decode_target(&format!("{at}.url {url:?}"), &url)?;
            d.metrics_url = metrics;
            Ok(d)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let prefill = endpoint_entries("prefill", map.get("prefill"), "hostPort")?
        .into_iter()
        .map(|(hp, metrics, at)| {
            let mut p = prefill_target(&format!("{at}.hostPort {hp:?}"), &hp)?;
            p.metrics_url = metrics;
            Ok(p)
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((decode, prefill))
}

impl RouterConfig {
    /// Resolves flags and the config files; the error names the flag or key.
    pub fn from_args(args: Args) -> Result<RouterConfig, String> {
        let mut decode = args
            .decode
            .iter()
            .map(|d| parse_decode(d))
            .collect::<Result<Vec<_>, _>>()?;
        let mut prefill = args
            .prefill
            .iter()
            .map(|p| parse_prefill(p))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(path) = &args.endpoints {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--endpoints={}: {e}", path.display()))?;
            let (d, p) = parse_endpoints(&text)
                .map_err(|e| format!("--endpoints={}: {e}", path.display()))?;
            decode.extend(d);
            prefill.extend(p);
        }
        let decode_dns = args
            .decode_dns
            .iter()
            .map(|v| {
                let what = format!("--decode-dns={v:?}");
                let d = decode_target(&what, v)?;
                DnsName::parse(&what, d.scheme, &d.authority)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prefill_dns = args
            .prefill_dns
            .iter()
            .map(|v| {
                let what = format!("--prefill-dns={v:?}");
                let p = prefill_target(&what, v)?;
                DnsName::parse(&what, "http", &p.host_port)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if decode.is_empty() && decode_dns.is_empty() {
            return Err(
                "at least one decode endpoint is required: --decode (a decode pod's pd-sidecar, \
                 e.g. --decode http://10.0.0.7:8000), --decode-dns (a headless Service, e.g. \
                 --decode-dns http://decode.ns.svc.cluster.local:8000) or a \"decode\" list in \
                 --endpoints"
                    .into(),
            );
        }
        if (!decode_dns.is_empty() || !prefill_dns.is_empty())
            && args.dns_refresh_interval.is_zero()
        {
            return Err("--dns-refresh-interval must be greater than 0".into());
        }
        no_duplicates(
            "decode endpoint",
            decode.iter().map(|d| d.authority.as_str()),
        )?;
        no_duplicates(
            "prefill endpoint",
            prefill.iter().map(|p| p.host_port.as_str()),
        )?;
        if args.max_body_bytes == 0 {
            return Err("--max-body-bytes must be greater than 0".into());
        }
        if args.metrics_staleness_threshold.is_zero() {
            return Err("--metrics-staleness-threshold must be greater than 0".into());
        }
        if args.health_check_timeout.is_zero() {
            return Err("--health-check-timeout must be greater than 0".into());
        }
        if !args.decode_health_path.starts_with('/')
            || args
                .decode_health_path
                .parse::<http::uri::PathAndQuery>()
                .is_err()
        {
            return Err(format!(
                "--decode-health-path={:?}: expected an absolute path such as /health",
                args.decode_health_path
            ));
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
        let any_prefill = !prefill.is_empty() || !prefill_dns.is_empty();
        if any_prefill && scheduling.threshold > 0 && scheduling.prefill.is_none() {
            return Err(format!(
                "prefill endpoints are given and the P/D threshold is {} but the config has no \
                 \"prefill\" scheduling profile to pick among them; add one (or set the decider's \
                 threshold to 0)",
                scheduling.threshold
            ));
        }
        let tokenizer = match &args.tokenizer {
            None => None,
            Some(path) => Some(Tokenizer::load(path)?),
        };
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
            probes: ProbeConfig {
                refresh_metrics_interval: args.refresh_metrics_interval,
                metrics_staleness: args.metrics_staleness_threshold,
                health_check_interval: args.health_check_interval,
                health_check_timeout: args.health_check_timeout,
            },
            breaker: BreakerConfig {
                threshold: args.unhealthy_threshold,
                open_for: args.circuit_open_duration,
            },
            decode_health_path: args.decode_health_path,
            decode_dns,
            prefill_dns,
            dns_refresh_interval: args.dns_refresh_interval,
            max_body_bytes: args.max_body_bytes,
            tokenizer,
            upstream_idle_timeout: args.upstream_idle_timeout,
            max_idle_conns_per_host: args.max_idle_conns_per_host,
            tls_insecure_skip_verify: args.tls_insecure_skip_verify,
            shutdown_grace_period: args.shutdown_grace_period,
            worker_threads: args.worker_threads,
            log_filter,
            log_json: args.log_json,
            tracing: args.tracing,
            check_config: args.check_config,
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

    /// Whether a profile scores by prefix (then its blockSize should match the engines').
    pub fn uses_prefix_scorer(&self) -> bool {
        let s = &self.scheduling;
        std::iter::once(&s.decode)
            .chain(s.prefill.as_ref())
            .flat_map(|p| &p.scorers)
            .any(|w| w.scorer == ScorerSpec::PrefixCache)
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
    fn dns_names_are_endpoints_too() {
        let cfg = parse(&[
            "--decode-dns",
            "https://decode.ns.svc.cluster.local:8000",
            "--prefill-dns",
            "prefill.ns.svc:8000",
            "--dns-refresh-interval",
            "2s",
        ])
        .expect("names alone are enough");
        assert_eq!(
            cfg.decode_dns,
            [DnsName {
                scheme: "https",
                host: "decode.ns.svc.cluster.local".into(),
                port: 8000
            }]
        );
        assert_eq!(cfg.prefill_dns[0].host, "prefill.ns.svc");
        assert_eq!(cfg.dns_refresh_interval, Duration::from_secs(2));
        let ip = "10.0.0.9".parse().unwrap();
        assert_eq!(
            cfg.decode_dns[0].decode_at(ip).label(),
            "https://10.0.0.9:8000"
        );
        assert_eq!(cfg.prefill_dns[0].prefill_at(ip).label(), "10.0.0.9:8000");
        let v6 = "fd00::1".parse().unwrap();
        assert_eq!(cfg.prefill_dns[0].prefill_at(v6).label(), "[fd00::1]:8000");

        for (args, names) in [
            (&["--decode-dns", "decode"][..], "--decode-dns"),
            (&["--decode-dns", "ftp://decode:1"][..], "--decode-dns"),
            (&["--decode-dns", "http://decode:1/v1"][..], "--decode-dns"),
            (
                &["--decode", "d:1", "--prefill-dns", "p"][..],
                "--prefill-dns",
            ),
            (
                &["--decode-dns", "d:1", "--dns-refresh-interval", "0"][..],
                "--dns-refresh-interval",
            ),
            (&["--prefill-dns", "p:1"][..], "--decode-dns"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(names), "{args:?}: {e}");
        }
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
    fn tokenizer_flag_loads_or_names_the_file() {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/wordlevel-tokenizer.json"
        );
        let cfg = parse(&["--decode=a:1", &format!("--tokenizer={fixture}")]).unwrap();
        assert!(cfg.tokenizer.is_some());
        assert!(parse(&["--decode=a:1"]).unwrap().tokenizer.is_none());
        let e = parse(&["--decode=a:1", "--tokenizer=/nonexistent/tokenizer.json"]).unwrap_err();
        assert!(e.contains("--tokenizer=/nonexistent/tokenizer.json"), "{e}");
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
    fn metric_scorers_parse_and_take_no_parameters() {
        let s = parse_scheduling(
            "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n\
             - type: kv-cache-scorer\n  name: kv-old\nschedulingProfiles:\n- name: decode\n  plugins:\n\
             \x20 - pluginRef: queue-scorer\n    weight: 3\n  - pluginRef: kv-cache-utilization-scorer\n\
             \x20 - pluginRef: kv-old\n",
        )
        .unwrap();
        let kinds: Vec<_> = s
            .decode
            .scorers
            .iter()
            .map(|w| (w.scorer, w.weight))
            .collect();
        assert_eq!(
            kinds,
            [
                (ScorerSpec::Queue, 3.0),
                (ScorerSpec::KvCacheUtilization, 1.0),
                (ScorerSpec::KvCacheUtilization, 1.0)
            ]
        );
        for t in [
            "queue-scorer",
            "kv-cache-utilization-scorer",
            "kv-cache-scorer",
        ] {
            let e = err(&format!("plugins:\n- type: {t}\n  parameters: {{x: 1}}\n"));
            assert!(
                e.contains(&format!("\"{t}\"")) && e.contains("unknown parameter \"x\""),
                "{e}"
            );
        }
    }

    #[test]
    fn probe_and_breaker_flags_default_like_llm_d_and_validate() {
        let cfg = parse(&["--decode=a:1"]).unwrap();
        assert_eq!(
            cfg.probes,
            ProbeConfig {
                refresh_metrics_interval: Duration::from_millis(50),
                metrics_staleness: Duration::from_secs(2),
                health_check_interval: Duration::from_secs(2),
                health_check_timeout: Duration::from_secs(1),
            }
        );
        assert_eq!(
            cfg.breaker,
            BreakerConfig {
                threshold: 3,
                open_for: Duration::from_secs(5)
            }
        );
        assert_eq!(cfg.decode_health_path, "/health");
        let cfg = parse(&[
            "--decode=a:1",
            "--refresh-metrics-interval=0",
            "--metrics-staleness-threshold=1m30s",
            "--health-check-interval=100ms",
            "--unhealthy-threshold=2",
            "--circuit-open-duration=300ms",
            "--decode-health-path=/ready",
        ])
        .unwrap();
        assert_eq!(cfg.probes.refresh_metrics_interval, Duration::ZERO);
        assert_eq!(cfg.probes.metrics_staleness, Duration::from_secs(90));
        assert_eq!(cfg.probes.health_check_interval, Duration::from_millis(100));
        assert_eq!(cfg.breaker.threshold, 2);
        assert_eq!(cfg.breaker.open_for, Duration::from_millis(300));
        assert_eq!(cfg.decode_health_path, "/ready");
        for (flag, expected) in [
            ("--unhealthy-threshold=0", "--unhealthy-threshold"),
            (
                "--metrics-staleness-threshold=0s",
                "--metrics-staleness-threshold",
            ),
            ("--health-check-timeout=0", "--health-check-timeout"),
            ("--decode-health-path=ready", "--decode-health-path"),
            (
                "--circuit-open-duration=5parsecs",
                "--circuit-open-duration",
            ),
        ] {
            let e = parse(&["--decode=a:1", flag]).unwrap_err();
            assert!(e.contains(expected), "{flag}: {e}");
        }
    }

    #[test]
    fn check_config_parses_and_still_validates() {
        assert!(!parse(&["--decode=a:1"]).unwrap().check_config);
        let path = write("check.yaml", FULL);
        let cfg = parse(&[
            "--check-config",
            "--decode=http://a:8000",
            "--prefill=b:8000",
            &format!("--config={}", path.display()),
        ])
        .unwrap();
        assert!(cfg.check_config);
        assert_eq!(cfg.scheduling.threshold, 512);
        // A check that passes what a real start refuses would be worthless.
        let e = parse(&["--check-config", "--decode=a:1", "--no-such-flag"]).unwrap_err();
        assert!(e.contains("--no-such-flag"), "{e}");
        let e = parse(&["--check-config"]).unwrap_err();
        assert!(e.contains("decode endpoint"), "{e}");
        let e = parse(&["--check-config", "--decode=a:1", "--config=/no/such/file"]).unwrap_err();
        assert!(e.contains("--config"), "{e}");
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pd-router-cfg3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn endpoints_file_merges_with_flags() {
        let path = write(
            "endpoints.yaml",
            "decode:\n- url: http://d-0:8000\n  metricsUrl: http://d-0:8200/metrics\n- https://d-1:8000\n\
             prefill:\n- hostPort: p-0:8000\n  metricsUrl: https://p-0:9000/m\n- p-1:8000\n",
        );
        let p = path.to_str().unwrap();
        let cfg = parse(&["--decode=d-9:1", "--endpoints", p]).unwrap();
        let labels: Vec<_> = cfg.decode.iter().map(DecodeTarget::label).collect();
        assert_eq!(
            labels,
            ["http://d-9:1", "http://d-0:8000", "https://d-1:8000"]
        );
        assert_eq!(cfg.decode[1].metrics_uri(), "http://d-0:8200/metrics");
        assert_eq!(cfg.decode[2].metrics_uri(), "https://d-1:8000/metrics");
        let hp: Vec<_> = cfg.prefill.iter().map(PrefillTarget::label).collect();
        assert_eq!(hp, ["p-0:8000", "p-1:8000"]);
        assert_eq!(cfg.prefill[0].metrics_uri(), "https://p-0:9000/m");
        // The file alone is enough.
        assert_eq!(parse(&["--endpoints", p]).unwrap().decode.len(), 2);
        // A duplicate across flag and file.
        let e = parse(&["--decode=http://D-0:8000", "--endpoints", p]).unwrap_err();
        assert!(
            e.contains("decode endpoint d-0:8000 is listed twice"),
            "{e}"
        );
        let e = parse(&["--decode=a:1", "--prefill=p-1:8000", "--endpoints", p]).unwrap_err();
        assert!(
            e.contains("prefill endpoint p-1:8000 is listed twice"),
            "{e}"
        );
    }

    #[test]
    fn endpoints_file_errors_name_the_key() {
        let cases = [
            (
                "decoders: []\n",
                "unknown key \"decoders\" (supported: decode, prefill)",
            ),
            (
                "decode:\n- url: http://d:1\n  metricURL: x\n",
                "decode[0]: unknown key \"metricURL\" (supported: url, metricsUrl)",
            ),
            (
                "decode: [a:1]\nprefill:\n- {url: p:1}\n",
                "prefill[0]: unknown key \"url\" (supported: hostPort, metricsUrl)",
            ),
            (
                "decode:\n- metricsUrl: http://x:1/m\n",
                "decode[0]: \"url\" is required",
            ),
            ("decode:\n- url: http://d:1/v1\n", "decode[0].url"),
            ("decode: [a:1]\nprefill: [nohost]\n", "prefill[0].hostPort"),
            (
                "decode:\n- {url: a:1, metricsUrl: /metrics}\n",
                "decode[0].metricsUrl",
            ),
            ("decode: a:1\n", "decode: expected a list"),
            ("- a:1\n", "expected a mapping"),
            (
                "decode: [[1]]\n",
                "decode[0]: expected a string or a mapping",
            ),
        ];
        for (i, (yaml, expected)) in cases.iter().enumerate() {
            let path = write(&format!("bad-{i}.yaml"), yaml);
            let p = path.to_str().unwrap();
            let e = parse(&["--decode=z:9", "--endpoints", p]).unwrap_err();
            assert!(e.contains(&format!("--endpoints={p}")), "{e}");
            assert!(
                e.contains(expected),
                "{yaml:?}: expected {expected:?} in {e}"
            );
        }
        let e = parse(&["--endpoints", "/nonexistent/e.yaml"]).unwrap_err();
        assert!(e.contains("--endpoints=/nonexistent/e.yaml"), "{e}");
        let empty = write("empty.yaml", "");
        let e = parse(&["--endpoints", empty.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("at least one decode endpoint"), "{e}");
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
                authority: "10.0.0.1:8000".into(),
                metrics_url: None,
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
            parse_prefill("http://10.0.0.2:8000").unwrap().host_port,
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
        let hp: Vec<_> = cfg.prefill.iter().map(PrefillTarget::label).collect();
        assert_eq!(hp, ["p:1", "q:2"]);
        assert_eq!(cfg.decode[1].metrics_uri(), "http://b:2/metrics");
        assert_eq!(cfg.prefill[0].metrics_uri(), "http://p:1/metrics");
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
