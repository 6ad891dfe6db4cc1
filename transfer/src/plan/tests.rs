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
            (0..d.len / block_len).map(move |j| (d.local + j * block_len, d.remote + j * block_len))
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
