//! Command-line pieces shared by `kv-agent` and `kvbench`: the KV layout
//! flags and logging set-up.

use crate::layout::{KvFormat, KvLayout, LayoutParams, ModelShape, RegionKind};
use crate::TransferError;

#[derive(Debug, Clone, clap::Args)]
pub struct LayoutArgs {
    /// Model shape: a preset (llama-3.1-8b, llama-3.1-70b, qwen3-0.6b) or
    /// "layers=32,kv_heads=8,head_dim=128,dtype=bf16".
    #[arg(long, env = "TANDEM_KV_MODEL", default_value = "llama-3.1-8b")]
    pub model: String,
    /// Tokens per KV block (vLLM's --block-size).
    #[arg(long, env = "TANDEM_KV_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: u32,
    /// Blocks in the pool.
    #[arg(long, env = "TANDEM_KV_NUM_BLOCKS", default_value_t = 512)]
    pub num_blocks: u32,
    /// This engine's tensor-parallel rank and size (KV heads split across ranks).
    #[arg(long, env = "TANDEM_KV_TP_RANK", default_value_t = 0)]
    pub tp_rank: u32,
    #[arg(long, env = "TANDEM_KV_TP_SIZE", default_value_t = 1)]
    pub tp_size: u32,
    /// Layout inside a block: hnd (preferred for transfer) or nhd.
    #[arg(long, env = "TANDEM_KV_FORMAT", default_value = "hnd")]
    pub kv_format: KvFormat,
    /// split: K and V regions per layer (FlashAttention); fused: one region
    /// per layer with K and V in each block (FlashInfer).
    #[arg(long, env = "TANDEM_KV_REGIONS", default_value = "split")]
    pub regions: RegionKind,
}

impl LayoutArgs {
    pub fn layout(&self) -> Result<KvLayout, TransferError> {
        let shape = ModelShape::parse(&self.model)?;
        let mut p = LayoutParams::new(shape, self.num_blocks);
        p.block_size = self.block_size;
        p.tp_rank = self.tp_rank;
        p.tp_size = self.tp_size;
        p.format = self.kv_format;
        p.regions = self.regions;
        Ok(KvLayout::new(p)?)
    }
}

/// Logs to stderr; `RUST_LOG` overrides `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
