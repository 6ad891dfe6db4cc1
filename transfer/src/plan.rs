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
//! block kernel), so nothing is planned on the host. Offsets are relative
//! to each side's pool base.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::layout::{KvFormat, KvLayout};

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
    if local_blocks.len() != remote_blocks.len() {
        return Err(PlanError::LengthMismatch {
            local: local_blocks.len(),
            remote: remote_blocks.len(),
        });
    }
    check_compatible(local, remote)?;
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
    // NHD and HND are the same bytes when a block has one token or one head.
    let order_matters = |l: &KvLayout| {
        l.heads_per_rank() > 1 && l.block_size() > 1 && l.params().format == KvFormat::Nhd
    };
    if lp.format != rp.format && (order_matters(local) || order_matters(remote)) {
        return Err(mismatch("format", lp.format, rp.format));
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
/// [`plan_blocks`] itself when the peer's backend runs block lists.
pub fn plan(
    kind: PlanKind,
    local: &KvLayout,
    remote: &KvLayout,
    local_blocks: &[u32],
    remote_blocks: &[u32],
    opts: &PlanOptions,
) -> Result<TransferPlan, PlanError> {
    match kind {
        PlanKind::Naive => plan_naive(local, remote, local_blocks, remote_blocks),
        PlanKind::Coalesced | PlanKind::Blocks => {
            plan_coalesced(local, remote, local_blocks, remote_blocks, opts)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Dtype, LayoutParams, ModelShape, RegionKind};
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn llama(num_blocks: u32) -> KvLayout {
        let shape = ModelShape::preset("llama-3.1-8b").unwrap();
        KvLayout::new(LayoutParams::new(shape, num_blocks)).unwrap()
    }

    fn ids(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn contiguous_prompt_coalesces_per_region() {
        let (local, remote) = (llama(1024), llama(2048));
        let lb = ids(100..356);
        let rb = ids(1000..1256);
        let naive = plan_naive(&local, &remote, &lb, &rb).unwrap();
        assert_eq!(naive.len(), 256 * 64);
        assert_eq!(naive.bytes, 512 * MIB);
        assert_eq!(naive.max_desc_len(), 32 * 1024);
        // Region-major, given order within a region.
        assert_eq!(naive.descs[1].local, local.block_offset(0, 101));
        assert_eq!(naive.descs[256].local, local.block_offset(1, 100));

        let opts = PlanOptions::default();
        let c = plan_coalesced(&local, &remote, &lb, &rb, &opts).unwrap();
        assert_eq!(c.len(), 64);
        assert_eq!(c.bytes, 512 * MIB);
        assert!(c.descs.iter().all(|d| d.len == 8 * MIB));
        assert_eq!(c.descs[0].local, local.block_offset(0, 100));
        assert_eq!(c.descs[0].remote, remote.block_offset(0, 1000));
        assert_eq!(c.descs[63].local, local.block_offset(63, 100));
        assert_eq!(
            plan(PlanKind::Coalesced, &local, &remote, &lb, &rb, &opts).unwrap(),
            c
        );
        assert_eq!(
            plan(PlanKind::Naive, &local, &remote, &lb, &rb, &opts).unwrap(),
            naive
        );
    }

    #[test]
    fn whole_pool_merges_across_regions() {
        let (local, remote) = (llama(256), llama(256));
        let all = ids(0..256);
        for cap in [64 * MIB, 100 * MIB, 8 * MIB, 3 * MIB, u64::MAX] {
            let opts = PlanOptions {
                max_desc_bytes: cap,
                merge_regions: true,
            };
            let c = plan_coalesced(&local, &remote, &all, &all, &opts).unwrap();
            assert_eq!(c.bytes, 512 * MIB);
            assert_eq!(c.len() as u64, (512 * MIB).div_ceil(cap), "cap {cap}");
            assert!(c.max_desc_len() <= cap);
            assert_eq!(
                c.descs[0],
                Desc {
                    local: 0,
                    remote: 0,
                    len: c.max_desc_len()
                }
            );
        }
        // Without region merging the region boundary is kept.
        let opts = PlanOptions {
            max_desc_bytes: u64::MAX,
            merge_regions: false,
        };
        let c = plan_coalesced(&local, &remote, &all, &all, &opts).unwrap();
        assert_eq!(c.len(), 64);
    }

    #[test]
    fn cap_is_respected_in_whole_blocks() {
        let (local, remote) = (llama(512), llama(512));
        let lb = ids(0..256);
        let rb = ids(256..512);
        let block = local.block_len();
        for (cap, per_region) in [(MIB, 8), (MIB + 1, 8), (MIB - 1, 9), (1, 256), (0, 256)] {
            let opts = PlanOptions {
                max_desc_bytes: cap,
                merge_regions: true,
            };
            let c = plan_coalesced(&local, &remote, &lb, &rb, &opts).unwrap();
            assert_eq!(c.len(), 64 * per_region, "cap {cap}");
            assert!(c.max_desc_len() <= cap.max(block));
            assert!(c.descs.iter().all(|d| d.len % block == 0));
            assert_eq!(c.bytes, 512 * MIB);
        }
    }

    #[test]
    fn random_permutation_never_needs_more_descriptors() {
        let (local, remote) = (llama(300), llama(300));
        // A fixed pseudo-random permutation (LCG), so the test is stable.
        let mut rb = ids(0..300);
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for i in (1..rb.len()).rev() {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            rb.swap(i, (state >> 33) as usize % (i + 1));
        }
        let lb = ids(0..300);
        let naive = plan_naive(&local, &remote, &lb, &rb).unwrap();
        let c = plan_coalesced(&local, &remote, &lb, &rb, &PlanOptions::default()).unwrap();
        assert!(c.len() <= naive.len());
        assert_eq!(c.bytes, naive.bytes);
    }

    #[test]
    fn empty_mapping_is_an_empty_plan() {
        let l = llama(4);
        let c = plan_coalesced(&l, &l, &[], &[], &PlanOptions::default()).unwrap();
        assert!(c.is_empty());
        assert_eq!(c.bytes, 0);
        assert_eq!(c.max_desc_len(), 0);
        assert!(c.chunks(4).is_empty());
        assert!(plan_naive(&l, &l, &[], &[]).unwrap().is_empty());
    }

    #[test]
    fn errors() {
        let l = llama(8);
        let opts = PlanOptions::default();
        let both = |lb: &[u32], rb: &[u32], remote: &KvLayout| {
            let n = plan_naive(&l, remote, lb, rb);
            let c = plan_coalesced(&l, remote, lb, rb, &opts);
            assert_eq!(n.clone().map(|_| ()), c.map(|_| ()));
            n.map(|_| ())
        };
        assert_eq!(
            both(&[0, 1], &[0], &l),
            Err(PlanError::LengthMismatch {
                local: 2,
                remote: 1
            })
        );
        assert_eq!(
            both(&[0, 8], &[0, 1], &l),
            Err(PlanError::BlockOutOfRange {
                side: "local",
                block: 8,
                num_blocks: 8
            })
        );
        assert_eq!(
            both(&[0, 1], &[9, 1], &l),
            Err(PlanError::BlockOutOfRange {
                side: "remote",
                block: 9,
                num_blocks: 8
            })
        );
        assert_eq!(
            both(&[3, 1, 3], &[0, 1, 2], &l),
            Err(PlanError::DuplicateBlock {
                side: "local",
                block: 3
            })
        );
        assert_eq!(
            both(&[0, 1, 2], &[5, 5, 2], &l),
            Err(PlanError::DuplicateBlock {
                side: "remote",
                block: 5
            })
        );

        let mut p = l.params().clone();
        p.tp_size = 2;
        let half_heads = KvLayout::new(p).unwrap();
        match both(&[0], &[0], &half_heads) {
            Err(PlanError::LayoutMismatch(msg)) => {
                assert!(
                    msg.contains("block_len 32768") && msg.contains("16384"),
                    "{msg}"
                )
            }
            other => panic!("{other:?}"),
        }
        let mut p = l.params().clone();
        p.shape.layers = 16;
        let fewer_layers = KvLayout::new(p).unwrap();
        match both(&[0], &[0], &fewer_layers) {
            Err(PlanError::LayoutMismatch(msg)) => {
                assert!(
                    msg.contains("num_regions 64") && msg.contains("32"),
                    "{msg}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Same block_len, but NHD vs HND order: a raw copy would scramble it.
        let mut p = l.params().clone();
        p.format = KvFormat::Nhd;
        let nhd = KvLayout::new(p).unwrap();
        assert!(matches!(
            both(&[0], &[0], &nhd),
            Err(PlanError::LayoutMismatch(_))
        ));
        // Same block_len from fp8 with twice the heads.
        let mut p = l.params().clone();
        p.shape.dtype = Dtype::Fp8;
        p.shape.kv_heads = 16;
        let fp8 = KvLayout::new(p).unwrap();
        assert_eq!(fp8.block_len(), l.block_len());
        assert!(matches!(
            both(&[0], &[0], &fp8),
            Err(PlanError::LayoutMismatch(_))
        ));

        assert_eq!(
            "Coalesced".parse::<PlanKind>().unwrap(),
            PlanKind::Coalesced
        );
        assert_eq!(PlanKind::Naive.to_string(), "naive");
        assert!(matches!(
            "fast".parse::<PlanKind>(),
            Err(PlanError::UnknownKind(_))
        ));
    }

    #[test]
    fn chunks_balance_bytes() {
        let descs: Vec<Desc> = (0..10)
            .map(|i| Desc {
                local: i * 10,
                remote: i * 10,
                len: 10,
            })
            .collect();
        let plan = TransferPlan::from_descs(descs);
        let sizes = |n| plan.chunks(n).iter().map(|c| c.len()).collect::<Vec<_>>();
        assert_eq!(sizes(0), vec![10]);
        assert_eq!(sizes(1), vec![10]);
        assert_eq!(sizes(2), vec![5, 5]);
        assert_eq!(sizes(3), vec![4, 3, 3]);
        assert_eq!(sizes(10), vec![1; 10]);
        assert_eq!(sizes(50), vec![1; 10]);

        // One huge descriptor first: it fills several shares on its own.
        let mut descs = vec![Desc {
            local: 0,
            remote: 0,
            len: 1000,
        }];
        descs.extend((1..5).map(|i| Desc {
            local: 1000 + i,
            remote: 1000 + i,
            len: 1,
        }));
        let plan = TransferPlan::from_descs(descs);
        let parts = plan.chunks(4);
        assert!(parts.len() <= 4 && parts.iter().all(|p| !p.is_empty()));
        assert_eq!(parts.concat(), plan.descs);
    }

    /// A small random layout pair and block mapping.
    #[derive(Debug, Clone)]
    struct Case {
        local: KvLayout,
        remote: KvLayout,
        local_blocks: Vec<u32>,
        remote_blocks: Vec<u32>,
        opts: PlanOptions,
    }

    /// SplitMix64: derives a whole block map from one proptest seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u32) -> u32 {
            (self.next() % u64::from(n.max(1))) as u32
        }

        fn shuffle(&mut self, v: &mut [u32]) {
            for i in (1..v.len()).rev() {
                let j = self.below(i as u32 + 1) as usize;
                v.swap(i, j);
            }
        }

        /// `k` distinct ids from `0..n`, in random order.
        fn distinct(&mut self, n: u32, k: usize) -> Vec<u32> {
            let mut all: Vec<u32> = (0..n).collect();
            self.shuffle(&mut all);
            all.truncate(k);
            all
        }
    }

    fn block_map(nl: u32, nr: u32, mode: u8, seed: u64) -> (Vec<u32>, Vec<u32>) {
        let mut rng = Rng(seed);
        let most = nl.min(nr);
        match mode {
            // Unrelated random subsets.
            0 => {
                let k = rng.below(most + 1) as usize;
                (rng.distinct(nl, k), rng.distinct(nr, k))
            }
            // Sorted random subsets: dense ones form long runs.
            1 => {
                let k = rng.below(most + 1) as usize;
                let (mut l, mut r) = (rng.distinct(nl, k), rng.distinct(nr, k));
                l.sort_unstable();
                r.sort_unstable();
                (l, r)
            }
            // Runs with occasional gaps, pairs sometimes given shuffled.
            2 => {
                let (mut l, mut r) = (rng.below(nl / 4 + 1), rng.below(nr / 4 + 1));
                let mut pairs = Vec::new();
                while l < nl && r < nr {
                    pairs.push((l, r));
                    if rng.below(4) == 0 {
                        l += 1 + rng.below(3);
                        r += 1 + rng.below(3);
                    } else {
                        l += 1;
                        r += 1;
                    }
                }
                if rng.below(2) == 0 {
                    pairs.reverse();
                }
                pairs.into_iter().unzip()
            }
            // Identity over a prefix (the whole pool when nl == nr).
            _ => ((0..most).collect(), (0..most).collect()),
        }
    }

    fn case() -> impl Strategy<Value = Case> {
        let geometry = (
            1u32..=6,
            any::<bool>(),
            prop::sample::select(vec![1u32, 2, 3, 16]),
            1u32..=4,
            prop::sample::select(vec![1u32, 2, 8]),
            prop::sample::select(vec![Dtype::Fp8, Dtype::Bf16, Dtype::F32]),
        );
        let mapping = (1u32..64, 1u32..64, any::<bool>(), 0u8..4, any::<u64>());
        let options = (0u8..4, 1u64..64, any::<bool>());
        (geometry, mapping, options).prop_map(
            |(
                (layers, fused, block_size, kv_heads, head_dim, dtype),
                (nl, nr, same_size, mode, seed),
                (cap_kind, cap_blocks, merge_regions),
            )| {
                let nr = if same_size { nl } else { nr };
                let shape = ModelShape {
                    name: "prop".to_string(),
                    layers,
                    kv_heads,
                    head_dim,
                    dtype,
                };
                let make = |num_blocks| {
                    let mut p = LayoutParams::new(shape.clone(), num_blocks);
                    p.block_size = block_size;
                    p.regions = if fused {
                        RegionKind::Fused
                    } else {
                        RegionKind::Split
                    };
                    KvLayout::new(p).unwrap()
                };
                let (local, remote) = (make(nl), make(nr));
                let block_len = local.block_len();
                let max_desc_bytes = match cap_kind {
                    0 => u64::MAX,
                    // Often below one block or between multiples of it.
                    1 => cap_blocks * block_len / 8,
                    2 => cap_blocks * block_len,
                    _ => PlanOptions::default().max_desc_bytes,
                };
                let (local_blocks, remote_blocks) = block_map(nl, nr, mode, seed);
                Case {
                    local,
                    remote,
                    local_blocks,
                    remote_blocks,
                    opts: PlanOptions {
                        max_desc_bytes,
                        merge_regions,
                    },
                }
            },
        )
    }

    /// Every descriptor cut into block-sized (local, remote) pairs, sorted.
    fn block_units(plan: &TransferPlan, block_len: u64) -> Vec<(u64, u64)> {
        let mut units: Vec<(u64, u64)> = plan
            .descs
            .iter()
            .flat_map(|d| {
                (0..d.len / block_len)
                    .map(move |j| (d.local + j * block_len, d.remote + j * block_len))
            })
            .collect();
        units.sort_unstable();
        units
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn coalesced_moves_exactly_the_naive_bytes(c in case()) {
            let (l, r) = (&c.local, &c.remote);
            let naive = plan_naive(l, r, &c.local_blocks, &c.remote_blocks).unwrap();
            let plan = plan_coalesced(l, r, &c.local_blocks, &c.remote_blocks, &c.opts).unwrap();
            let block_len = l.block_len();

            // (1) same bytes, and the recorded total is right.
            prop_assert_eq!(plan.bytes, naive.bytes);
            prop_assert_eq!(plan.bytes, plan.descs.iter().map(|d| d.len).sum::<u64>());
            // (4) whole blocks, within the effective cap.
            let cap = c.opts.max_desc_bytes.max(block_len);
            for d in &plan.descs {
                prop_assert!(d.len > 0 && d.len % block_len == 0 && d.len <= cap, "{:?}", d);
                // (5) inside both pools.
                prop_assert!(d.local + d.len <= l.total_bytes());
                prop_assert!(d.remote + d.len <= r.total_bytes());
                if !c.opts.merge_regions {
                    prop_assert_eq!(d.local / l.region_len(), (d.local + d.len - 1) / l.region_len());
                }
            }
            // (2) the same (local, remote) block pairs, each exactly once.
            prop_assert_eq!(block_units(&plan, block_len), block_units(&naive, block_len));
            // (3) no local range overlaps another.
            let mut ranges: Vec<(u64, u64)> = plan.descs.iter().map(|d| (d.local, d.local + d.len)).collect();
            ranges.sort_unstable();
            prop_assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
            // (6) never more descriptors than naive.
            prop_assert!(plan.len() <= naive.len());
            // Region-major: a descriptor never starts in an earlier region
            // than the one before it.
            let regions: Vec<u64> = plan.descs.iter().map(|d| d.local / l.region_len()).collect();
            prop_assert!(regions.windows(2).all(|w| w[0] <= w[1]));
            // (7) chunks partition the descriptors in order.
            for n in 0..6 {
                let parts = plan.chunks(n);
                prop_assert!(parts.len() <= n.max(1));
                prop_assert!(parts.iter().all(|p| !p.is_empty()));
                prop_assert_eq!(parts.concat(), plan.descs.clone());
            }
        }

        #[test]
        fn a_block_list_is_the_naive_plan_without_descriptors(c in case()) {
            let (l, r) = (&c.local, &c.remote);
            let naive = plan_naive(l, r, &c.local_blocks, &c.remote_blocks).unwrap();
            let plan = plan_blocks(l, r, &c.local_blocks, &c.remote_blocks).unwrap();
            let blocks = plan.blocks.as_ref().unwrap();
            prop_assert!(plan.descs.is_empty());
            prop_assert_eq!(plan.bytes, naive.bytes);
            prop_assert_eq!(plan.len(), naive.len());
            // The device's arithmetic gives exactly the naive descriptors.
            prop_assert_eq!(blocks.descs().collect::<Vec<_>>(), naive.descs.clone());
            // Extents bound every byte and are reached.
            let (le, re) = blocks.extents();
            prop_assert_eq!(le, naive.descs.iter().map(|d| d.local + d.len).max().unwrap_or(0));
            prop_assert_eq!(re, naive.descs.iter().map(|d| d.remote + d.len).max().unwrap_or(0));
            prop_assert!(le <= l.total_bytes() && re <= r.total_bytes());
        }
    }

    #[test]
    fn block_lists_are_checked_like_plans() {
        let l = llama(64);
        let r = llama(32);
        assert!(matches!(
            plan_blocks(&l, &r, &[0, 1], &[40, 2]),
            Err(PlanError::BlockOutOfRange { side: "remote", .. })
        ));
        assert!(matches!(
            plan_blocks(&l, &r, &[3, 3], &[1, 2]),
            Err(PlanError::DuplicateBlock { side: "local", .. })
        ));
        assert!(plan_blocks(&l, &r, &[], &[]).unwrap().is_empty());
        assert_eq!("blocks".parse::<PlanKind>().unwrap(), PlanKind::Blocks);
        // Without a device to run it, a block list plans coalesced.
        let opts = PlanOptions::default();
        assert_eq!(
            plan(PlanKind::Blocks, &l, &r, &[0, 1], &[4, 5], &opts).unwrap(),
            plan_coalesced(&l, &r, &[0, 1], &[4, 5], &opts).unwrap()
        );
    }
}
