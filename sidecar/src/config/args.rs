//! `pd-sidecar`'s flags as clap parses them: llm-d's names (current and
//! legacy), each with its environment variable. Validation lives in
//! [`super::Config::from_args`].

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};

use super::{parse_duration, ConnectorKind, PrefillFailurePolicy};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "pd-sidecar",
    version,
    about = "Prefill/decode routing sidecar for vLLM decode pods (drop-in for llm-d's routing sidecar)",
    // Like Go's pflag: a repeated flag overrides the earlier value.
    args_override_self = true
)]
pub struct Args {
    /// Port the sidecar listens on.
    #[arg(long, env = "PD_SIDECAR_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Address the sidecar binds: `::` is every interface, IPv6 and IPv4 (IPv4 only on a host
    /// without IPv6); `0.0.0.0` is IPv4 only.
    #[arg(long, env = "PD_SIDECAR_BIND", default_value = "::")]
    pub bind: String,

    /// Port of the local decode engine (vLLM).
    #[arg(
        long = "model-server-port",
        alias = "vllm-port",
        env = "PD_SIDECAR_MODEL_SERVER_PORT",
        default_value_t = 8200
    )]
    pub model_server_port: u16,

    /// Host of the local decode engine.
    #[arg(
        long = "model-server-host",
        env = "PD_SIDECAR_MODEL_SERVER_HOST",
        default_value = "127.0.0.1"
    )]
    pub model_server_host: String,

    /// KV connector protocol: nixlv2, nixl, shared-storage (alias lmcache), sglang, mooncake,
    /// offloading.
    #[arg(long = "kv-connector", env = "PD_SIDECAR_KV_CONNECTOR", value_enum)]
    pub kv_connector: Option<ConnectorKind>,

    /// Deprecated name of --kv-connector (still passed by llm-d-modelservice).
    #[arg(
        long = "connector",
        env = "PD_SIDECAR_CONNECTOR",
        value_enum,
        hide = true
    )]
    pub connector: Option<ConnectorKind>,

    /// Encoder connector for E/P/D; not supported (empty = no encoder stage).
    #[arg(
        long = "ec-connector",
        env = "PD_SIDECAR_EC_CONNECTOR",
        default_value = ""
    )]
    pub ec_connector: String,

    /// Serve TLS on --port.
    #[arg(long = "secure-proxy", env = "PD_SIDECAR_SECURE_PROXY", default_value_t = true,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub secure_proxy: bool,

    /// Directory with tls.crt and tls.key, watched for new files (a renewed
    /// Secret); without it, or until the files appear, a self-signed
    /// certificate is served.
    #[arg(long = "cert-path", env = "PD_SIDECAR_CERT_PATH")]
    pub cert_path: Option<PathBuf>,

    /// Allow remote prefill only to targets on the allow-list (--prefill-allowlist).
    #[arg(long = "enable-ssrf-protection", env = "PD_SIDECAR_ENABLE_SSRF_PROTECTION", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub enable_ssrf_protection: bool,

    /// Allowed prefill targets: `host:port` (that port only) or `host` (any port), comma separated.
    #[arg(
        long = "prefill-allowlist",
        env = "PD_SIDECAR_PREFILL_ALLOWLIST",
        value_delimiter = ','
    )]
    pub prefill_allowlist: Vec<String>,

    /// With SSRF protection: prefill pods allowed by label selector
    /// (`k=v,k2=v2`) in the pod's namespace, without an InferencePool (e.g.
    /// the prefill Service's selector); their ready IPs on --prefill-pod-ports.
    #[arg(long = "prefill-pod-selector", env = "PD_SIDECAR_PREFILL_POD_SELECTOR")]
    pub prefill_pod_selector: Option<String>,

    /// Ports of the pods --prefill-pod-selector picks, comma separated.
    #[arg(
        long = "prefill-pod-ports",
        env = "PD_SIDECAR_PREFILL_POD_PORTS",
        value_delimiter = ','
    )]
    pub prefill_pod_ports: Vec<u16>,

    /// InferencePool as namespace/name or name (llm-d compatibility).
    #[arg(long = "inference-pool", env = "INFERENCE_POOL")]
    pub inference_pool: Option<String>,

    /// Deprecated: namespace of the InferencePool.
    #[arg(
        long = "inference-pool-namespace",
        env = "INFERENCE_POOL_NAMESPACE",
        hide = true
    )]
    pub inference_pool_namespace: Option<String>,

    /// Deprecated: name of the InferencePool.
    #[arg(long = "inference-pool-name", env = "INFERENCE_POOL_NAME", hide = true)]
    pub inference_pool_name: Option<String>,

    /// API group of the InferencePool (llm-d compatibility).
    #[arg(
        long = "pool-group",
        env = "PD_SIDECAR_POOL_GROUP",
        default_value = "inference.networking.k8s.io"
    )]
    pub pool_group: String,

    /// Pick a random prefill target from the header's list instead of the first.
    #[arg(long = "enable-prefiller-sampling", env = "ENABLE_PREFILLER_SAMPLING", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub enable_prefiller_sampling: bool,

    /// vLLM data-parallel size: ranks 1..N-1 get listeners on port+rank forwarding to model-server-port+rank.
    #[arg(
        long = "data-parallel-size",
        env = "PD_SIDECAR_DATA_PARALLEL_SIZE",
        default_value_t = 1
    )]
    pub data_parallel_size: u16,

    /// Retries of a prefill that failed with 502/503/504 or a connection error.
    #[arg(
        long = "prefill-max-retries",
        env = "PD_SIDECAR_PREFILL_MAX_RETRIES",
        default_value_t = 2
    )]
    pub prefill_max_retries: u32,

    /// First retry backoff (doubles per retry, with jitter), e.g. 200ms.
    #[arg(long = "prefill-retry-backoff", env = "PD_SIDECAR_PREFILL_RETRY_BACKOFF", default_value = "200ms", value_parser = parse_duration)]
    pub prefill_retry_backoff: Duration,

    /// Prefill below this many tokens stays local; 0 = always remote when a prefiller is named.
    #[arg(
        long = "prefill-threshold-tokens",
        env = "PD_SIDECAR_PREFILL_THRESHOLD_TOKENS",
        default_value_t = 256
    )]
    pub prefill_threshold_tokens: u64,

    /// tokenizer.json for exact token counts (default: estimate 4 bytes per token).
    #[arg(long, env = "PD_SIDECAR_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

    /// On prefill failure: fallback (serve with local prefill) or fail (relay the error).
    #[arg(
        long = "on-prefill-failure",
        env = "PD_SIDECAR_ON_PREFILL_FAILURE",
        value_enum,
        default_value = "fallback"
    )]
    pub on_prefill_failure: PrefillFailurePolicy,

    /// Pass client-sent kv_transfer_params (and the connector's other
    /// transfer fields) to the engine instead of removing them. Only for a
    /// sidecar in front of a PREFILL engine whose clients are other sidecars
    /// (TLS termination): whoever reaches this port can then steer the
    /// engine's KV transfers.
    #[arg(
        long = "trust-client-kv-transfer-params",
        env = "PD_SIDECAR_TRUST_CLIENT_KV_TRANSFER_PARAMS",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = ArgAction::Set
    )]
    pub trust_client_kv_transfer_params: bool,

    /// Deadline for one prefill attempt (headers and body), e.g. 30s.
    #[arg(long = "prefill-timeout", env = "PD_SIDECAR_PREFILL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub prefill_timeout: Duration,

    /// Largest request body accepted on the P/D routes; larger gets 413.
    #[arg(long = "max-body-bytes", env = "PD_SIDECAR_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Port of the Prometheus /metrics listener; 0 = off.
    #[arg(
        long = "metrics-port",
        env = "PD_SIDECAR_METRICS_PORT",
        default_value_t = 9090
    )]
    pub metrics_port: u16,

    /// Idle keep-alive of upstream connections; keep it below the engine's (uvicorn: 5s).
    #[arg(long = "upstream-idle-timeout", env = "PD_SIDECAR_UPSTREAM_IDLE_TIMEOUT", default_value = "4s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Max idle keep-alive connections per upstream host.
    #[arg(
        long = "max-idle-conns-per-host",
        env = "PD_SIDECAR_MAX_IDLE_CONNS_PER_HOST",
        default_value_t = 1024
    )]
    pub max_idle_conns_per_host: usize,

    /// Time in-flight requests get to finish after SIGTERM.
    #[arg(long = "shutdown-grace-period", env = "PD_SIDECAR_SHUTDOWN_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace_period: Duration,

    /// Runtime worker threads; 0 = one per CPU.
    #[arg(
        long = "worker-threads",
        env = "PD_SIDECAR_WORKER_THREADS",
        default_value_t = 0
    )]
    pub worker_threads: usize,

    /// SGLang bootstrap port injected into both legs.
    #[arg(
        long = "sglang-bootstrap-port",
        env = "SGLANG_BOOTSTRAP_PORT",
        default_value_t = 8998
    )]
    pub sglang_bootstrap_port: u16,

    /// Port of the Mooncake bootstrap server on prefill pods (--kv-connector=mooncake).
    #[arg(
        long = "mooncake-bootstrap-port",
        env = "MOONCAKE_BOOTSTRAP_PORT",
        default_value_t = 8998
    )]
    pub mooncake_bootstrap_port: u16,

    /// The prefill engines' OffloadingConnector P2P port, sent as remote_port to the decode
    /// engine; with --data-parallel-size > 1 it is rank 0's and rank r uses port + r
    /// (--kv-connector=offloading or --enable-p2p-pull).
    #[arg(
        long = "p2p-connector-port",
        env = "P2P_CONNECTOR_PORT",
        default_value_t = 7777
    )]
    pub p2p_connector_port: u16,

    /// The engines run MultiConnector(NixlConnector + OffloadingConnector): honour
    /// x-kv-cache-source-host-port with --kv-connector=nixlv2.
    #[arg(long = "enable-p2p-pull", env = "PD_SIDECAR_ENABLE_P2P_PULL", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub enable_p2p_pull: bool,

    /// Stages that use TLS upstream: prefiller, decoder, encoder (comma list or repeated).
    #[arg(
        long = "enable-tls",
        env = "PD_SIDECAR_ENABLE_TLS",
        value_delimiter = ','
    )]
    pub enable_tls: Vec<String>,

    /// Stages whose upstream certificate is not verified.
    #[arg(
        long = "tls-insecure-skip-verify",
        env = "PD_SIDECAR_TLS_INSECURE_SKIP_VERIFY",
        value_delimiter = ','
    )]
    pub tls_insecure_skip_verify: Vec<String>,

    /// Deprecated: --enable-tls=prefiller.
    #[arg(long = "prefiller-use-tls", env = "PD_SIDECAR_PREFILLER_USE_TLS", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), hide = true)]
    pub prefiller_use_tls: bool,

    /// Deprecated: --enable-tls=decoder.
    #[arg(long = "decoder-use-tls", env = "PD_SIDECAR_DECODER_USE_TLS", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), hide = true)]
    pub decoder_use_tls: bool,

    /// Deprecated: --tls-insecure-skip-verify=prefiller.
    #[arg(long = "prefiller-tls-insecure-skip-verify", env = "PD_SIDECAR_PREFILLER_TLS_INSECURE_SKIP_VERIFY",
          default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), hide = true)]
    pub prefiller_tls_insecure_skip_verify: bool,

    /// Deprecated: --tls-insecure-skip-verify=decoder.
    #[arg(long = "decoder-tls-insecure-skip-verify", env = "PD_SIDECAR_DECODER_TLS_INSECURE_SKIP_VERIFY",
          default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), hide = true)]
    pub decoder_tls_insecure_skip_verify: bool,

    /// Chunked decode token budget (llm-d); accepted, only 0 (off) is implemented.
    #[arg(
        long = "decode-chunk-size",
        env = "PD_SIDECAR_DECODE_CHUNK_SIZE",
        default_value_t = 0
    )]
    pub decode_chunk_size: u32,

    /// OpenTelemetry traces over OTLP gRPC (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME,
    /// OTEL_TRACES_SAMPLER, ...); off, the client's traceparent still goes to both legs.
    #[arg(long = "tracing", env = "PD_SIDECAR_TRACING", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub tracing: bool,

    /// zap log level (debug, info, error, or a verbosity number); mapped to tracing levels.
    #[arg(long = "zap-log-level", env = "PD_SIDECAR_ZAP_LOG_LEVEL")]
    pub zap_log_level: Option<String>,

    /// zap development mode (debug level, text output).
    #[arg(long = "zap-devel", env = "PD_SIDECAR_ZAP_DEVEL", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub zap_devel: bool,

    /// zap encoder: json or console.
    #[arg(long = "zap-encoder", env = "PD_SIDECAR_ZAP_ENCODER")]
    pub zap_encoder: Option<String>,

    /// zap stacktrace level (accepted, no effect).
    #[arg(long = "zap-stacktrace-level", env = "PD_SIDECAR_ZAP_STACKTRACE_LEVEL")]
    pub zap_stacktrace_level: Option<String>,

    /// zap time encoding (accepted, no effect).
    #[arg(long = "zap-time-encoding", env = "PD_SIDECAR_ZAP_TIME_ENCODING")]
    pub zap_time_encoding: Option<String>,

    /// klog verbosity (accepted; 4 = debug, 5+ = trace).
    #[arg(short = 'v', long = "v", env = "PD_SIDECAR_V")]
    pub verbosity: Option<u8>,

    /// Parse and validate every flag, print the effective configuration and exit (0; 2 on bad
    /// input) without binding any port.
    // No environment variable on purpose: a stray one would turn a serving container into one
    // that exits at once.
    #[arg(long = "check-config", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub check_config: bool,
}
