//! Command-line pieces shared by `kv-agent` and `kvbench`: the KV layout
//! flags and logging set-up.

use crate::layout::{KvFormat, KvLayout, LayoutParams, MemKind, ModelShape, RegionKind};
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
    /// Where the pool lives: host, or gpu:N (CUDA device N; needs the NVIDIA
    /// driver at run time, nothing at build time).
    #[arg(long, env = "TANDEM_KV_MEM", default_value = "host")]
    pub mem: MemKind,
    /// How a GPU pool is shared with peers on this node: ipc (legacy CUDA IPC
    /// handle: one pod) or fd (a VMM allocation whose descriptor is passed
    /// over a Unix socket in TANDEM_CUDA_IPC_DIR: pods that mount it).
    #[arg(long, env = "TANDEM_CUDA_SHARE", default_value = "ipc")]
    pub gpu_share: crate::gpu::GpuShare,
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
        p.mem = self.mem;
        Ok(KvLayout::new(p)?)
    }
}

/// Logs to stderr; `RUST_LOG` overrides `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    // Escape codes only for a person at a terminal, not for log files.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Exit code for a start-up failure the user must fix in the environment
/// (no GPU where GPU memory was asked for).
pub const EXIT_UNAVAILABLE: i32 = 2;

/// How a benchmark allocates a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RegionAlloc {
    /// One allocation for the whole pool.
    #[default]
    One,
    /// One allocation per region (host mappings or `cuMemAlloc`s), lent to
    /// the pool as an engine lends its per-layer tensors.
    Separate,
}

impl std::fmt::Display for RegionAlloc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RegionAlloc::One => "one",
            RegionAlloc::Separate => "separate",
        })
    }
}

/// Allocates a pool for `layout` (its `mem` kind), or ends the process with
/// [`EXIT_UNAVAILABLE`] and a one-line reason when the GPU is unavailable.
pub fn allocate_or_exit(
    program: &str,
    layout: &KvLayout,
    shm: Option<(&std::path::Path, bool)>,
    share: crate::gpu::GpuShare,
) -> anyhow::Result<crate::KvMemory> {
    let len = pool_len(layout)?;
    or_exit(
        program,
        layout,
        crate::KvMemory::allocate(layout.params().mem, len, shm, share),
    )
}

/// Allocates a pool for `layout` as one allocation per region
/// ([`crate::KvMemory::allocate_separate`]); exits as [`allocate_or_exit`].
pub fn allocate_separate_or_exit(
    program: &str,
    layout: &KvLayout,
) -> anyhow::Result<crate::KvMemory> {
    pool_len(layout)?;
    let region_len = usize::try_from(layout.region_len())
        .map_err(|_| anyhow::anyhow!("region of {} bytes is too large", layout.region_len()))?;
    or_exit(
        program,
        layout,
        crate::KvMemory::allocate_separate(layout.params().mem, layout.num_regions(), region_len),
    )
}

fn pool_len(layout: &KvLayout) -> anyhow::Result<usize> {
    usize::try_from(layout.total_bytes())
        .map_err(|_| anyhow::anyhow!("pool of {} bytes is too large", layout.total_bytes()))
}

fn or_exit(
    program: &str,
    layout: &KvLayout,
    allocated: Result<crate::KvMemory, TransferError>,
) -> anyhow::Result<crate::KvMemory> {
    let len = layout.total_bytes();
    match allocated {
        Ok(m) => Ok(m),
        Err(TransferError::GpuUnavailable(why)) => {
            eprintln!("{program}: --mem {}: {why}", layout.params().mem);
            std::process::exit(EXIT_UNAVAILABLE);
        }
        Err(e) => Err(anyhow::anyhow!(
            "allocating the {} pool of {} bytes: {e}",
            layout.params().mem,
            len
        )),
    }
}
