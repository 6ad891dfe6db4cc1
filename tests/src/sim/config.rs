//! Command-line configuration of the engine simulator. Every flag can also be set through the
//! environment as `ENGINE_SIM_<NAME>` (e.g. `ENGINE_SIM_TTFT_MS=50`).

use clap::Parser;
use sidecar::kv_events::{Encoding, HashForm, KvEventsConfig};

use super::faults::{FaultConfig, FaultScope};
use super::pd::KvParamsShape;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "engine-sim",
    version,
    about = "A stand-in vLLM engine: OpenAI API plus the P/D kv_transfer_params protocol",
    // A flag given twice takes its last value: a launcher adds per-role flags after common ones.
    args_override_self = true
)]
pub struct Config {
    /// Address to listen on; also returned to decode engines as `remote_host`.
    #[arg(long, env = "ENGINE_SIM_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// HTTP port (0 picks a free one).
    #[arg(long, env = "ENGINE_SIM_PORT", default_value_t = 8200)]
    pub port: u16,

    /// Served model name.
    #[arg(long, env = "ENGINE_SIM_MODEL", default_value = "sim-model")]
    pub model: String,

    /// Engine id returned as `remote_engine_id` (default: a random uuid).
    #[arg(long, env = "ENGINE_SIM_ENGINE_ID")]
    pub engine_id: Option<String>,

    /// Tokens per KV block.
    #[arg(long, env = "ENGINE_SIM_BLOCK_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub block_size: u64,

    /// Number of KV blocks in the pool.
    #[arg(long, env = "ENGINE_SIM_NUM_BLOCKS", default_value_t = 16384,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub num_blocks: u32,

    /// Context length limit (prompt plus output tokens).
    #[arg(long, env = "ENGINE_SIM_MAX_MODEL_LEN", default_value_t = 32768,
          value_parser = clap::value_parser!(u64).range(2..))]
    pub max_model_len: u64,

    /// Tokens generated when the request sets no token limit.
    #[arg(long, env = "ENGINE_SIM_OUTPUT_TOKENS", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub output_tokens: u64,

    /// Delay before the first output token, in milliseconds.
    #[arg(long, env = "ENGINE_SIM_TTFT_MS", default_value_t = 0)]
    pub ttft_ms: u64,

    /// Delay between output tokens, in milliseconds.
    #[arg(long, env = "ENGINE_SIM_ITL_MS", default_value_t = 0)]
    pub itl_ms: u64,

    /// Extra delay before the first token of prefill-role requests, in milliseconds.
    #[arg(long, env = "ENGINE_SIM_PREFILL_DELAY_MS", default_value_t = 0)]
    pub prefill_delay_ms: u64,

    /// Fraction of matching requests answered with --error-status (0..1).
    #[arg(long, env = "ENGINE_SIM_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,

    /// HTTP status of injected errors.
    #[arg(long, env = "ENGINE_SIM_ERROR_STATUS", default_value_t = 500,
          value_parser = clap::value_parser!(u16).range(400..=599))]
    pub error_status: u16,

    /// Fraction of matching requests accepted and never answered (0..1).
    #[arg(long, env = "ENGINE_SIM_HANG_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub hang_rate: f64,

    /// Which requests faults apply to: all, prefill (prefill-role only) or decode (all others).
    #[arg(long, env = "ENGINE_SIM_FAULT_SCOPE", value_enum, default_value_t = FaultScope::All)]
    pub fault_scope: FaultScope,

    /// Bind the listening socket only after this delay (connections are refused until then).
    #[arg(long, env = "ENGINE_SIM_LISTEN_AFTER_MS", default_value_t = 0)]
    pub listen_after_ms: u64,

    /// Seconds after which blocks held for a remote decode are freed without a release notification.
    #[arg(long, env = "ENGINE_SIM_HOLD_TIMEOUT_S", default_value_t = 480.0, value_parser = parse_seconds)]
    pub hold_timeout_s: f64,

    /// KV data plane between engines: tcp, nixl (real NIXL libraries, see `make setup`),
    /// cuda-ipc (engines on one host with --kv-mem gpu:N) or auto.
    #[arg(long, env = "ENGINE_SIM_KV_BACKEND", default_value = "tcp")]
    pub kv_backend: transfer::BackendKind,

    /// Where the KV pool lives: host or gpu:N (CUDA device N, needs the NVIDIA driver).
    #[arg(long, env = "ENGINE_SIM_KV_MEM", default_value = "host")]
    pub kv_mem: transfer::layout::MemKind,

    /// Port of this engine's KV-transfer agent (gRPC control plane); 0 picks a free one. It is
    /// what a prefill returns as `remote_port`.
    #[arg(long, env = "ENGINE_SIM_KV_PORT", default_value_t = 0)]
    pub kv_port: u16,

    /// Serve a Mooncake bootstrap server on this port (0: none): `GET /query` answers
    /// `{"0": {"engine_id": <engine id>}}`, the rank-to-engine map pd-sidecar's
    /// `--kv-connector=mooncake` asks prefill pods for. engine-sim has no Mooncake
    /// transfer engine: a request with Mooncake's `transfer_id` is computed locally.
    #[arg(long, env = "ENGINE_SIM_MOONCAKE_BOOTSTRAP_PORT", default_value_t = 0)]
    pub mooncake_bootstrap_port: u16,

    /// Shape of the `kv_transfer_params` a prefill answers with: `grouped` (vLLM 0.26:
    /// `remote_block_ids` as one list per KV-cache group, plus `remote_num_tokens` and
    /// `remote_blocks_expiry_time`) or `flat` (older vLLM: one list of ids). A decode accepts both.
    #[arg(long, env = "ENGINE_SIM_KV_PARAMS", value_enum, default_value_t = KvParamsShape::Grouped)]
    pub kv_params: KvParamsShape,

    /// Shape of the KV cache: a preset (llama-3.1-8b, ...) or
    /// "layers=N,kv_heads=N,head_dim=N,dtype=bf16". The default is small, so that many
    /// simulators fit one machine; the bytes still move and are checked.
    #[arg(
        long,
        env = "ENGINE_SIM_KV_MODEL",
        default_value = "layers=2,kv_heads=1,head_dim=16,dtype=bf16"
    )]
    pub kv_model: String,

    /// Deadline of one KV pull, in milliseconds; a pull that fails falls back to local prefill.
    #[arg(long, env = "ENGINE_SIM_KV_PULL_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_pull_timeout_ms: u64,

    /// Turn on the timing model: continuous batching with the costs below (defaults resemble an
    /// 8B model on one H100). Off, the engine answers as fast as it can (plus --ttft-ms/--itl-ms).
    #[arg(long, env = "ENGINE_SIM_TIMING_MODEL")]
    pub timing_model: bool,

    /// Fixed cost of one engine step (reading the weights), microseconds.
    #[arg(long, env = "ENGINE_SIM_STEP_BASE_US", default_value_t = 5000)]
    pub step_base_us: u64,

    /// Prefill cost per uncached prompt token, microseconds.
    #[arg(long, env = "ENGINE_SIM_PREFILL_US_PER_TOKEN", default_value_t = 55)]
    pub prefill_us_per_token: u64,

    /// Decode cost per sequence in the batch, microseconds per step.
    #[arg(long, env = "ENGINE_SIM_DECODE_US_PER_SEQ", default_value_t = 30)]
    pub decode_us_per_seq: u64,

    /// Token budget of one step (vLLM's --max-num-batched-tokens).
    #[arg(long, env = "ENGINE_SIM_MAX_NUM_BATCHED_TOKENS", default_value_t = 8192,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_num_batched_tokens: u64,

    /// Sequences decoding at once (vLLM's --max-num-seqs).
    #[arg(long, env = "ENGINE_SIM_MAX_NUM_SEQS", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_num_seqs: u64,

    /// Tokenize text as pd-router lays it out without a tokenizer: the prompt's UTF-8 bytes
    /// (chat: each message's role, a newline, then its content's text parts; completions: each
    /// prompt string; responses: instructions and input content, as without this flag) as one
    /// stream cut into 4-byte tokens, each id the chunk as a little-endian u32 (a last short
    /// chunk zero-padded); a prompt counts ceil(bytes / 4). Without it each text piece's chunks
    /// are hashed. Why: the router's precise prefix index matches a prompt when its bytes equal
    /// the token ids of the engine's KV events laid out as 4 little-endian bytes each, so with
    /// this flag (the demo's engines) an engine's events index what the router sees.
    #[arg(long, env = "ENGINE_SIM_BYTE_TOKENS")]
    pub byte_tokens: bool,

    /// Corrupt one byte of every block this engine prefills (tests the decode's integrity check).
    #[arg(long, env = "ENGINE_SIM_CORRUPT_KV")]
    pub corrupt_kv: bool,

    /// vLLM's `--kv-events-config`, the same JSON: `enable_kv_cache_events`, `publisher`
    /// (`zmq`, the default when enabled, or `null`), `endpoint` (default `tcp://*:5557`; bound
    /// when it has `*` or `::` or is `ipc://`, else connected to), `replay_endpoint`, `topic`,
    /// `buffer_steps`, `hwm`, `max_queue_size`. Events are published only when enabled with
    /// the zmq publisher.
    #[arg(long, env = "ENGINE_SIM_KV_EVENTS_CONFIG", value_name = "JSON",
          value_parser = super::events::parse_config)]
    pub kv_events_config: Option<KvEventsConfig>,

    /// Layout of KV events on the wire: map (vLLM 0.26 and later: tagged maps, fields by name)
    /// or array (older vLLM: positional arrays).
    #[arg(long, env = "ENGINE_SIM_KV_EVENTS_ENCODING", value_enum,
          default_value_t = EventEncoding::Map)]
    pub kv_events_encoding: EventEncoding,

    /// Block hashes in KV events: int (the digest's low 64 bits, vLLM's default
    /// VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1) or bytes (the raw 32-byte digest, =0).
    #[arg(long, env = "ENGINE_SIM_KV_EVENTS_HASH", value_enum, default_value_t = EventHash::Int)]
    pub kv_events_hash: EventHash,
}

/// `--kv-events-encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventEncoding {
    Map,
    Array,
}

impl From<EventEncoding> for Encoding {
    fn from(e: EventEncoding) -> Self {
        match e {
            EventEncoding::Map => Encoding::Map,
            EventEncoding::Array => Encoding::Array,
        }
    }
}

/// `--kv-events-hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventHash {
    Int,
    Bytes,
}

impl From<EventHash> for HashForm {
    fn from(h: EventHash) -> Self {
        match h {
            EventHash::Int => HashForm::Int,
            EventHash::Bytes => HashForm::Bytes,
        }
    }
}

impl Config {
    /// The timing model, when `--timing-model` is on.
    pub fn timing(&self) -> Option<super::sched::TimingModel> {
        self.timing_model.then(|| super::sched::TimingModel {
            step_base: std::time::Duration::from_micros(self.step_base_us),
            prefill_per_token: std::time::Duration::from_micros(self.prefill_us_per_token),
            decode_per_seq: std::time::Duration::from_micros(self.decode_us_per_seq),
            token_budget: self.max_num_batched_tokens,
            max_num_seqs: self.max_num_seqs as usize,
        })
    }

    /// How text becomes token ids (`--byte-tokens`).
    pub fn text_tokens(&self) -> super::tokens::TextTokens {
        if self.byte_tokens {
            super::tokens::TextTokens::Bytes
        } else {
            super::tokens::TextTokens::Hashed
        }
    }

    /// The fault configuration the flags describe (runtime changes go through `POST /sim/faults`).
    pub fn faults(&self) -> FaultConfig {
        FaultConfig {
            error_rate: self.error_rate,
            error_status: self.error_status,
            hang_rate: self.hang_rate,
            scope: self.fault_scope,
            fail_next: 0,
            delay_ms: 0,
            lose_kv_events: 0,
        }
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not in 0..=1"))
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    // Bounded so that deadlines computed from it never overflow.
    if (0.0..=1e9).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a number of seconds within 0..=1e9"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_given_twice_takes_its_last_value() {
        // pd-demo appends the decode engines' own --kv-mem after the common flags.
        let cfg =
            Config::try_parse_from(["engine-sim", "--num-blocks=10", "--num-blocks=20"]).unwrap();
        assert_eq!(cfg.num_blocks, 20);
    }

    #[test]
    fn defaults_match_vllm_ports_and_limits() {
        let cfg = Config::try_parse_from(["engine-sim"]).unwrap();
        assert_eq!(cfg.port, 8200);
        assert_eq!(cfg.block_size, 16);
        assert_eq!(cfg.hold_timeout_s, 480.0);
        assert_eq!(cfg.fault_scope, FaultScope::All);
    }

    #[test]
    fn rejects_out_of_range_rates() {
        assert!(Config::try_parse_from(["engine-sim", "--error-rate", "1.5"]).is_err());
        assert!(Config::try_parse_from(["engine-sim", "--hang-rate", "-0.1"]).is_err());
        assert!(Config::try_parse_from(["engine-sim", "--error-status", "200"]).is_err());
        assert!(Config::try_parse_from(["engine-sim", "--hold-timeout-s", "1e30"]).is_err());
        let cfg = Config::try_parse_from(["engine-sim", "--fault-scope", "prefill"]).unwrap();
        assert_eq!(cfg.fault_scope, FaultScope::Prefill);
    }

    #[test]
    fn byte_tokens_flag() {
        use super::super::tokens::TextTokens;
        let cfg = Config::try_parse_from(["engine-sim"]).unwrap();
        assert_eq!(cfg.text_tokens(), TextTokens::Hashed);
        let cfg = Config::try_parse_from(["engine-sim", "--byte-tokens"]).unwrap();
        assert_eq!(cfg.text_tokens(), TextTokens::Bytes);
    }

    #[test]
    fn kv_events_flags() {
        let cfg = Config::try_parse_from(["engine-sim"]).unwrap();
        assert_eq!(cfg.kv_events_config, None);
        assert_eq!(cfg.kv_events_encoding, EventEncoding::Map);
        assert_eq!(cfg.kv_events_hash, EventHash::Int);
        let cfg = Config::try_parse_from([
            "engine-sim",
            "--kv-events-config",
            r#"{"enable_kv_cache_events": true, "replay_endpoint": "tcp://*:5558"}"#,
            "--kv-events-encoding",
            "array",
            "--kv-events-hash",
            "bytes",
        ])
        .unwrap();
        let kv = cfg.kv_events_config.unwrap();
        assert_eq!(kv.replay_endpoint.as_deref(), Some("tcp://*:5558"));
        assert_eq!(kv.buffer_steps, 10_000);
        assert_eq!(Encoding::from(cfg.kv_events_encoding), Encoding::Array);
        assert_eq!(HashForm::from(cfg.kv_events_hash), HashForm::Bytes);
        for bad in [
            r#"{"enable_kv_cache_events": "yes"}"#,
            r#"{"topics": "x"}"#,
            "{",
        ] {
            let err = Config::try_parse_from(["engine-sim", "--kv-events-config", bad]);
            assert_eq!(err.unwrap_err().exit_code(), 2, "{bad}");
        }
    }
}
