//! Command line, environment and YAML configuration of `pd-router`.
//!
//! `Args` is what clap parses (every flag also reads `TANDEM_ROUTER_*`);
//! [`RouterConfig`] is the validated form the server runs with. The scheduling
//! part comes from a YAML file in the shape of llm-d's `EndpointPickerConfig`
//! (plugins, then scheduling profiles that reference them) or from a built-in
//! default. The endpoints come from flags and/or an endpoints YAML file, read
//! once at start. Anything the router cannot honour is a start-up error naming
//! the key or plugin: a config is never half applied. Nothing here opens sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

mod args;
mod endpoints;
mod plugins;
mod precise;
mod scheduling;

pub use args::Args;
pub use endpoints::*;
pub use plugins::ROLE_LABEL;
pub use precise::*;
pub use scheduling::*;

use super::breaker::BreakerConfig;
use super::chat::{ChatTemplate, ChatTokenizer};
use super::probe::ProbeConfig;

/// A loaded tokenizer.json and the model's chat template, shared by every request.
#[derive(Clone)]
pub struct Tokenizer {
    pub path: PathBuf,
    /// Derefs to the `tokenizers::Tokenizer`.
    pub inner: Arc<ChatTokenizer>,
}

impl Tokenizer {
    /// `chat_template_config`: a tokenizer_config.json that must hold a chat template; None:
    /// the one beside `path` (or a `chat_template.jinja` there), if any. A template that does
    /// not compile is an error here.
    pub fn load(path: &Path, chat_template_config: Option<&Path>) -> Result<Tokenizer, String> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| format!("--tokenizer={}: {e}", path.display()))?;
        let template = match chat_template_config {
            Some(config) => {
                let flag = format!("--chat-template-config={}", config.display());
                let t = ChatTemplate::from_config(config).map_err(|e| format!("{flag}: {e}"))?;
                Some(t.ok_or_else(|| {
                    format!("{flag}: no chat_template in it (nor a chat_template.jinja beside it)")
                })?)
            }
            None => {
                let beside = path.with_file_name("tokenizer_config.json");
                let jinja = path.with_file_name("chat_template.jinja");
                let found = if beside.is_file() {
                    ChatTemplate::from_config(&beside)
                } else if jinja.is_file() {
                    std::fs::read_to_string(&jinja)
                        .map_err(|e| format!("{}: {e}", jinja.display()))
                        .and_then(|t| ChatTemplate::new(t, Vec::new(), jinja.clone()).map(Some))
                } else {
                    Ok(None)
                };
                found.map_err(|e| {
                    format!(
                        "--tokenizer={}: the chat template beside it: {e} (give a working one with \
                         --chat-template-config)",
                        path.display()
                    )
                })?
            }
        };
        Ok(Tokenizer {
            path: path.to_path_buf(),
            inner: Arc::new(ChatTokenizer {
                tokenizer,
                template,
            }),
        })
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner.template {
            Some(t) => write!(f, "Tokenizer({}, {t:?})", self.path.display()),
            None => write!(f, "Tokenizer({}, no chat template)", self.path.display()),
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
    /// Loaded from `--tokenizer` (and `--chat-template-config`); `None` estimates 4 bytes
    /// per token.
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
        let tokenizer = match (&args.tokenizer, &args.chat_template_config) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(
                    "--chat-template-config needs --tokenizer (the rendered chat is tokenized)"
                        .into(),
                )
            }
            (Some(path), config) => Some(Tokenizer::load(path, config.as_deref())?),
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

#[cfg(test)]
mod tests;
