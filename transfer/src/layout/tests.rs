use super::*;

fn llama8b() -> ModelShape {
    ModelShape::preset("llama-3.1-8b").unwrap()
}

fn layout(params: LayoutParams) -> KvLayout {
    KvLayout::new(params).unwrap()
}

#[test]
fn llama_8b_worked_example() {
    let l = layout(LayoutParams::new(llama8b(), 512));
    assert_eq!(l.block_len(), 32 * 1024);
    assert_eq!(l.num_regions(), 64);
    assert_eq!(l.heads_per_rank(), 8);
    assert_eq!(l.bytes_per_block(), 2 * 1024 * 1024);
    // A 4096-token prompt: 256 blocks, 512 MiB of KV.
    let blocks = l.blocks_for_tokens(4096);
    assert_eq!(blocks, 256);
    assert_eq!(u64::from(blocks) * l.bytes_per_block(), 512 << 20);
    assert_eq!(l.bytes_per_token(), llama8b().bytes_per_token());
    assert_eq!(l.bytes_per_token(), 131_072);
    assert_eq!(l.region_len(), 512 * 32 * 1024);
    assert_eq!(l.total_bytes(), 1 << 30);
    assert_eq!(l.blocks_for_tokens(4097), 257);
    assert_eq!(l.blocks_for_tokens(0), 0);
}

#[test]
fn display_is_one_line() {
    let l = layout(LayoutParams::new(llama8b(), 512));
    assert_eq!(
        l.to_string(),
        "llama-3.1-8b bf16 HND split, 64 regions x 512 blocks x 32 KiB \
         (16 tok/block, tp 0/1, host), 1.00 GiB"
    );
}

#[test]
fn llama_70b_tensor_parallel() {
    let shape = ModelShape::preset("llama-3.1-70b").unwrap();
    let mut p = LayoutParams::new(shape, 100);
    p.tp_size = 4;
    p.tp_rank = 3;
    let l = layout(p.clone());
    assert_eq!(l.heads_per_rank(), 2);
    assert_eq!(l.block_len(), 8192);
    assert_eq!(l.num_regions(), 160);

    // More ranks than heads: each rank replicates one head.
    p.tp_size = 16;
    p.tp_rank = 15;
    assert_eq!(layout(p.clone()).heads_per_rank(), 1);

    p.tp_size = 3;
    p.tp_rank = 0;
    assert_eq!(
        KvLayout::new(p.clone()),
        Err(LayoutError::HeadsNotDivisible {
            kv_heads: 8,
            tp_size: 3
        })
    );

    // Replication needs every head to get the same number of ranks.
    p.tp_size = 12;
    assert_eq!(
        KvLayout::new(p.clone()),
        Err(LayoutError::HeadsNotDivisible {
            kv_heads: 8,
            tp_size: 12
        })
    );

    p.tp_size = 4;
    p.tp_rank = 4;
    assert_eq!(
        KvLayout::new(p),
        Err(LayoutError::BadTpRank {
            tp_rank: 4,
            tp_size: 4
        })
    );
}

#[test]
fn qwen_bytes_per_token() {
    let shape = ModelShape::preset("Qwen/Qwen3-0.6B").unwrap();
    assert_eq!(shape.bytes_per_token(), 114_688);
    assert_eq!(
        layout(LayoutParams::new(shape, 8)).bytes_per_token(),
        114_688
    );
}

#[test]
fn fused_doubles_block_len_and_halves_regions() {
    let split = layout(LayoutParams::new(llama8b(), 64));
    let mut p = LayoutParams::new(llama8b(), 64);
    p.regions = RegionKind::Fused;
    let fused = layout(p);
    assert_eq!(fused.block_len(), 2 * split.block_len());
    assert_eq!(fused.num_regions() * 2, split.num_regions());
    assert_eq!(fused.total_bytes(), split.total_bytes());
    assert_eq!(fused.bytes_per_token(), split.bytes_per_token());
    assert_eq!(fused.region_name(3), "layer3.kv");
    assert_eq!(split.region_name(6), "layer3.k");
    assert_eq!(split.region_name(7), "layer3.v");
}

#[test]
fn fp8_halves_block_len() {
    let mut shape = llama8b();
    shape.dtype = Dtype::Fp8;
    let fp8 = layout(LayoutParams::new(shape, 4));
    let bf16 = layout(LayoutParams::new(llama8b(), 4));
    assert_eq!(fp8.block_len() * 2, bf16.block_len());
}

#[test]
fn block_offsets_round_trip() {
    let mut p = LayoutParams::new(
        ModelShape::parse("layers=3,kv_heads=2,head_dim=4").unwrap(),
        5,
    );
    p.block_size = 3;
    let l = layout(p);
    assert_eq!(l.block_len(), 3 * 2 * 4 * 2);
    assert_eq!(l.region_offset(2), 2 * 5 * 48);
    assert_eq!(l.block_offset(2, 4), 2 * 5 * 48 + 4 * 48);
    for region in 0..l.num_regions() {
        for block in 0..l.num_blocks() {
            for inner in [0, 1, l.block_len() - 1] {
                let offset = l.block_offset(region, block) + inner;
                assert_eq!(l.region_of(offset), Some((region, block, inner)));
            }
        }
    }
    assert_eq!(l.region_of(l.total_bytes() - 1), Some((5, 4, 47)));
    assert_eq!(l.region_of(l.total_bytes()), None);
    assert_eq!(l.region_offset(l.num_regions()), l.total_bytes());
}

#[test]
fn head_slice_hnd_vs_nhd() {
    let mut p = LayoutParams::new(llama8b(), 4);
    let hnd = layout(p.clone());
    p.format = KvFormat::Nhd;
    let nhd = layout(p);
    let head = 128 * 2;

    let h = hnd.head_slice(2..5).unwrap();
    assert_eq!(h, vec![(2 * 16 * head, 3 * 16 * head)]);
    let n = nhd.head_slice(2..5).unwrap();
    assert_eq!(n.len(), 16);
    assert_eq!(n[0], (2 * head, 3 * head));
    assert_eq!(n[1], (8 * head + 2 * head, 3 * head));
    let total = |v: &[(u64, u64)]| v.iter().map(|r| r.1).sum::<u64>();
    assert_eq!(total(&h), total(&n));
    assert!(n.iter().all(|&(o, len)| o + len <= nhd.block_len()));

    // All heads: the whole block either way.
    assert_eq!(hnd.head_slice(0..8).unwrap(), vec![(0, hnd.block_len())]);
    assert_eq!(total(&nhd.head_slice(0..8).unwrap()), nhd.block_len());

    for bad in [3..3, 0..9, 8..9] {
        assert_eq!(
            hnd.head_slice(bad.clone()),
            Err(LayoutError::BadHeadRange {
                start: bad.start,
                end: bad.end,
                heads_per_rank: 8
            })
        );
    }
}

#[test]
fn head_ranges_follow_vllms_sharding_and_replication() {
    let ranks = |kv_heads: u32, tp: u32| -> Vec<std::ops::Range<u32>> {
        (0..tp)
            .map(|r| {
                let mut p = LayoutParams::new(
                    ModelShape::parse(&format!("layers=1,kv_heads={kv_heads},head_dim=8")).unwrap(),
                    4,
                );
                (p.tp_rank, p.tp_size) = (r, tp);
                layout(p).head_range()
            })
            .collect()
    };
    assert_eq!(ranks(8, 1), vec![0..8]);
    assert_eq!(ranks(8, 4), vec![0..2, 2..4, 4..6, 6..8]);
    // Fewer heads than ranks: each head on tp / kv_heads ranks in a row.
    assert_eq!(ranks(2, 4), vec![0..1, 0..1, 1..2, 1..2]);
    assert_eq!(ranks(1, 2), vec![0..1, 0..1]);
}

#[test]
fn packed_heads_carry_k_and_v_and_slice_as_one_range_per_block() {
    let mut p = LayoutParams::new(llama8b(), 4);
    p.regions = RegionKind::Packed;
    let packed = layout(p.clone());
    p.regions = RegionKind::Fused;
    let fused = layout(p.clone());
    assert_eq!(packed.block_len(), fused.block_len());
    assert_eq!(packed.num_regions(), fused.num_regions());
    assert_eq!(packed.region_name(2), "layer2.kv");
    assert_eq!("packed".parse::<RegionKind>().unwrap(), RegionKind::Packed);
    // Heads 2..5 of (heads, tokens, 2 * 128) bf16: one range.
    let head = 16 * 2 * 128 * 2;
    assert_eq!(
        packed.block_slices(2..5).unwrap(),
        vec![(2 * head, 3 * head)]
    );
    // Fused: the K half's range and the V half's.
    let half = fused.block_len() / 2;
    let k = 16 * 128 * 2;
    assert_eq!(
        fused.block_slices(2..5).unwrap(),
        vec![(2 * k, 3 * k), (half + 2 * k, 3 * k)]
    );
    // NHD packed: one range per token, each 3 heads of K and V.
    p.regions = RegionKind::Packed;
    p.format = KvFormat::Nhd;
    let nhd = layout(p);
    let per_token = 8 * 2 * 128 * 2;
    let s = nhd.block_slices(2..5).unwrap();
    assert_eq!(s.len(), 16);
    assert_eq!(s[1], (per_token + 2 * 2 * 128 * 2, 3 * 2 * 128 * 2));
}

#[test]
fn head_slice_fused_is_within_k_half() {
    let mut p = LayoutParams::new(llama8b(), 4);
    p.regions = RegionKind::Fused;
    p.format = KvFormat::Nhd;
    let l = layout(p);
    let ranges = l.head_slice(0..8).unwrap();
    let end = ranges.iter().map(|&(o, len)| o + len).max().unwrap();
    assert_eq!(end, l.block_len() / 2);
}

#[test]
fn parse_presets_by_alias() {
    for alias in [
        "llama-3.1-8b",
        "LLAMA-3.1-8B",
        "meta-llama/Llama-3.1-8B",
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "llama-3.1-8b-instruct",
    ] {
        assert_eq!(ModelShape::parse(alias).unwrap(), llama8b(), "{alias}");
    }
    assert_eq!(
        ModelShape::preset("meta-llama/Llama-3.1-70B-Instruct")
            .unwrap()
            .layers,
        80
    );
    assert_eq!(ModelShape::preset("qwen3-0.6b").unwrap().layers, 28);
    assert!(ModelShape::preset("llama-3.1-7b").is_none());
    for name in ModelShape::preset_names() {
        assert_eq!(ModelShape::preset(name).unwrap().name, *name);
    }
    assert_eq!(
        ModelShape::parse("gpt-5"),
        Err(LayoutError::UnknownModel("gpt-5".to_string()))
    );
}

#[test]
fn parse_custom_specs() {
    let s = ModelShape::parse("layers=32, kv_heads=8,head_dim=128").unwrap();
    assert_eq!(s.name, "custom");
    assert_eq!(s.dtype, Dtype::Bf16);
    assert_eq!(s.bytes_per_token(), llama8b().bytes_per_token());
    let s = ModelShape::parse("layers=2,kv_heads=1,head_dim=64,dtype=fp32,name=tiny").unwrap();
    assert_eq!((s.name.as_str(), s.dtype), ("tiny", Dtype::F32));

    let key_of = |spec: &str| match ModelShape::parse(spec) {
        Err(LayoutError::BadSpec { key, .. }) => key,
        other => panic!("{spec}: {other:?}"),
    };
    assert_eq!(key_of("layers=32,kv_heads=8"), "head_dim");
    assert_eq!(key_of("kv_heads=8,head_dim=128"), "layers");
    assert_eq!(key_of("layers=32,kv_heads=8,head_dim=128,heads=4"), "heads");
    assert_eq!(key_of("layers=0,kv_heads=8,head_dim=128"), "layers");
    assert_eq!(key_of("layers=32,kv_heads=x,head_dim=128"), "kv_heads");
    assert_eq!(
        key_of("layers=32,kv_heads=8,head_dim=128,dtype=q4"),
        "dtype"
    );
    assert_eq!(
        key_of("layers=1,layers=2,kv_heads=8,head_dim=128"),
        "layers"
    );
    let err = ModelShape::parse("layers=32,kv_heads=8,head_dim=0").unwrap_err();
    assert!(err.to_string().contains("head_dim"), "{err}");
}

#[test]
fn enums_parse_and_display() {
    for (s, d) in [
        ("fp16", Dtype::F16),
        ("float16", Dtype::F16),
        ("BF16", Dtype::Bf16),
        ("bfloat16", Dtype::Bf16),
        ("float32", Dtype::F32),
        ("f8", Dtype::Fp8),
        ("fp8_e4m3", Dtype::Fp8),
    ] {
        assert_eq!(s.parse::<Dtype>().unwrap(), d);
        assert_eq!(d.to_string().parse::<Dtype>().unwrap(), d);
    }
    assert_eq!(Dtype::Bf16.to_string(), "bf16");
    assert_eq!(
        [Dtype::F16, Dtype::Bf16, Dtype::F32, Dtype::Fp8].map(Dtype::bytes),
        [2, 2, 4, 1]
    );
    assert_eq!("Nhd".parse::<KvFormat>().unwrap(), KvFormat::Nhd);
    assert_eq!(KvFormat::Hnd.to_string(), "HND");
    assert_eq!("fused".parse::<RegionKind>().unwrap(), RegionKind::Fused);
    assert_eq!("cuda:3".parse::<MemKind>().unwrap(), MemKind::Gpu(3));
    assert_eq!("gpu:0".parse::<MemKind>().unwrap().to_string(), "gpu:0");
    assert_eq!("host".parse::<MemKind>().unwrap().to_string(), "host");
    assert!("gpu:".parse::<MemKind>().is_err());
    assert!("tpu:1".parse::<MemKind>().is_err());
    assert!("xyz".parse::<KvFormat>().is_err());
}

#[test]
fn zero_and_overflow_are_rejected() {
    let mut p = LayoutParams::new(llama8b(), 0);
    assert_eq!(
        KvLayout::new(p.clone()),
        Err(LayoutError::Zero("num_blocks"))
    );
    p.num_blocks = 1;
    p.block_size = 0;
    assert_eq!(
        KvLayout::new(p.clone()),
        Err(LayoutError::Zero("block_size"))
    );
    p.block_size = 16;
    p.tp_size = 0;
    assert_eq!(KvLayout::new(p.clone()), Err(LayoutError::Zero("tp_size")));
    let huge = ModelShape {
        name: "huge".to_string(),
        layers: u32::MAX,
        kv_heads: u32::MAX,
        head_dim: u32::MAX,
        dtype: Dtype::F32,
    };
    let mut p = LayoutParams::new(huge, u32::MAX);
    p.block_size = u32::MAX;
    assert_eq!(KvLayout::new(p), Err(LayoutError::Overflow));
}

#[test]
fn serde_round_trip_validates() {
    let l = layout(LayoutParams::new(llama8b(), 7));
    let json = serde_json::to_string(&l).unwrap();
    let back: KvLayout = serde_json::from_str(&json).unwrap();
    assert_eq!(back, l);
    let bad = json.replace("\"num_blocks\":7", "\"num_blocks\":0");
    assert!(serde_json::from_str::<KvLayout>(&bad).is_err());
}

#[test]
fn format_bytes_examples() {
    assert_eq!(format_bytes(0), "0 B");
    assert_eq!(format_bytes(123), "123 B");
    assert_eq!(format_bytes(32 * 1024), "32 KiB");
    assert_eq!(format_bytes(1536), "1.50 KiB");
    assert_eq!(format_bytes(512 << 20), "512 MiB");
    assert_eq!(format_bytes(1 << 30), "1.00 GiB");
    assert_eq!(format_bytes(3 << 29), "1.50 GiB");
    assert_eq!(format_bytes(u64::MAX), "16.00 EiB");
}
