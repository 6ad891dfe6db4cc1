//! The byte layout of one rank's paged KV cache, shaped like vLLM's.
//!
//! This module owns the arithmetic that turns (model shape, block size, tensor
//! parallelism, attention-backend layout) into byte offsets: how many regions
//! there are, how long a block is, where block `b` of region `r` starts, and
//! which byte ranges hold a given range of KV heads. Everything that moves KV
//! bytes (transfer plans, backends, benchmarks) derives its offsets from a
//! [`KvLayout`] so that both sides of a transfer agree on them.
//!
//! The pool described here is region-major: region `r` occupies
//! `[r * region_len, (r + 1) * region_len)` and inside it block `b` starts at
//! `b * block_len`, which is how vLLM's NIXL connector registers one region
//! per K or V cache tensor and addresses a block as `base + block_id * block_len`.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a layout, a model spec or one of the small enums could not be built.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// A model name that is neither a preset nor a `key=value` spec.
    #[error("unknown model {0:?} (presets: llama-3.1-8b, llama-3.1-70b, qwen3-0.6b; or layers=N,kv_heads=N,head_dim=N[,dtype=bf16])")]
    UnknownModel(String),
    /// A custom model spec with a missing, unknown, repeated or invalid key.
    #[error("bad model spec key {key:?}: {reason}")]
    BadSpec { key: String, reason: String },
    /// A value that none of the accepted spellings of `what` match.
    #[error("unknown {what} {value:?} (expected {expected})")]
    BadValue {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    /// KV heads cannot be split (or, with fewer heads than ranks,
    /// replicated) evenly across the tensor-parallel ranks.
    #[error("{kv_heads} KV heads cannot be spread evenly over tp_size {tp_size}: one must divide the other")]
    HeadsNotDivisible { kv_heads: u32, tp_size: u32 },
    /// The rank is not one of `0..tp_size`.
    #[error("tp_rank {tp_rank} is out of range for tp_size {tp_size}")]
    BadTpRank { tp_rank: u32, tp_size: u32 },
    /// A size parameter that must be positive is zero; names the parameter.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// The pool's byte size does not fit in 64 bits.
    #[error("layout size overflows u64")]
    Overflow,
    /// A head range that is empty or reaches past this rank's heads.
    #[error("head range {start}..{end} is empty or exceeds this rank's {heads_per_rank} heads")]
    BadHeadRange {
        start: u32,
        end: u32,
        heads_per_rank: u32,
    },
}

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F16,
    Bf16,
    F32,
    Fp8,
}

impl Dtype {
    /// Bytes per element.
    pub fn bytes(self) -> u32 {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
            Dtype::Fp8 => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::Fp8 => "fp8",
        }
    }
}

impl FromStr for Dtype {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f32" | "fp32" | "float32" => Ok(Dtype::F32),
            "fp8" | "f8" | "fp8_e4m3" => Ok(Dtype::Fp8),
            _ => Err(LayoutError::BadValue {
                what: "dtype",
                value: s.to_string(),
                expected: "f16, bf16, f32 or fp8",
            }),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Order of tokens and heads inside one block of one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvFormat {
    /// `[block_size tokens][heads][head_dim]`: a head range is strided, one
    /// piece per token.
    Nhd,
    /// `[heads][block_size tokens][head_dim]`: a head range is one contiguous
    /// piece, which is why it is preferred when the two sides' TP sizes differ.
    Hnd,
}

impl FromStr for KvFormat {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "nhd" => Ok(KvFormat::Nhd),
            "hnd" => Ok(KvFormat::Hnd),
            _ => Err(LayoutError::BadValue {
                what: "kv format",
                value: s.to_string(),
                expected: "nhd or hnd",
            }),
        }
    }
}

impl fmt::Display for KvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvFormat::Nhd => "NHD",
            KvFormat::Hnd => "HND",
        })
    }
}

/// How a layer's K and V caches map onto registered regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionKind {
    /// A K region and a V region per layer (vLLM's FlashAttention layout).
    Split,
    /// One region per layer whose every block holds K then V (FlashInfer).
    Fused,
    /// One region per layer whose blocks hold K and V side by side in each
    /// head's content: vLLM 0.26's FlashAttention cache, logically
    /// `(blocks, heads, tokens, 2 * head_dim)`. A head's bytes for a token
    /// are `2 * head_dim` elements, so a head range is one range of the
    /// block in HND order.
    Packed,
}

impl FromStr for RegionKind {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "split" => Ok(RegionKind::Split),
            "fused" => Ok(RegionKind::Fused),
            "packed" => Ok(RegionKind::Packed),
            _ => Err(LayoutError::BadValue {
                what: "region kind",
                value: s.to_string(),
                expected: "split, fused or packed",
            }),
        }
    }
}

impl fmt::Display for RegionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegionKind::Split => "split",
            RegionKind::Fused => "fused",
            RegionKind::Packed => "packed",
        })
    }
}

/// Where the pool lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemKind {
    Host,
    /// A CUDA device ordinal.
    Gpu(u32),
}

impl FromStr for MemKind {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "host" || lower == "cpu" {
            return Ok(MemKind::Host);
        }
        let device = lower
            .strip_prefix("gpu:")
            .or_else(|| lower.strip_prefix("cuda:"))
            .and_then(|n| n.parse::<u32>().ok());
        device
            .map(MemKind::Gpu)
            .ok_or_else(|| LayoutError::BadValue {
                what: "memory kind",
                value: s.to_string(),
                expected: "host, gpu:N or cuda:N",
            })
    }
}

impl fmt::Display for MemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemKind::Host => f.write_str("host"),
            MemKind::Gpu(n) => write!(f, "gpu:{n}"),
        }
    }
}

/// The model dimensions that decide KV size: nothing about weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub name: String,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype: Dtype,
}

/// Canonical preset names with (layers, kv_heads, head_dim); all bf16.
const PRESETS: [(&str, u32, u32, u32); 3] = [
    ("llama-3.1-8b", 32, 8, 128),
    ("llama-3.1-70b", 80, 8, 128),
    ("qwen3-0.6b", 28, 8, 128),
];
const PRESET_NAMES: [&str; 3] = [PRESETS[0].0, PRESETS[1].0, PRESETS[2].0];

/// Reduces a Hugging Face style model name to a comparison key, so that
/// "meta-llama/Meta-Llama-3.1-8B-Instruct" and "llama-3.1-8b" meet: the org
/// prefix, a "meta-" prefix and fine-tune suffixes do not change the KV shape.
fn preset_key(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    let base = lower.rsplit('/').next().unwrap_or(&lower);
    let base = base.strip_prefix("meta-").unwrap_or(base);
    let base = ["-instruct", "-base", "-chat"]
        .iter()
        .find_map(|suffix| base.strip_suffix(suffix))
        .unwrap_or(base);
    base.chars().filter(|c| *c != '-' && *c != '_').collect()
}

impl ModelShape {
    /// A preset by name, case-insensitively, accepting Hugging Face style
    /// names such as "meta-llama/Llama-3.1-8B-Instruct".
    pub fn preset(name: &str) -> Option<ModelShape> {
        let key = preset_key(name);
        PRESETS
            .iter()
            .find(|(canonical, ..)| preset_key(canonical) == key)
            .map(|&(canonical, layers, kv_heads, head_dim)| ModelShape {
                name: canonical.to_string(),
                layers,
                kv_heads,
                head_dim,
                dtype: Dtype::Bf16,
            })
    }

    /// The canonical preset names.
    pub fn preset_names() -> &'static [&'static str] {
        &PRESET_NAMES
    }

    /// A preset name, or a custom spec
    /// `layers=32,kv_heads=8,head_dim=128[,dtype=bf16][,name=NAME]`.
    /// A custom spec is named "custom" unless it gives `name`.
    pub fn parse(spec: &str) -> Result<ModelShape, LayoutError> {
        if !spec.contains('=') {
            return ModelShape::preset(spec)
                .ok_or_else(|| LayoutError::UnknownModel(spec.trim().to_string()));
        }
        let mut name: Option<String> = None;
        let mut layers: Option<u32> = None;
        let mut kv_heads: Option<u32> = None;
        let mut head_dim: Option<u32> = None;
        let mut dtype: Option<Dtype> = None;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(LayoutError::BadSpec {
                    key: item.to_string(),
                    reason: "expected key=value".to_string(),
                });
            };
            let key = key.trim().to_ascii_lowercase().replace('-', "_");
            let value = value.trim();
            let bad = |reason: String| LayoutError::BadSpec {
                key: key.clone(),
                reason,
            };
            let positive = || -> Result<u32, LayoutError> {
                match value.parse::<u32>() {
                    Ok(0) => Err(bad("must be greater than zero".to_string())),
                    Ok(n) => Ok(n),
                    Err(e) => Err(bad(format!("{value:?} is not a number: {e}"))),
                }
            };
            let duplicate = match key.as_str() {
                "layers" => layers.replace(positive()?).is_some(),
                "kv_heads" => kv_heads.replace(positive()?).is_some(),
                "head_dim" => head_dim.replace(positive()?).is_some(),
                "dtype" => dtype
                    .replace(value.parse().map_err(|e: LayoutError| bad(e.to_string()))?)
                    .is_some(),
                "name" => {
                    if value.is_empty() {
                        return Err(bad("must not be empty".to_string()));
                    }
                    name.replace(value.to_string()).is_some()
                }
                _ => {
                    return Err(bad(
                        "unknown key (expected layers, kv_heads, head_dim, dtype, name)"
                            .to_string(),
                    ))
                }
            };
            if duplicate {
                return Err(bad("given more than once".to_string()));
            }
        }
        let missing = |key: &str| LayoutError::BadSpec {
            key: key.to_string(),
            reason: "missing".to_string(),
        };
        Ok(ModelShape {
            name: name.unwrap_or_else(|| "custom".to_string()),
            layers: layers.ok_or_else(|| missing("layers"))?,
            kv_heads: kv_heads.ok_or_else(|| missing("kv_heads"))?,
            head_dim: head_dim.ok_or_else(|| missing("head_dim"))?,
            dtype: dtype.unwrap_or(Dtype::Bf16),
        })
    }

    /// KV bytes one token occupies over all layers, K and V, all heads, with
    /// no TP split. Saturates instead of overflowing for absurd shapes.
    pub fn bytes_per_token(&self) -> u64 {
        u64::from(self.layers)
            .saturating_mul(2)
            .saturating_mul(u64::from(self.kv_heads))
            .saturating_mul(u64::from(self.head_dim))
            .saturating_mul(u64::from(self.dtype.bytes()))
    }
}

/// Everything that decides a [`KvLayout`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutParams {
    pub shape: ModelShape,
    /// Tokens per block.
    pub block_size: u32,
    pub num_blocks: u32,
    pub tp_rank: u32,
    pub tp_size: u32,
    pub format: KvFormat,
    pub regions: RegionKind,
    pub mem: MemKind,
}

impl LayoutParams {
    /// vLLM's defaults for a single rank: 16-token blocks, TP 1, HND, a K and
    /// a V region per layer, host memory.
    pub fn new(shape: ModelShape, num_blocks: u32) -> Self {
        LayoutParams {
            shape,
            block_size: 16,
            num_blocks,
            tp_rank: 0,
            tp_size: 1,
            format: KvFormat::Hnd,
            regions: RegionKind::Split,
            mem: MemKind::Host,
        }
    }
}

/// A validated layout with its derived sizes. Serializes as its
/// [`LayoutParams`] and validates again when deserialized, so a deserialized
/// layout can never carry sizes that disagree with its params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LayoutParams", into = "LayoutParams")]
pub struct KvLayout {
    params: LayoutParams,
    heads_per_rank: u32,
    num_regions: u32,
    /// Bytes of one head for one token: `head_dim * dtype_bytes` (twice
    /// that for [`RegionKind::Packed`], K and V together).
    head_bytes: u64,
    block_len: u64,
    region_len: u64,
    total_bytes: u64,
}

impl TryFrom<LayoutParams> for KvLayout {
    type Error = LayoutError;

    fn try_from(params: LayoutParams) -> Result<Self, Self::Error> {
        KvLayout::new(params)
    }
}

impl From<KvLayout> for LayoutParams {
    fn from(layout: KvLayout) -> Self {
        layout.params
    }
}

impl KvLayout {
    /// Validates `params` and derives the sizes.
    pub fn new(params: LayoutParams) -> Result<KvLayout, LayoutError> {
        let shape = &params.shape;
        for (value, what) in [
            (shape.layers, "layers"),
            (shape.kv_heads, "kv_heads"),
            (shape.head_dim, "head_dim"),
            (params.block_size, "block_size"),
            (params.num_blocks, "num_blocks"),
            (params.tp_size, "tp_size"),
        ] {
            if value == 0 {
                return Err(LayoutError::Zero(what));
            }
        }
        if params.tp_rank >= params.tp_size {
            return Err(LayoutError::BadTpRank {
                tp_rank: params.tp_rank,
                tp_size: params.tp_size,
            });
        }
        // vLLM shards KV heads across ranks; with fewer heads than ranks each
        // rank keeps a replica of one head, and vLLM then needs every head to
        // have the same number of replicas, so either count must divide the
        // other.
        let (more, fewer) = if shape.kv_heads >= params.tp_size {
            (shape.kv_heads, params.tp_size)
        } else {
            (params.tp_size, shape.kv_heads)
        };
        let leftover = more % fewer;
        if leftover != 0 {
            return Err(LayoutError::HeadsNotDivisible {
                kv_heads: shape.kv_heads,
                tp_size: params.tp_size,
            });
        }
        let heads_per_rank = (shape.kv_heads / params.tp_size).max(1);
        // `halves`: K and V as two halves of a block (fused); `packed`: K and
        // V side by side in each head's content, so a head unit is twice as long.
        let (num_regions, halves, packed) = match params.regions {
            RegionKind::Split => (
                shape.layers.checked_mul(2).ok_or(LayoutError::Overflow)?,
                1,
                1,
            ),
            RegionKind::Fused => (shape.layers, 2, 1),
            RegionKind::Packed => (shape.layers, 1, 2),
        };
        let head_bytes = u64::from(shape.head_dim) * u64::from(shape.dtype.bytes()) * packed;
        let block_len = [
            u64::from(params.block_size),
            u64::from(heads_per_rank),
            halves,
        ]
        .into_iter()
        .try_fold(head_bytes, u64::checked_mul)
        .ok_or(LayoutError::Overflow)?;
        let region_len = block_len
            .checked_mul(u64::from(params.num_blocks))
            .ok_or(LayoutError::Overflow)?;
        let total_bytes = region_len
            .checked_mul(u64::from(num_regions))
            .ok_or(LayoutError::Overflow)?;
        Ok(KvLayout {
            params,
            heads_per_rank,
            num_regions,
            head_bytes,
            block_len,
            region_len,
            total_bytes,
        })
    }

    pub fn params(&self) -> &LayoutParams {
        &self.params
    }

    /// `layers * 2` for [`RegionKind::Split`], `layers` for the others.
    pub fn num_regions(&self) -> u32 {
        self.num_regions
    }

    /// KV heads held by this rank.
    pub fn heads_per_rank(&self) -> u32 {
        self.heads_per_rank
    }

    /// Bytes of one block in one region (K and V together when fused).
    pub fn block_len(&self) -> u64 {
        self.block_len
    }

    /// Bytes of one region: `block_len * num_blocks`.
    pub fn region_len(&self) -> u64 {
        self.region_len
    }

    /// Bytes of the whole pool: `region_len * num_regions`.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn num_blocks(&self) -> u32 {
        self.params.num_blocks
    }

    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.params.block_size
    }

    /// Start of `region` in the pool. Pure arithmetic with no bounds check
    /// (`region_offset(num_regions())` is the pool's end); [`Self::region_of`]
    /// is the checked inverse.
    pub fn region_offset(&self, region: u32) -> u64 {
        u64::from(region) * self.region_len
    }

    /// Start of `block` in `region`: `region_offset + block * block_len`.
    /// No bounds check, like [`Self::region_offset`].
    pub fn block_offset(&self, region: u32, block: u32) -> u64 {
        self.region_offset(region) + u64::from(block) * self.block_len
    }

    /// Bytes one block id holds over all regions.
    pub fn bytes_per_block(&self) -> u64 {
        self.block_len * u64::from(self.num_regions)
    }

    /// Bytes one token occupies on this rank over all regions.
    pub fn bytes_per_token(&self) -> u64 {
        self.bytes_per_block() / u64::from(self.params.block_size)
    }

    /// Blocks needed to hold `tokens` tokens (rounded up, saturating at
    /// `u32::MAX`).
    pub fn blocks_for_tokens(&self, tokens: u64) -> u32 {
        let blocks = tokens.div_ceil(u64::from(self.params.block_size));
        u32::try_from(blocks).unwrap_or(u32::MAX)
    }

    /// "layer3.k" / "layer3.v" for split regions, "layer3.kv" for fused ones.
    /// Split regions are ordered K then V within each layer.
    pub fn region_name(&self, region: u32) -> String {
        match self.params.regions {
            RegionKind::Split => {
                let half = match region % 2 {
                    0 => "k",
                    _ => "v",
                };
                format!("layer{}.{half}", region / 2)
            }
            RegionKind::Fused | RegionKind::Packed => format!("layer{region}.kv"),
        }
    }

    /// Which (region, block, offset within the block) a pool offset falls in;
    /// `None` past the end of the pool.
    pub fn region_of(&self, offset: u64) -> Option<(u32, u32, u64)> {
        if offset >= self.total_bytes {
            return None;
        }
        let region = u32::try_from(offset / self.region_len).ok()?;
        let in_region = offset % self.region_len;
        let block = u32::try_from(in_region / self.block_len).ok()?;
        Some((region, block, in_region % self.block_len))
    }

    /// The model's KV heads this rank holds, as vLLM shards them: a
    /// contiguous `heads_per_rank` from `tp_rank * heads_per_rank`, or, with
    /// fewer heads than ranks, the one head `tp_rank * kv_heads / tp_size`.
    pub fn head_range(&self) -> Range<u32> {
        let p = &self.params;
        let first = if p.shape.kv_heads >= p.tp_size {
            p.tp_rank * self.heads_per_rank
        } else {
            // Cannot overflow: tp_rank < tp_size, and kv_heads < tp_size here.
            (u64::from(p.tp_rank) * u64::from(p.shape.kv_heads) / u64::from(p.tp_size)) as u32
        };
        first..first + self.heads_per_rank
    }

    /// Every byte range `(offset within block, len)` of one block that holds
    /// `heads` (indices into this rank's heads), K and V: [`Self::head_slice`]
    /// and, for [`RegionKind::Fused`], the same in the V half.
    pub fn block_slices(&self, heads: Range<u32>) -> Result<Vec<(u64, u64)>, LayoutError> {
        let k = self.head_slice(heads)?;
        if self.params.regions != RegionKind::Fused {
            return Ok(k);
        }
        let half = self.block_len / 2;
        let v: Vec<_> = k.iter().map(|&(o, len)| (o + half, len)).collect();
        Ok(k.into_iter().chain(v).collect())
    }

    /// Byte ranges `(offset within block, len)` holding `heads` (indices into
    /// this rank's heads) inside one block of one region: what a peer with a
    /// different TP size reads or writes. HND gives exactly one range; NHD one
    /// range per token, in token order, even when they happen to touch.
    ///
    /// For [`RegionKind::Fused`] the offsets are within the K half of the
    /// block; the V half's ranges are the same shifted by `block_len() / 2`.
    pub fn head_slice(&self, heads: Range<u32>) -> Result<Vec<(u64, u64)>, LayoutError> {
        if heads.start >= heads.end || heads.end > self.heads_per_rank {
            return Err(LayoutError::BadHeadRange {
                start: heads.start,
                end: heads.end,
                heads_per_rank: self.heads_per_rank,
            });
        }
        let count = u64::from(heads.end - heads.start);
        let first = u64::from(heads.start);
        let tokens = u64::from(self.params.block_size);
        Ok(match self.params.format {
            KvFormat::Hnd => {
                let per_head = tokens * self.head_bytes;
                vec![(first * per_head, count * per_head)]
            }
            KvFormat::Nhd => {
                let per_token = u64::from(self.heads_per_rank) * self.head_bytes;
                (0..tokens)
                    .map(|t| {
                        (
                            t * per_token + first * self.head_bytes,
                            count * self.head_bytes,
                        )
                    })
                    .collect()
            }
        })
    }
}

impl fmt::Display for KvLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        write!(
            f,
            "{} {} {} {}, {} regions x {} blocks x {} ({} tok/block, tp {}/{}, {}), {}",
            p.shape.name,
            p.shape.dtype,
            p.format,
            p.regions,
            self.num_regions,
            p.num_blocks,
            format_bytes(self.block_len),
            p.block_size,
            p.tp_rank,
            p.tp_size,
            p.mem,
            format_bytes(self.total_bytes),
        )
    }
}

/// Human-readable binary size: "123 B", "32 KiB", "1.50 MiB", "1.00 GiB".
/// Below a GiB an exact multiple of the unit prints as an integer, since
/// block and region sizes usually are one; from a GiB up two decimals are
/// always shown so pool sizes line up in reports.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut unit = 1024u64;
    let mut index = 0;
    while index + 1 < UNITS.len() && n / unit >= 1024 {
        unit *= 1024;
        index += 1;
    }
    // A plain remainder rather than `is_multiple_of`, which is newer than
    // the workspace's rust-version.
    let remainder = n % unit;
    if index < 2 && remainder == 0 {
        format!("{} {}", n / unit, UNITS[index])
    } else {
        format!("{:.2} {}", n as f64 / unit as f64, UNITS[index])
    }
}

#[cfg(test)]
mod tests;
