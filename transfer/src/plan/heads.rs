//! Plans between ranks of different tensor-parallel sizes.
//!
//! vLLM shards a layer's KV heads over its TP ranks ([`KvLayout::head_range`]),
//! so a prefill rank at one TP size and a decode rank at another hold
//! different heads, and their blocks are not the same bytes. What they share
//! is the heads both hold: a decode rank of a larger TP reads its slice of
//! one prefill rank's block; a decode rank of a smaller TP reads several
//! prefill ranks' whole blocks, one pull per rank, each into its slot of the
//! local block. Per block and region that is one range of each side in HND
//! order (K and V packed per head, or both halves of a fused block), one per
//! token in NHD order; ranges that continue on both sides are merged.

use super::{
    check_both_ids, check_lengths, check_same_regions, mismatch, Desc, PlanError, TransferPlan,
};
use crate::layout::KvLayout;

/// Whether two pools hold different shards of the heads (their TP sizes
/// differ), so a block of one is not a block of the other.
pub fn shards_differ(local: &KvLayout, remote: &KvLayout) -> bool {
    local.params().tp_size != remote.params().tp_size
}

/// The heads both ranks hold, as global head indices.
pub fn common_heads(
    local: &KvLayout,
    remote: &KvLayout,
) -> Result<std::ops::Range<u32>, PlanError> {
    let (l, r) = (local.head_range(), remote.head_range());
    let common = l.start.max(r.start)..l.end.min(r.end);
    if common.is_empty() {
        return Err(PlanError::LayoutMismatch(format!(
            "this rank (tp {}/{}) holds KV heads {}..{}, the peer's (tp {}/{}) {}..{}: none in common",
            local.params().tp_rank,
            local.params().tp_size,
            l.start,
            l.end,
            remote.params().tp_rank,
            remote.params().tp_size,
            r.start,
            r.end
        )));
    }
    Ok(common)
}

/// Everything but the head sharding must agree for a head's bytes to be
/// the same on both sides.
fn check_same_model(local: &KvLayout, remote: &KvLayout) -> Result<(), PlanError> {
    check_same_regions(local, remote)?;
    let (lp, rp) = (local.params(), remote.params());
    if lp.shape.head_dim != rp.shape.head_dim {
        return Err(mismatch("head_dim", lp.shape.head_dim, rp.shape.head_dim));
    }
    if lp.shape.kv_heads != rp.shape.kv_heads {
        return Err(mismatch("kv_heads", lp.shape.kv_heads, rp.shape.kv_heads));
    }
    // A head slice of an NHD block is one range per token, of an HND block
    // one range: the two orders pair up only when a block has one token.
    if lp.format != rp.format && lp.block_size > 1 {
        return Err(mismatch(
            "format (a TP-size change needs the same order on both sides)",
            lp.format,
            rp.format,
        ));
    }
    Ok(())
}

/// The heads both ranks hold, for every (region, block pair), in region-major
/// order; runs that continue on both sides are one descriptor.
pub fn plan_heads(
    local: &KvLayout,
    remote: &KvLayout,
    local_blocks: &[u32],
    remote_blocks: &[u32],
) -> Result<TransferPlan, PlanError> {
    check_lengths(local_blocks, remote_blocks)?;
    check_same_model(local, remote)?;
    check_both_ids(local, remote, local_blocks, remote_blocks)?;
    let common = common_heads(local, remote)?;
    let within = |l: &KvLayout| {
        let first = l.head_range().start;
        common.start - first..common.end - first
    };
    let bad = |e: crate::layout::LayoutError| PlanError::LayoutMismatch(e.to_string());
    let ls = local.block_slices(within(local)).map_err(bad)?;
    let rs = remote.block_slices(within(remote)).map_err(bad)?;
    // Same format, block size and region kind: the slices pair one to one.
    debug_assert!(ls.len() == rs.len() && ls.iter().zip(&rs).all(|(a, b)| a.1 == b.1));
    let mut descs: Vec<Desc> =
        Vec::with_capacity(local_blocks.len() * ls.len() * local.num_regions() as usize);
    for region in 0..local.num_regions() {
        // Never merged across a region boundary: regions may be separate allocations.
        let region_start = descs.len();
        for (&l, &r) in local_blocks.iter().zip(remote_blocks) {
            let (lb, rb) = (
                local.block_offset(region, l),
                remote.block_offset(region, r),
            );
            for (&(lo, len), &(ro, _)) in ls.iter().zip(&rs) {
                let d = Desc {
                    local: lb + lo,
                    remote: rb + ro,
                    len,
                };
                match descs[region_start..].last_mut() {
                    Some(p) if p.local + p.len == d.local && p.remote + p.len == d.remote => {
                        p.len += d.len;
                    }
                    _ => descs.push(d),
                }
            }
        }
    }
    Ok(TransferPlan::from_descs(descs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Dtype, KvFormat, LayoutParams, ModelShape, RegionKind};

    /// A rank's pool as vLLM fills it: every element named by (region, block,
    /// global head, token, element within the head's content).
    struct Pool {
        layout: KvLayout,
        bytes: Vec<u8>,
    }

    fn tag(region: u32, block: u32, head: u32, token: u32, e: u64) -> u8 {
        (region * 131 + block * 31 + head * 17 + token * 7 + e as u32 * 3) as u8
    }

    fn params(
        kv_heads: u32,
        tp: (u32, u32),
        regions: RegionKind,
        format: KvFormat,
    ) -> LayoutParams {
        let shape = ModelShape {
            name: "t".into(),
            layers: 2,
            kv_heads,
            head_dim: 4,
            dtype: Dtype::Bf16,
        };
        let mut p = LayoutParams::new(shape, 6);
        p.block_size = 3;
        (p.tp_rank, p.tp_size) = tp;
        p.regions = regions;
        p.format = format;
        p
    }

    impl Pool {
        /// Filled with `tag`s when `filled`, zeroes otherwise.
        fn new(p: LayoutParams, filled: bool) -> Pool {
            let layout = KvLayout::new(p).unwrap();
            let mut bytes = vec![0u8; layout.total_bytes() as usize];
            if filled {
                for region in 0..layout.num_regions() {
                    for block in 0..layout.num_blocks() {
                        for (head, token, e, at) in Pool::elements(&layout, region, block) {
                            bytes[at as usize] = tag(region, block, head, token, e);
                        }
                    }
                }
            }
            Pool { layout, bytes }
        }

        /// (global head, token, byte within the head's content, pool offset) of
        /// every byte of one block, from the layout's own definition.
        fn elements(l: &KvLayout, region: u32, block: u32) -> Vec<(u32, u32, u64, u64)> {
            let p = l.params();
            let (hpr, tokens) = (l.heads_per_rank(), p.block_size);
            let halves = if p.regions == RegionKind::Fused { 2 } else { 1 };
            let unit = l.block_len() / halves / u64::from(hpr) / u64::from(tokens);
            let first = l.head_range().start;
            let mut out = Vec::new();
            for half in 0..halves {
                for h in 0..hpr {
                    for t in 0..tokens {
                        for e in 0..unit {
                            let inner = match p.format {
                                KvFormat::Hnd => {
                                    (u64::from(h) * u64::from(tokens) + u64::from(t)) * unit
                                }
                                KvFormat::Nhd => {
                                    (u64::from(t) * u64::from(hpr) + u64::from(h)) * unit
                                }
                            };
                            let at = l.block_offset(region, block)
                                + half * (l.block_len() / 2)
                                + inner
                                + e;
                            out.push((first + h, t, half * unit + e, at));
                        }
                    }
                }
            }
            out
        }
    }

    #[test]
    fn every_tp_change_moves_exactly_the_heads_both_ranks_hold() {
        let local_blocks = [4, 0, 1, 5];
        let remote_blocks = [2, 3, 5, 0];
        for regions in [RegionKind::Packed, RegionKind::Fused, RegionKind::Split] {
            for format in [KvFormat::Hnd, KvFormat::Nhd] {
                for kv_heads in [1, 2, 4, 8] {
                    for (d, p) in [
                        (1, 2),
                        (2, 1),
                        (1, 4),
                        (4, 1),
                        (2, 4),
                        (4, 2),
                        (8, 2),
                        (2, 8),
                    ] {
                        for dr in 0..d {
                            let mut local =
                                Pool::new(params(kv_heads, (dr, d), regions, format), false);
                            let lh = local.layout.head_range();
                            let mut covered = 0;
                            for pr in 0..p {
                                let remote =
                                    Pool::new(params(kv_heads, (pr, p), regions, format), true);
                                let plan = match plan_heads(
                                    &local.layout,
                                    &remote.layout,
                                    &local_blocks,
                                    &remote_blocks,
                                ) {
                                    Ok(plan) => plan,
                                    Err(PlanError::LayoutMismatch(m))
                                        if m.contains("none in common") =>
                                    {
                                        continue
                                    }
                                    Err(e) => panic!("{e}"),
                                };
                                let rh = remote.layout.head_range();
                                covered += rh.end.min(lh.end) - rh.start.max(lh.start);
                                for dsc in &plan.descs {
                                    let (l, r, n) =
                                        (dsc.local as usize, dsc.remote as usize, dsc.len as usize);
                                    local.bytes[l..l + n].copy_from_slice(&remote.bytes[r..r + n]);
                                }
                            }
                            // With replicated heads several remote ranks hold the
                            // same one; the connector reads it once, this test
                            // copies it from each (the same bytes).
                            assert!(
                                covered >= lh.end - lh.start,
                                "{kv_heads} heads, d {dr}/{d}, p {p}"
                            );
                            let ctx =
                                format!("{regions} {format} heads {kv_heads} d {dr}/{d} p {p}");
                            for region in 0..local.layout.num_regions() {
                                for (i, &lb) in local_blocks.iter().enumerate() {
                                    for (head, token, e, at) in
                                        Pool::elements(&local.layout, region, lb)
                                    {
                                        assert_eq!(
                                            local.bytes[at as usize],
                                            tag(region, remote_blocks[i], head, token, e),
                                            "{ctx}: region {region} block {lb} head {head} token {token}"
                                        );
                                    }
                                }
                                // Blocks nobody asked for stay untouched.
                                for (_, _, _, at) in Pool::elements(&local.layout, region, 2) {
                                    assert_eq!(local.bytes[at as usize], 0, "{ctx}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_larger_decode_tp_reads_one_range_per_block_in_hnd() {
        // Prefill TP 1 (8 heads), decode rank 1 of TP 2: heads 4..8, the back half
        // of every packed HND block; consecutive blocks do not continue remotely.
        let remote = KvLayout::new(params(8, (0, 1), RegionKind::Packed, KvFormat::Hnd)).unwrap();
        let local = KvLayout::new(params(8, (1, 2), RegionKind::Packed, KvFormat::Hnd)).unwrap();
        let plan = plan_heads(&local, &remote, &[0, 1], &[3, 4]).unwrap();
        assert_eq!(plan.descs.len(), 2 * 2);
        // Local blocks 0 and 1 are one range locally but two remotely: two descriptors.
        assert_eq!(plan.descs[0].len, local.block_len());
        assert_eq!(
            plan.descs[0].remote,
            remote.block_offset(0, 3) + remote.block_len() / 2
        );
        assert_eq!(plan.bytes, 2 * 2 * local.block_len());
        // A smaller decode TP: rank 0 of TP 1 reads prefill rank 1 of TP 2 into its
        // back half of each block.
        let plan = plan_heads(&remote, &local, &[3], &[0]).unwrap();
        assert_eq!(
            plan.descs[0].local,
            remote.block_offset(0, 3) + remote.block_len() / 2
        );
        assert_eq!(plan.descs[0].len, local.block_len());
    }

    #[test]
    fn descriptors_never_span_two_regions() {
        // Two KV heads at TP 2 and TP 4: one head per rank either way (replicas at TP 4), so
        // rank 0 of each holds the same whole blocks, and the last block of a region and the
        // first of the next are adjacent on both sides.
        let local = KvLayout::new(params(2, (0, 4), RegionKind::Split, KvFormat::Hnd)).unwrap();
        let remote = KvLayout::new(params(2, (0, 2), RegionKind::Split, KvFormat::Hnd)).unwrap();
        let last = local.num_blocks() - 1;
        let plan = plan_heads(&local, &remote, &[0, last], &[0, last]).unwrap();
        for d in &plan.descs {
            let (first, _, _) = local.region_of(d.local).unwrap();
            let (end, _, _) = local.region_of(d.local + d.len - 1).unwrap();
            assert_eq!(first, end, "{d:?} spans regions {first} and {end}");
        }
        assert_eq!(plan.descs.len(), 2 * local.num_regions() as usize);
    }

    #[test]
    fn what_a_tp_change_cannot_move_is_refused_by_name() {
        let p = |kv, tp, format| params(kv, tp, RegionKind::Packed, format);
        let l = KvLayout::new(p(8, (0, 2), KvFormat::Hnd)).unwrap();
        let err = |r: LayoutParams| match plan_heads(&l, &KvLayout::new(r).unwrap(), &[0], &[0]) {
            Err(PlanError::LayoutMismatch(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(err(p(8, (0, 1), KvFormat::Nhd)).contains("format"));
        assert!(err(p(4, (0, 1), KvFormat::Hnd)).contains("kv_heads"));
        let mut other = p(8, (0, 1), KvFormat::Hnd);
        other.shape.head_dim = 8;
        assert!(err(other).contains("head_dim"));
        // Rank 0 of TP 2 holds heads 0..4; rank 2 of TP 4 holds 4..6.
        assert!(err(p(8, (2, 4), KvFormat::Hnd)).contains("none in common"));
        assert!(matches!(
            plan_heads(&l, &l, &[0, 1], &[0]),
            Err(PlanError::LengthMismatch { .. })
        ));
    }
}
