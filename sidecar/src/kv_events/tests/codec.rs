//! Decoder and encoder against payloads msgspec wrote (gen.py).

use super::{batch_json, fixture_dir, fixture_json, unhex};
use crate::kv_events::{
    decode_batch, encode_batch, BlockRemoved, BlockStored, DecodeError, Encoding, EventBatch,
    ExternalBlockHash, ExtraKey, KvEvent,
};

fn payload(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(format!("{name}.msgpack"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every fixture decodes to exactly what msgspec decoded from it.
#[test]
fn decodes_every_fixture_as_msgspec_does() {
    let expected = fixture_json("expected.json");
    let expected = expected.as_object().expect("map");
    assert!(
        expected.len() >= 5,
        "fixtures missing: {:?}",
        expected.keys()
    );
    for (name, want) in expected {
        let batch = decode_batch(&payload(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&batch_json(&batch), want, "{name}");
    }
}

/// Re-encoding a fixture in its own layout gives msgspec's bytes back.
#[test]
fn encodes_byte_identical_to_msgspec() {
    for (name, encoding) in [
        ("h200_v0_26", Encoding::Map),
        ("mixed_v0_26", Encoding::Map),
        ("bytes_v0_33", Encoding::Map),
        ("legacy_array", Encoding::Array),
    ] {
        let bytes = payload(name);
        let batch = decode_batch(&bytes).expect(name);
        assert_eq!(encode_batch(&batch, encoding), bytes, "{name}");
    }
}

/// The shape real vLLM 0.26.0 sent on the H200: one BlockStored of 38 blocks.
#[test]
fn h200_capture_shape() {
    let batch = decode_batch(&payload("h200_v0_26")).expect("decodes");
    assert_eq!(batch.data_parallel_rank, Some(0));
    let [KvEvent::BlockStored(ev)] = batch.events.as_slice() else {
        panic!("one BlockStored expected: {:?}", batch.events);
    };
    assert_eq!(ev.block_hashes.len(), 38);
    assert!(ev
        .block_hashes
        .iter()
        .all(|h| matches!(h, ExternalBlockHash::Int(_))));
    assert_eq!(ev.token_ids.len(), 608);
    assert_eq!(ev.parent_block_hash, None);
    assert_eq!(ev.extra_keys, Some(vec![None; 38]));
    assert_eq!(ev.group_idx, Some(0));
    assert_eq!(ev.kv_cache_spec_kind.as_deref(), Some("full_attention"));
    assert_eq!(ev.medium.as_deref(), Some("GPU"));
    assert_eq!(ev.blocks().map(Iterator::count), Some(38));
}

/// Everything msgspec refuses, we refuse too, with an error and no panic.
#[test]
fn rejects_what_msgspec_rejects() {
    let cases = fixture_json("malformed.json");
    let cases = cases.as_object().expect("map");
    assert!(cases.len() >= 6);
    for (name, case) in cases {
        let bytes = unhex(case["payload"].as_str().expect("hex"));
        let err = decode_batch(&bytes).expect_err(name);
        let ok = match name.as_str() {
            "truncated" => matches!(err, DecodeError::Truncated { .. }),
            "trailing_bytes" => matches!(err, DecodeError::Trailing(1)),
            "unknown_tag" => err == DecodeError::UnknownTag("BlockMoved".into()),
            "missing_required" => matches!(
                err,
                DecodeError::MissingField {
                    field: "parent_block_hash",
                    ..
                }
            ),
            _ => true,
        };
        assert!(ok, "{name}: {err}");
    }
}

/// Every prefix and single-byte corruption of real payloads: errors, never
/// a panic, and never an allocation sized by a forged length.
#[test]
fn never_panics_on_corrupt_input() {
    for name in [
        "h200_v0_26",
        "mixed_v0_26",
        "bytes_v0_33",
        "legacy_array",
        "tolerance_mixed",
    ] {
        let good = payload(name);
        for end in 0..good.len() {
            assert!(
                decode_batch(&good[..end]).is_err(),
                "{name} prefix {end} decoded"
            );
        }
        let mut x: u32 = 0x9e37_79b9;
        for i in 0..good.len() {
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let mut bad = good.clone();
                bad[i] = x as u8;
                let _ = decode_batch(&bad);
            }
        }
    }
    // Forged 4-billion-element containers and deep nesting.
    for forged in [
        &[
            0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff,
        ][..],
        &[0x92, 0x00, 0xdf, 0xff, 0xff, 0xff, 0xff][..],
    ] {
        assert!(decode_batch(forged).is_err());
    }
    let mut deep = vec![0x93, 0x00, 0x91, 0x83, 0xa4, b't', b'y', b'p', b'e', 0xac];
    deep.extend_from_slice(b"BlockRemoved");
    deep.extend_from_slice(&[0xac]);
    deep.extend_from_slice(b"block_hashes");
    deep.push(0x90);
    deep.extend_from_slice(&[0xa6]);
    deep.extend_from_slice(b"future");
    deep.extend(std::iter::repeat_n(0x91, 100_000));
    deep.push(0xc0);
    deep.push(0xc0);
    let batch = decode_batch(&deep).expect("an unknown field is skipped however deep");
    assert_eq!(batch.events.len(), 1);
    let mut deep_keys = vec![0x93, 0x00, 0x91, 0x82, 0xa4, b't', b'y', b'p', b'e', 0xab];
    deep_keys.extend_from_slice(b"BlockStored");
    deep_keys.extend_from_slice(&[0xaa]);
    deep_keys.extend_from_slice(b"extra_keys");
    deep_keys.extend([0x91, 0x91]);
    deep_keys.extend(std::iter::repeat_n(0x91, 10_000));
    deep_keys.push(0xc0);
    assert!(matches!(
        decode_batch(&deep_keys),
        Err(DecodeError::Malformed { .. })
    ));
}

/// Older vLLM's five-field BlockStored and one-field BlockRemoved, which
/// msgspec with newer structs would refuse, still decode.
#[test]
fn reads_the_oldest_event_shapes() {
    let mut w = vec![0x93, 0xcb];
    w.extend_from_slice(&1.5f64.to_bits().to_be_bytes());
    w.push(0x93);
    w.extend_from_slice(&[0x96, 0xab]);
    w.extend_from_slice(b"BlockStored");
    w.extend_from_slice(&[0x91, 0x07, 0xc0, 0x92, 0x01, 0x02, 0x02, 0xc0]);
    w.extend_from_slice(&[0x92, 0xac]);
    w.extend_from_slice(b"BlockRemoved");
    w.extend_from_slice(&[0x91, 0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
    w.extend_from_slice(&[0x91, 0xb0]);
    w.extend_from_slice(b"AllBlocksCleared");
    w.push(0xc0);
    let batch = decode_batch(&w).expect("decodes");
    let stored = BlockStored {
        block_hashes: vec![ExternalBlockHash::Int(7)],
        token_ids: vec![1, 2],
        block_size: 2,
        ..Default::default()
    };
    // A signed -2 is the unsigned 2^64-2 some producers mean by it.
    let removed = BlockRemoved {
        block_hashes: vec![ExternalBlockHash::Int(u64::MAX - 1)],
        ..Default::default()
    };
    assert_eq!(
        batch,
        EventBatch {
            ts: 1.5,
            events: vec![
                KvEvent::BlockStored(stored),
                KvEvent::BlockRemoved(removed),
                KvEvent::AllBlocksCleared
            ],
            data_parallel_rank: None,
        }
    );
}

/// Both layouts round-trip every field, including extra keys of every kind.
#[test]
fn round_trips_both_layouts() {
    let stored = BlockStored {
        block_hashes: vec![
            ExternalBlockHash::Int(u64::MAX),
            ExternalBlockHash::Bytes(vec![1; 32]),
        ],
        parent_block_hash: Some(ExternalBlockHash::Int(3)),
        token_ids: (0..32).map(|i| i * 40_000).collect(),
        block_size: 16,
        lora_id: Some(-4),
        medium: Some("CPU".into()),
        lora_name: Some("l".into()),
        extra_keys: Some(vec![
            Some(vec![
                ExtraKey::Str("s".into()),
                ExtraKey::Int(-(1 << 40)),
                ExtraKey::Int(u64::MAX.into()),
                ExtraKey::Float(0.5),
                ExtraKey::Bool(true),
                ExtraKey::Nil,
                ExtraKey::Bytes(vec![0; 3]),
                ExtraKey::Tuple(vec![ExtraKey::Str("mm".into()), ExtraKey::Int(5)]),
                ExtraKey::Map(vec![(ExtraKey::Str("k".into()), ExtraKey::Int(1))]),
            ]),
            None,
        ]),
        group_idx: Some(2),
        kv_cache_spec_kind: Some("mamba".into()),
        kv_cache_spec_sliding_window: Some(128),
        locality: Some("REMOTE".into()),
        ownership: Some("o".into()),
        session_id: Some("s".into()),
        lookahead_token_ids: Some(vec![vec![1, 2], vec![]]),
    };
    let removed = BlockRemoved {
        block_hashes: vec![ExternalBlockHash::Bytes(vec![9; 16])],
        medium: None,
        group_idx: None,
        locality: None,
        ownership: Some("o".into()),
    };
    let batch = EventBatch {
        ts: 1_767_225_600.125,
        events: vec![
            KvEvent::BlockStored(stored),
            KvEvent::BlockRemoved(removed),
            KvEvent::AllBlocksCleared,
        ],
        data_parallel_rank: Some(7),
    };
    for encoding in [Encoding::Map, Encoding::Array] {
        assert_eq!(
            decode_batch(&encode_batch(&batch, encoding)),
            Ok(batch.clone()),
            "{encoding:?}"
        );
    }
}
