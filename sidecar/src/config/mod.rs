//! Command line and environment configuration of `pd-sidecar`.
//!
//! The flag surface is llm-d's routing sidecar (current and legacy names, the
//! `--flag=false` boolean form, zap logging flags) plus our own flags. Every flag
//! can also be set from the environment. `Args` is what clap parses; `Config` is
//! the validated, resolved form the server runs with. Nothing here opens sockets.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

mod args;
pub use args::Args;

/// KV connector protocols between the prefill and decode engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConnectorKind {
    /// vLLM NixlConnector, `kv_transfer_params` in the body (default).
    Nixlv2,
    /// Legacy NIXL v1: the transfer fields at the top level of the body.
    Nixl,
    /// Shared storage (LMCache and friends): prefill with token limits 1, then the original body.
    #[value(alias = "lmcache")]
    SharedStorage,
    /// SGLang bootstrap protocol: both legs concurrently.
    Sglang,
    /// vLLM MooncakeConnector: the prefill's engine id from its bootstrap
    /// server (`--mooncake-bootstrap-port`), both legs concurrently.
    Mooncake,
    /// vLLM OffloadingConnector's P2P tier: the decode engine pulls the
    /// prefill's KV by `kv_request_id` (`--p2p-connector-port`), both legs concurrently.
    Offloading,
}

impl ConnectorKind {
    /// Whether the engines can pull a cached prefix from a peer named by
    /// `x-kv-cache-source-host-port` (OffloadingConnector's P2P tier).
    pub fn p2p_pull(self, enable_p2p_pull: bool) -> bool {
        self == ConnectorKind::Offloading || (enable_p2p_pull && self == ConnectorKind::Nixlv2)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectorKind::Nixlv2 => "nixlv2",
            ConnectorKind::Nixl => "nixl",
            ConnectorKind::SharedStorage => "shared-storage",
            ConnectorKind::Sglang => "sglang",
            ConnectorKind::Mooncake => "mooncake",
            ConnectorKind::Offloading => "offloading",
        }
    }
}

/// What to do when the prefill leg cannot be completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrefillFailurePolicy {
    /// Serve the request with local prefill on the decode engine.
    Fallback,
    /// Relay the prefill error to the client.
    Fail,
}

const TLS_STAGES: [&str; 3] = ["prefiller", "decoder", "encoder"];

/// TLS settings of one upstream stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    pub enabled: bool,
    pub insecure_skip_verify: bool,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind: String,
    pub port: u16,
    pub decode_host: String,
    pub decode_port: u16,
    pub connector: ConnectorKind,
    pub secure_proxy: bool,
    pub cert_path: Option<PathBuf>,
    pub ssrf: Option<Ssrf>,
    pub prefiller_sampling: bool,
    pub data_parallel_size: u16,
    pub prefill_max_retries: u32,
    pub prefill_retry_backoff: Duration,
    pub prefill_threshold_tokens: u64,
    pub tokenizer: Option<PathBuf>,
    pub on_prefill_failure: PrefillFailurePolicy,
    pub trust_client_kv_transfer_params: bool,
    pub prefill_timeout: Duration,
    pub max_body_bytes: usize,
    pub metrics_port: u16,
    pub upstream_idle_timeout: Duration,
    pub max_idle_conns_per_host: usize,
    pub shutdown_grace_period: Duration,
    pub sglang_bootstrap_port: u16,
    /// Port of the prefill pods' Mooncake bootstrap server (`GET /query`).
    pub mooncake_bootstrap_port: u16,
    /// Rank 0's OffloadingConnector P2P port on every engine; rank r uses port + r.
    pub p2p_connector_port: u16,
    /// The engines run MultiConnector(NixlConnector + OffloadingConnector):
    /// `x-kv-cache-source-host-port` is honoured with nixlv2.
    pub enable_p2p_pull: bool,
    pub worker_threads: usize,
    pub prefiller_tls: UpstreamTls,
    pub decoder_tls: UpstreamTls,
    pub log_filter: String,
    pub log_json: bool,
    /// `--tracing`: OpenTelemetry spans over OTLP gRPC (`telemetry.rs`).
    pub tracing: bool,
    /// `--check-config`: validate, print this configuration and exit; never serve.
    pub check_config: bool,
}

pub use crate::allow::Allowlist;

/// SSRF protection (`--enable-ssrf-protection`): static entries and the
/// InferencePool whose ready pods are allowed.
#[derive(Clone, Debug)]
pub struct Ssrf {
    pub static_list: Allowlist,
    pub pool: Option<crate::pool::PoolSource>,
}

/// Splits `host:port` (IPv6 in brackets) and checks the port is a number.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
        return None;
    }
    Some((host, port.parse().ok()?))
}

/// Parses Go-style durations (`500ms`, `2s`, `1m30s`, `1h`) and bare seconds (`2`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|e| format!("invalid duration {s:?}: {e}"));
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("invalid duration {s:?}: missing unit (ms, s, m, h)"))?;
        let value: f64 = rest[..num_end]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}"))?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Maps zap/klog verbosity to a tracing filter. RUST_LOG, when set, wins.
fn log_filter(args: &Args) -> String {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        if !filter.is_empty() {
            return filter;
        }
    }
    let level = match (args.zap_log_level.as_deref(), args.verbosity) {
        (Some(level), _) => match level.to_ascii_lowercase().as_str() {
            "debug" => "debug",
            "info" => "info",
            "warn" | "warning" => "warn",
            "error" | "dpanic" | "panic" | "fatal" => "error",
            n => match n.parse::<u8>() {
                Ok(v) if v >= 5 => "trace",
                Ok(v) if v >= 4 => "debug",
                _ => "info",
            },
        },
        (None, Some(v)) if v >= 5 => "trace",
        (None, Some(v)) if v >= 4 => "debug",
        _ if args.zap_devel => "debug",
        _ => "info",
    };
    format!("{level},hyper=warn,hyper_util=warn,rustls=warn")
}

fn stages(list: &[String], flag: &str) -> Result<HashSet<String>, String> {
    let mut out = HashSet::new();
    for stage in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if !TLS_STAGES.contains(&stage) {
            return Err(format!(
                "{flag}: unknown stage {stage:?}; expected one of {}",
                TLS_STAGES.join(", ")
            ));
        }
        out.insert(stage.to_string());
    }
    Ok(out)
}

impl Config {
    /// Resolves legacy flags and checks values; the error names the flag.
    pub fn from_args(args: Args) -> Result<Config, String> {
        let connector = match (args.kv_connector, args.connector) {
            (Some(kv), Some(legacy)) if kv != legacy => {
                return Err(format!(
                    "--kv-connector={} and the deprecated --connector={} disagree; pass one",
                    kv.as_str(),
                    legacy.as_str()
                ))
            }
            (Some(kv), _) => kv,
            (None, Some(legacy)) => legacy,
            (None, None) => ConnectorKind::Nixlv2,
        };
        if !args.ec_connector.is_empty() {
            return Err(format!(
                "--ec-connector={}: encoder disaggregation is not supported by pd-sidecar; leave it empty",
                args.ec_connector
            ));
        }
        if args.data_parallel_size == 0 {
            return Err("--data-parallel-size must be at least 1".into());
        }
        if u32::from(args.port) + u32::from(args.data_parallel_size) - 1 > u32::from(u16::MAX)
            || u32::from(args.model_server_port) + u32::from(args.data_parallel_size) - 1
                > u32::from(u16::MAX)
        {
            return Err("--data-parallel-size: port + size exceeds 65535".into());
        }
        if args.mooncake_bootstrap_port == 0 {
            return Err("--mooncake-bootstrap-port must be between 1 and 65535".into());
        }
        if args.p2p_connector_port == 0 {
            return Err("--p2p-connector-port must be between 1 and 65535".into());
        }
        // The port given to an engine is offset by its data-parallel rank.
        if u32::from(args.p2p_connector_port) + u32::from(args.data_parallel_size) - 1
            > u32::from(u16::MAX)
        {
            return Err(format!(
                "--p2p-connector-port {} plus data-parallel rank {} exceeds 65535",
                args.p2p_connector_port,
                args.data_parallel_size - 1
            ));
        }
        // The P2P tier comes with offloading; with NIXL it is MultiConnector's
        // second half, which only this flag declares.
        if args.enable_p2p_pull && connector != ConnectorKind::Nixlv2 {
            return Err(format!(
                "--enable-p2p-pull requires --kv-connector=nixlv2 (got {:?}); offloading has the P2P tier without it",
                connector.as_str()
            ));
        }
        if args.max_body_bytes == 0 {
            return Err("--max-body-bytes must be greater than 0".into());
        }
        if args.prefill_timeout.is_zero() {
            return Err("--prefill-timeout must be greater than 0".into());
        }
        if let Some(pool) = &args.inference_pool {
            let parts: Vec<&str> = pool.split('/').collect();
            if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(format!(
                    "--inference-pool={pool:?}: expected 'namespace/name' or 'name'"
                ));
            }
        }
        // A --cert-path without its files is not an error: the Secret may be
        // mounted after start (KServe); a self-signed certificate serves until
        // the files appear (tls::CertStore).
        if let Some(dir) = &args.cert_path {
            if dir.exists() && !dir.is_dir() {
                return Err(format!("--cert-path={}: not a directory", dir.display()));
            }
        }
        if let Some(path) = &args.tokenizer {
            if !path.is_file() {
                return Err(format!("--tokenizer={}: no such file", path.display()));
            }
        }
        let mut tls = stages(&args.enable_tls, "--enable-tls")?;
        let mut skip = stages(&args.tls_insecure_skip_verify, "--tls-insecure-skip-verify")?;
        if args.prefiller_use_tls {
            tls.insert("prefiller".into());
        }
        if args.decoder_use_tls {
            tls.insert("decoder".into());
        }
        if args.prefiller_tls_insecure_skip_verify {
            skip.insert("prefiller".into());
        }
        if args.decoder_tls_insecure_skip_verify {
            skip.insert("decoder".into());
        }
        let stage_tls = |stage: &str| UpstreamTls {
            enabled: tls.contains(stage),
            insecure_skip_verify: skip.contains(stage),
        };
        let ssrf = if args.enable_ssrf_protection {
            let static_list = Allowlist::parse(&args.prefill_allowlist)?;
            // --inference-pool, or the deprecated name + namespace pair.
            let pool_arg = args.inference_pool.clone().or_else(|| {
                args.inference_pool_name
                    .as_ref()
                    .map(|n| match &args.inference_pool_namespace {
                        Some(ns) => format!("{ns}/{n}"),
                        None => n.clone(),
                    })
            });
            let pool = match (pool_arg, &args.prefill_pod_selector) {
                (Some(_), Some(_)) => {
                    return Err(
                        "--inference-pool and --prefill-pod-selector: give one of them".into(),
                    )
                }
                (Some(p), None) => {
                    Some(crate::pool::PoolSource::Pool(crate::pool::PoolRef::parse(
                        &p,
                        args.inference_pool_namespace.as_deref(),
                        &args.pool_group,
                    )?))
                }
                (None, Some(sel)) => Some(crate::pool::PoolSource::selector(
                    sel,
                    &args.prefill_pod_ports,
                    args.inference_pool_namespace.as_deref(),
                )?),
                (None, None) => None,
            };
            if static_list.is_empty() && pool.is_none() {
                return Err(
                    "--enable-ssrf-protection needs --inference-pool (its ready pods are allowed), \
                     --prefill-pod-selector or --prefill-allowlist (host, host:port, CIDR, port ranges)"
                        .into(),
                );
            }
            Some(Ssrf { static_list, pool })
        } else {
            None
        };
        let log_json = match args.zap_encoder.as_deref() {
            Some("console") => false,
            Some("json") | None => !args.zap_devel,
            Some(other) => return Err(format!("--zap-encoder={other}: expected json or console")),
        };
        Ok(Config {
            log_filter: log_filter(&args),
            log_json,
            tracing: args.tracing,
            check_config: args.check_config,
            bind: args.bind,
            port: args.port,
            decode_host: args.model_server_host,
            decode_port: args.model_server_port,
            connector,
            secure_proxy: args.secure_proxy,
            cert_path: args.cert_path,
            ssrf,
            prefiller_sampling: args.enable_prefiller_sampling,
            data_parallel_size: args.data_parallel_size,
            prefill_max_retries: args.prefill_max_retries,
            prefill_retry_backoff: args.prefill_retry_backoff,
            prefill_threshold_tokens: args.prefill_threshold_tokens,
            tokenizer: args.tokenizer,
            on_prefill_failure: args.on_prefill_failure,
            trust_client_kv_transfer_params: args.trust_client_kv_transfer_params,
            prefill_timeout: args.prefill_timeout,
            max_body_bytes: args.max_body_bytes,
            metrics_port: args.metrics_port,
            upstream_idle_timeout: args.upstream_idle_timeout,
            max_idle_conns_per_host: args.max_idle_conns_per_host,
            shutdown_grace_period: args.shutdown_grace_period,
            sglang_bootstrap_port: args.sglang_bootstrap_port,
            mooncake_bootstrap_port: args.mooncake_bootstrap_port,
            p2p_connector_port: args.p2p_connector_port,
            enable_p2p_pull: args.enable_p2p_pull,
            worker_threads: args.worker_threads,
            prefiller_tls: stage_tls("prefiller"),
            decoder_tls: stage_tls("decoder"),
        })
    }

    /// Parses argv (program name first) into a validated config.
    pub fn parse_from<I, T>(argv: I) -> Result<Config, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = argv.into_iter().map(Into::into).collect();
        let argv = crate::configuration::expand(argv)?;
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        Config::from_args(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::parse_from(std::iter::once("pd-sidecar").chain(args.iter().copied()))
    }

    #[test]
    fn mooncake_offloading_and_p2p_pull_flags() {
        let cfg = parse(&["--kv-connector=mooncake"]).unwrap();
        assert_eq!(cfg.connector, ConnectorKind::Mooncake);
        assert_eq!(cfg.mooncake_bootstrap_port, 8998);
        assert_eq!(cfg.p2p_connector_port, 7777);
        assert!(!cfg.connector.p2p_pull(cfg.enable_p2p_pull));
        let cfg = parse(&["--kv-connector=offloading", "--p2p-connector-port=9000"]).unwrap();
        assert_eq!(cfg.p2p_connector_port, 9000);
        assert!(cfg.connector.p2p_pull(cfg.enable_p2p_pull));
        let cfg = parse(&["--enable-p2p-pull"]).unwrap();
        assert!(cfg.connector.p2p_pull(cfg.enable_p2p_pull));
        for bad in [
            &["--enable-p2p-pull", "--kv-connector=offloading"][..],
            &["--enable-p2p-pull", "--kv-connector=sglang"],
            &["--mooncake-bootstrap-port=0"],
            &["--p2p-connector-port=65535", "--data-parallel-size=2"],
            &["--kv-connector=mooncake2"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse(&["--enable-p2p-pull", "--kv-connector=offloading"])
            .unwrap_err()
            .contains("requires --kv-connector=nixlv2"));
    }

    #[test]
    fn modelservice_legacy_flags_parse() {
        let cfg = parse(&[
            "--port=8000",
            "--vllm-port=8200",
            "--connector=nixlv2",
            "--secure-proxy=false",
        ])
        .unwrap();
        assert_eq!(cfg.port, 8000);
        assert_eq!(cfg.decode_port, 8200);
        assert_eq!(cfg.connector, ConnectorKind::Nixlv2);
        assert!(!cfg.secure_proxy);
    }

    #[test]
    fn check_config_parses_and_still_validates() {
        assert!(!parse(&[]).unwrap().check_config);
        let cfg = parse(&["--check-config", "--port=8000", "--vllm-port=8200"]).unwrap();
        assert!(cfg.check_config);
        assert_eq!((cfg.port, cfg.decode_port), (8000, 8200));
        assert!(!parse(&["--check-config=false"]).unwrap().check_config);
        // A check that passes what a real start refuses would be worthless.
        let err = parse(&["--check-config", "--no-such-flag=1"]).unwrap_err();
        assert!(err.contains("--no-such-flag"), "{err}");
        assert!(parse(&["--check-config", "--data-parallel-size=0"])
            .unwrap_err()
            .contains("--data-parallel-size"));
    }

    #[test]
    fn defaults_match_llm_d() {
        let cfg = parse(&[]).unwrap();
        assert_eq!((cfg.port, cfg.decode_port), (8000, 8200));
        assert!(cfg.secure_proxy);
        assert_eq!(cfg.connector, ConnectorKind::Nixlv2);
        assert_eq!(cfg.prefill_threshold_tokens, 256);
        assert_eq!(cfg.on_prefill_failure, PrefillFailurePolicy::Fallback);
        assert_eq!(cfg.metrics_port, 9090);
        assert!(cfg.upstream_idle_timeout < Duration::from_secs(5));
    }

    #[test]
    fn lmcache_is_an_alias_of_shared_storage() {
        assert_eq!(
            parse(&["--kv-connector", "lmcache"]).unwrap().connector,
            ConnectorKind::SharedStorage
        );
    }

    #[test]
    fn unknown_flag_is_an_error_naming_it() {
        let err = parse(&["--no-such-flag=1"]).unwrap_err();
        assert!(err.contains("--no-such-flag"), "{err}");
    }

    #[test]
    fn bad_connector_names_the_choices() {
        let err = parse(&["--kv-connector=foo"]).unwrap_err();
        assert!(err.contains("nixlv2") && err.contains("sglang"), "{err}");
    }

    #[test]
    fn legacy_tls_flags_map_to_stages() {
        let cfg = parse(&[
            "--prefiller-use-tls",
            "--decoder-tls-insecure-skip-verify=true",
        ])
        .unwrap();
        assert!(cfg.prefiller_tls.enabled && !cfg.prefiller_tls.insecure_skip_verify);
        assert!(!cfg.decoder_tls.enabled && cfg.decoder_tls.insecure_skip_verify);
        let cfg = parse(&[
            "--enable-tls=prefiller,decoder",
            "--tls-insecure-skip-verify",
            "prefiller",
        ])
        .unwrap();
        assert!(
            cfg.prefiller_tls.enabled
                && cfg.decoder_tls.enabled
                && cfg.prefiller_tls.insecure_skip_verify
        );
        assert!(parse(&["--enable-tls=bogus"])
            .unwrap_err()
            .contains("--enable-tls"));
    }

    #[test]
    fn repeated_flag_last_wins() {
        let cfg = parse(&[
            "--prefill-threshold-tokens=0",
            "--prefill-threshold-tokens=256",
        ])
        .unwrap();
        assert_eq!(cfg.prefill_threshold_tokens, 256);
    }

    #[test]
    fn durations_go_style() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse(&["--prefill-timeout=abc"])
            .unwrap_err()
            .contains("--prefill-timeout"));
    }

    #[test]
    fn ssrf_protection_needs_a_pool_or_a_list() {
        let err = parse(&["--enable-ssrf-protection"]).unwrap_err();
        assert!(
            err.contains("--inference-pool") && err.contains("--prefill-allowlist"),
            "{err}"
        );
        assert!(parse(&[
            "--enable-ssrf-protection",
            "--prefill-allowlist=10.0.0.0/33"
        ])
        .unwrap_err()
        .contains("10.0.0.0/33"));
        let cfg = parse(&[
            "--enable-ssrf-protection=true",
            "--pool-group=inference.networking.x-k8s.io",
            "--inference-pool=ns/pool",
        ])
        .unwrap();
        let Some(crate::pool::PoolSource::Pool(pool)) = cfg.ssrf.unwrap().pool else {
            panic!("no pool")
        };
        assert_eq!(
            (pool.namespace.as_str(), pool.version()),
            ("ns", "v1alpha2")
        );
        let cfg = parse(&[
            "--enable-ssrf-protection",
            "--prefill-pod-selector=app=x,role=prefill",
            "--prefill-pod-ports=8000,8001",
            "--inference-pool-namespace=llm",
        ])
        .unwrap();
        let Some(crate::pool::PoolSource::Selector { namespace, spec }) = cfg.ssrf.unwrap().pool
        else {
            panic!("no selector")
        };
        assert_eq!(namespace, "llm");
        assert_eq!(spec.ports, vec![8000, 8001]);
        assert_eq!(spec.label_selector().unwrap(), "app=x,role=prefill");
        for bad in [
            &["--prefill-pod-selector=app=x"][..],
            &["--prefill-pod-selector=app", "--prefill-pod-ports=1"],
            &[
                "--prefill-pod-selector=app=x",
                "--prefill-pod-ports=1",
                "--inference-pool=a/b",
            ],
        ] {
            let mut args = vec!["--enable-ssrf-protection", "--inference-pool-namespace=llm"];
            args.extend_from_slice(bad);
            assert!(parse(&args).is_err(), "{bad:?}");
        }
        assert!(parse(&[
            "--enable-ssrf-protection",
            "--pool-group=example.com",
            "--inference-pool=ns/p"
        ])
        .unwrap_err()
        .contains("--pool-group"));
        // Without protection the pool flags are accepted and unused, as llm-d does.
        assert!(parse(&["--inference-pool=ns/p"]).unwrap().ssrf.is_none());
    }

    #[test]
    fn zap_levels_map_to_tracing() {
        std::env::remove_var("RUST_LOG");
        assert!(parse(&["--zap-log-level=debug"])
            .unwrap()
            .log_filter
            .starts_with("debug"));
        assert!(parse(&["--zap-log-level=5"])
            .unwrap()
            .log_filter
            .starts_with("trace"));
        assert!(!parse(&["--zap-encoder=console"]).unwrap().log_json);
    }

    #[test]
    fn conflicting_connectors_rejected() {
        assert!(parse(&["--kv-connector=nixlv2", "--connector=sglang"]).is_err());
        assert!(parse(&["--ec-connector=nixl"])
            .unwrap_err()
            .contains("--ec-connector"));
    }
}
