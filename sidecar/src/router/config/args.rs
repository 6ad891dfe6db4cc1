//! `pd-router`'s flags as clap parses them (every one also reads `TANDEM_ROUTER_*`).

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};

use crate::config::parse_duration;

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

    /// Address the router binds: `::` is every interface, IPv6 and IPv4 (IPv4 only on a host
    /// without IPv6); `0.0.0.0` is IPv4 only.
    #[arg(long, env = "TANDEM_ROUTER_BIND", default_value = "::")]
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

    /// The model's HF tokenizer_config.json: its `chat_template` (a `chat_template.jinja`
    /// beside it wins) and special tokens turn chat messages into the text vLLM tokenizes, so
    /// chat token counts and prefix blocks are the engine's. Default: the tokenizer_config.json
    /// beside --tokenizer's file, if there is one.
    #[arg(
        long = "chat-template-config",
        env = "TANDEM_ROUTER_CHAT_TEMPLATE_CONFIG"
    )]
    pub chat_template_config: Option<PathBuf>,

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
