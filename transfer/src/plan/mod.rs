//! Transfer planning: which byte ranges move where for a block mapping.
//!
//! This module owns turning "local block `local_blocks[i]` receives remote
//! block `remote_blocks[i]`, in every region" into a list of copy
//! descriptors over two [`KvLayout`] pools. [`plan_naive`] reproduces what
//! vLLM's NIXL connector issues (one descriptor per region and block pair);
//! [`plan_coalesced`] merges runs of consecutive blocks, and whole regions
//! when both pools are contiguous, into as few descriptors as a size cap
//! allows; [`plan_blocks`] checks the mapping and hands the block ids
//! themselves to a backend that computes addresses on the device (cuda-ipc's
//! block kernel), so nothing is planned on the host; [`plan_heads`] moves
//! the heads two ranks of different TP sizes share. Offsets are relative
//! to each side's pool base.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::layout::{KvFormat, KvLayout};

mod heads;
pub use heads::{common_heads, plan_heads, shards_differ};

/// One copy: `len` bytes from `remote` (offset in the remote pool) to `local`
/// (offset in the local pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desc {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

/// Which planner to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanKind {
    Naive,
    Coalesced,
    /// Block ids to the device when the backend can ([`plan_blocks`]),
    /// coalesced descriptors otherwise.
    Blocks,
}

impl FromStr for PlanKind {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "naive" => Ok(PlanKind::Naive),
            "coalesced" => Ok(PlanKind::Coalesced),
            "blocks" => Ok(PlanKind::Blocks),
            _ => Err(PlanError::UnknownKind(s.to_string())),
        }
    }
}

impl fmt::Display for PlanKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlanKind::Naive => "naive",
            PlanKind::Coalesced => "coalesced",
            PlanKind::Blocks => "blocks",
        })
    }
}

/// Knobs of [`plan_coalesced`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Largest descriptor to emit; longer runs are split into whole blocks.
    /// A cap below one block is raised to one block, as a block is the unit
    /// both sides agree on.
    pub max_desc_bytes: u64,
    /// Merge the last run of one region with the first run of the next when
    /// both sides are byte-contiguous there.
    pub merge_regions: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_desc_bytes: 64 << 20,
            merge_regions: true,
        }
    }
}

/// The descriptors of one transfer, in issue order, and their total bytes;
/// or, from [`plan_blocks`], no descriptors and the block list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferPlan {
    pub descs: Vec<Desc>,
    pub bytes: u64,
    pub blocks: Option<BlockList>,
}

/// A checked block mapping with the byte arithmetic both pools share:
/// block `local[i]` of region `r` is at `r * local_region_len + local[i] *
/// block_len` of the local pool, and likewise for `remote`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockList {
    pub local: Vec<u32>,
    pub remote: Vec<u32>,
    pub block_len: u64,
    pub regions: u32,
    pub local_region_len: u64,
    pub remote_region_len: u64,
}

impl BlockList {
    /// One (region, block pair) copy each: what the device iterates over.
    pub fn units(&self) -> u64 {
        self.local.len() as u64 * u64::from(self.regions)
    }

    /// The same copies as descriptors, region-major: what [`plan_naive`]
    /// gives for this mapping.
    pub fn descs(&self) -> impl Iterator<Item = Desc> + Clone + '_ {
        (0..u64::from(self.regions)).flat_map(move |r| {
            self.local
                .iter()
                .zip(&self.remote)
                .map(move |(&l, &m)| Desc {
                    local: r * self.local_region_len + u64::from(l) * self.block_len,
                    remote: r * self.remote_region_len + u64::from(m) * self.block_len,
                    len: self.block_len,
                })
        })
    }

    /// The last byte (exclusive) touched in the local and the remote pool.
    pub fn extents(&self) -> (u64, u64) {
        let end = |ids: &[u32], region_len: u64| match ids.iter().max() {
            Some(&b) if self.regions > 0 => u64::from(self.regions - 1)
                .saturating_mul(region_len)
                .saturating_add((u64::from(b) + 1).saturating_mul(self.block_len)),
            _ => 0,
        };
        (
            end(&self.local, self.local_region_len),
            end(&self.remote, self.remote_region_len),
        )
    }
}

/// Why a block mapping cannot be planned. Empty block lists are not an
/// error: they give an empty plan.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PlanError {
    #[error("{local} local blocks but {remote} remote blocks")]
    LengthMismatch { local: usize, remote: usize },
    #[error("{side} block {block} is out of range ({num_blocks} blocks)")]
    BlockOutOfRange {
        side: &'static str,
        block: u32,
        num_blocks: u32,
    },
    /// The two pools do not hold blocks of the same shape; the message names
    /// the differing property with both values.
    #[error("layouts differ: {0}")]
    LayoutMismatch(String),
    /// A block id listed twice: on the local side it would be written twice.
    #[error("{side} block {block} appears more than once")]
    DuplicateBlock { side: &'static str, block: u32 },
    #[error("unknown plan kind {0:?} (expected naive or coalesced)")]
    UnknownKind(String),
}

impl TransferPlan {
    fn from_descs(descs: Vec<Desc>) -> Self {
        let bytes = descs.iter().map(|d| d.len).sum();
        TransferPlan {
            descs,
            bytes,
            blocks: None,
        }
    }

    /// Descriptors, or block units for a block list.
    pub fn len(&self) -> usize {
        match &self.blocks {
            Some(b) => b.units() as usize,
            None => self.descs.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits the descriptors, in order, into at most `n` non-empty
    /// contiguous slices of roughly equal bytes, so several can be in flight
    /// at once while the early layers still go first. `n == 0` counts as 1;
    /// an empty plan gives no slices.
    pub fn chunks(&self, n: usize) -> Vec<&[Desc]> {
        let n = n.max(1).min(self.descs.len());
        let mut parts = Vec::with_capacity(n);
        if n == 0 {
            return parts;
        }
        // Cut after the descriptor that carries the running total past the
        // next k/n of all bytes; u128 keeps `bytes * n` exact.
        let total = self.descs.iter().map(|d| u128::from(d.len)).sum::<u128>();
        let n128 = n as u128;
        let mut boundary = 1u128;
        let mut acc = 0u128;
        let mut start = 0;
        for (i, d) in self.descs.iter().enumerate() {
            acc += u128::from(d.len);
            if parts.len() + 1 < n && acc * n128 >= total * boundary {
                parts.push(&self.descs[start..=i]);
                start = i + 1;
                // One large descriptor may cover several boundaries.
                while boundary < n128 && acc * n128 >= total * boundary {
                    boundary += 1;
                }
            }
        }
        if start < self.descs.len() {
            parts.push(&self.descs[start..]);
        }
        parts
    }

    /// Length of the longest descriptor (0 for an empty plan).
    pub fn max_desc_len(&self) -> u64 {
        self.descs.iter().map(|d| d.len).max().unwrap_or(0)
    }
}

/// Checks that a block of one pool can be copied byte for byte into a block
/// of the other and that the mapping is well formed.
fn validate(
    local: &KvLayout,
    remote: &KvLayout,
    local_blocks: &[u32],
    remote_blocks: &[u32],
) -> Result<(), PlanError> {
    check_lengths(local_blocks, remote_blocks)?;
    check_compatible(local, remote)?;
    check_both_ids(local, remote, local_blocks, remote_blocks)
}

fn check_lengths(local_blocks: &[u32], remote_blocks: &[u32]) -> Result<(), PlanError> {
    if local_blocks.len() != remote_blocks.len() {
        return Err(PlanError::LengthMismatch {
            local: local_blocks.len(),
            remote: remote_blocks.len(),
        });
    }
    Ok(())
}

fn check_both_ids(
    local: &KvLayout,
    remote: &KvLayout,
    local_blocks: &[u32],
    remote_blocks: &[u32],
) -> Result<(), PlanError> {
    check_ids("local", local_blocks, local.num_blocks())?;
    check_ids("remote", remote_blocks, remote.num_blocks())
}

fn mismatch(what: &str, local: impl fmt::Display, remote: impl fmt::Display) -> PlanError {
    PlanError::LayoutMismatch(format!("{what} {local} (local) vs {remote} (remote)"))
}

/// Equal block_len and region count are what the byte arithmetic needs; the
/// other checks catch pools whose blocks are the same size but hold bytes in
/// a different order, which a raw copy would silently scramble.
fn check_compatible(local: &KvLayout, remote: &KvLayout) -> Result<(), PlanError> {
    if local.block_len() != remote.block_len() {
        return Err(mismatch("block_len", local.block_len(), remote.block_len()));
    }
    check_same_regions(local, remote)?;
    let (lp, rp) = (local.params(), remote.params());
    // NHD and HND are the same bytes when a block has one token or one head.
    let order_matters = |l: &KvLayout| {
        l.heads_per_rank() > 1 && l.block_size() > 1 && l.params().format == KvFormat::Nhd
    };
    if lp.format != rp.format && (order_matters(local) || order_matters(remote)) {
        return Err(mismatch("format", lp.format, rp.format));
    }
    Ok(())
}

/// Region count and kind, tokens per block and dtype: what both planners
/// need equal for a region's blocks to line up.
fn check_same_regions(local: &KvLayout, remote: &KvLayout) -> Result<(), PlanError> {
    if local.num_regions() != remote.num_regions() {
        return Err(mismatch(
            "num_regions",
            local.num_regions(),
            remote.num_regions(),
        ));
    }
    let (lp, rp) = (local.params(), remote.params());
    if lp.regions != rp.regions {
        return Err(mismatch("region kind", lp.regions, rp.regions));
    }
    if lp.block_size != rp.block_size {
        return Err(mismatch("block_size", lp.block_size, rp.block_size));
    }
    if lp.shape.dtype != rp.shape.dtype {
        return Err(mismatch("dtype", lp.shape.dtype, rp.shape.dtype));
    }
    Ok(())
}

fn check_ids(side: &'static str, ids: &[u32], num_blocks: u32) -> Result<(), PlanError> {
    if let Some(&block) = ids.iter().find(|&&b| b >= num_blocks) {
        return Err(PlanError::BlockOutOfRange {
            side,
            block,
            num_blocks,
        });
    }
    // One bit per block of the pool: linear, and no sort of shuffled ids.
    let mut seen = vec![0u64; (num_blocks as usize).div_ceil(64)];
    for &block in ids {
        let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
        if seen[word] & bit != 0 {
            return Err(PlanError::DuplicateBlock { side, block });
        }
        seen[word] |= bit;
    }
    Ok(())
}

/// One descriptor per (region, block pair), region-major and in the given
/// pair order within a region: what vLLM's NIXL connector issues.
pub fn plan_naive(
    local: &KvLayout,
    remote: &KvLayout,
    local_blocks: &[u32],
    remote_blocks: &[u32],
) -> Result<TransferPlan, PlanError> {
    validate(local, remote, local_blocks, remote_blocks)?;
    let block_len = local.block_len();
    let mut descs = Vec::with_capacity(local_blocks.len() * local.num_regions() as usize);
    for region in 0..local.num_regions() {
        descs.extend(local_blocks.iter().zip(remote_blocks).map(|(&l, &r)| Desc {
            local: local.block_offset(region, l),
            remote: remote.block_offset(region, r),
            len: block_len,
        }));
    }
    Ok(TransferPlan::from_descs(descs))
}

/// A run of pairs where both local and remote ids step by +1.
struct Run {
    local: u32,
    remote: u32,
    blocks: u32,
}

/// Maximal runs of the mapping, ordered by local id.
fn runs(local_blocks: &[u32], remote_blocks: &[u32]) -> Vec<Run> {
    let mut pairs: Vec<(u32, u32)> = local_blocks
        .iter()
        .copied()
        .zip(remote_blocks.iter().copied())
        .collect();
    pairs.sort_unstable();
    let mut runs: Vec<Run> = Vec::new();
    for (l, r) in pairs {
        match runs.last_mut() {
            // Ids are < num_blocks <= u32::MAX, so `+ blocks` cannot wrap.
            Some(run) if run.local + run.blocks == l && run.remote + run.blocks == r => {
                run.blocks += 1;
            }
            _ => runs.push(Run {
                local: l,
                remote: r,
                blocks: 1,
            }),
        }
    }
    runs
}

/// Pushes `d` split into pieces of at most `cap` bytes (`cap` is a multiple
/// of the block length, and so is every `d.len`).
fn push_capped(out: &mut Vec<Desc>, d: Desc, cap: u64) {
    let mut done = 0;
    while done < d.len {
        let len = cap.min(d.len - done);
        out.push(Desc {
            local: d.local + done,
            remote: d.remote + done,
            len,
        });
        done += len;
    }
}

/// Same bytes as [`plan_naive`] in fewer descriptors: pairs sorted by local
/// id, runs of consecutive ids on both sides merged per region, and (with
/// `merge_regions`) descriptors that continue across a region boundary on
/// both sides joined. Order stays region-major so a consumer can start on
/// layer 0 while later layers are in flight. No descriptor exceeds
/// `max(max_desc_bytes, block_len)` and every one is whole blocks.
pub fn plan_coalesced(
    local: &KvLayout,
    remote: &KvLayout,
    local_blocks: &[u32],
    remote_blocks: &[u32],
    opts: &PlanOptions,
) -> Result<TransferPlan, PlanError> {
    validate(local, remote, local_blocks, remote_blocks)?;
    let block_len = local.block_len();
    let cap = (opts.max_desc_bytes / block_len).max(1) * block_len;
    let runs = runs(local_blocks, remote_blocks);

    let mut descs = Vec::with_capacity(runs.len() * local.num_regions() as usize);
    // The descriptor being grown; it is only split by the cap once complete,
    // so merges across regions see the whole contiguous span.
    let mut pending: Option<Desc> = None;
    for region in 0..local.num_regions() {
        for run in &runs {
            let next = Desc {
                local: local.block_offset(region, run.local),
                remote: remote.block_offset(region, run.remote),
                len: u64::from(run.blocks) * block_len,
            };
            pending = match pending {
                // Runs are maximal, so within a region this only fires at a
                // region boundary.
                Some(p)
                    if opts.merge_regions
                        && p.local + p.len == next.local
                        && p.remote + p.len == next.remote =>
                {
                    Some(Desc {
                        len: p.len + next.len,
                        ..p
                    })
                }
                Some(p) => {
                    push_capped(&mut descs, p, cap);
                    Some(next)
                }
                None => Some(next),
            };
        }
    }
    if let Some(p) = pending {
        push_capped(&mut descs, p, cap);
    }
    Ok(TransferPlan::from_descs(descs))
}

/// Checks the mapping as the other planners do and keeps it as block ids
/// (no descriptors): for a backend that computes addresses on the device.
pub fn plan_blocks(
    local: &KvLayout,
    remote: &KvLayout,
    local_blocks: &[u32],
    remote_blocks: &[u32],
) -> Result<TransferPlan, PlanError> {
    validate(local, remote, local_blocks, remote_blocks)?;
    let blocks = BlockList {
        local: local_blocks.to_vec(),
        remote: remote_blocks.to_vec(),
        block_len: local.block_len(),
        regions: local.num_regions(),
        local_region_len: local.region_len(),
        remote_region_len: remote.region_len(),
    };
    Ok(TransferPlan {
        descs: Vec::new(),
        bytes: blocks.units() * blocks.block_len,
        blocks: Some(blocks),
    })
}

/// Plans with the planner `kind` names; `opts` only affects coalescing.
/// [`PlanKind::Blocks`] plans coalesced here: the agent calls
/// [`plan_blocks`] itself when the peer's backend runs block lists. Pools
/// of different TP sizes move the heads they share ([`plan_heads`]) with
/// any kind.
pub fn plan(
    kind: PlanKind,
    local: &KvLayout,
    remote: &KvLayout,
    local_blocks: &[u32],
    remote_blocks: &[u32],
    opts: &PlanOptions,
) -> Result<TransferPlan, PlanError> {
    if shards_differ(local, remote) {
        return plan_heads(local, remote, local_blocks, remote_blocks);
    }
    match kind {
        PlanKind::Naive => plan_naive(local, remote, local_blocks, remote_blocks),
        PlanKind::Coalesced | PlanKind::Blocks => {
            plan_coalesced(local, remote, local_blocks, remote_blocks, opts)
        }
    }
}

#[cfg(test)]
mod tests;
