//! vLLM's block hash against digests Python computed with cbor2 (gen.py).

use super::{fixture_json, hex, key_from_json};
use crate::kv_events::hash::{cbor, DEFAULT_NONE_HASH_SEED};
use crate::kv_events::{
    hash_block_tokens, none_hash, BlockHash, BlockHasher, ExternalBlockHash, ExtraKey, HashForm,
    UnsetSeed,
};

fn digest(hex_str: &str) -> BlockHash {
    let bytes = super::unhex(hex_str);
    BlockHash(bytes.try_into().expect("32 bytes"))
}

/// Each chain (several seeds, block sizes, extra keys of 0.26.0 and 0.33.0)
/// hashes to Python's digests and low-64-bit ints.
#[test]
fn chains_match_python() {
    let cases = fixture_json("hashes.json");
    let cases = cases.as_array().expect("list");
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let none = digest(case["none_hash"].as_str().expect("none_hash"));
        let unset = if case["era"] == "0.33" {
            UnsetSeed::FixedDefault
        } else {
            UnsetSeed::Random
        };
        match case["python_hash_seed"].as_str() {
            Some(seed) => assert_eq!(none_hash(Some(seed), unset), none, "{name}: NONE_HASH"),
            None if unset == UnsetSeed::FixedDefault => {
                assert_eq!(none_hash(None, unset), none, "{name}")
            }
            // 0.26.0 unset: random per process; the case carries the one it drew.
            None => assert_ne!(
                none_hash(None, unset),
                none,
                "{name}: random NONE_HASH repeated"
            ),
        }
        let tokens: Vec<u32> = case["token_ids"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| u32::try_from(t.as_u64().expect("u32")).expect("u32"))
            .collect();
        let block_size = case["block_size"].as_u64().expect("block_size") as usize;
        let hasher = BlockHasher::new(none, block_size);
        let got = match case["extra_keys"].as_array() {
            None => hasher.chain(None, &tokens),
            Some(extras) => {
                let extras: Vec<Option<Vec<ExtraKey>>> = extras
                    .iter()
                    .map(|e| {
                        e.as_array()
                            .map(|items| items.iter().map(key_from_json).collect())
                    })
                    .collect();
                hasher.chain_with_extra_keys(None, &tokens, &extras)
            }
        };
        let want: Vec<&str> = case["digests"]
            .as_array()
            .expect("digests")
            .iter()
            .map(|d| d.as_str().expect("hex"))
            .collect();
        let got_hex: Vec<String> = got.iter().map(|h| hex(&h.0)).collect();
        assert_eq!(got_hex, want, "{name}");
        let ints: Vec<u64> = case["ints"]
            .as_array()
            .expect("ints")
            .iter()
            .map(|i| i.as_u64().expect("u64"))
            .collect();
        assert_eq!(
            got.iter().map(BlockHash::low64).collect::<Vec<_>>(),
            ints,
            "{name}: int form"
        );
    }
}

/// A chain continued from a parent equals the same blocks hashed from the
/// start, and the one-block function agrees with the chainer.
#[test]
fn chain_continues_from_parent() {
    let none = none_hash(Some("0"), UnsetSeed::Random);
    let hasher = BlockHasher::new(none, 4);
    let tokens: Vec<u32> = (0..18).collect();
    let whole = hasher.chain(None, &tokens);
    assert_eq!(whole.len(), 4, "the partial last block is not hashed");
    let tail = hasher.chain(Some(&whole[1]), &tokens[8..]);
    assert_eq!(tail, whole[2..]);
    assert_eq!(
        hash_block_tokens(&none, Some(&whole[0]), &tokens[4..8], None),
        whole[1]
    );
    assert_eq!(hash_block_tokens(&none, None, &tokens[..4], None), whole[0]);
}

#[test]
fn none_hash_rules() {
    // Set: sha256_cbor of the string; unset: random (0.26.0) or the fixed seed (0.33.0).
    assert_eq!(
        none_hash(Some("x"), UnsetSeed::Random),
        none_hash(Some("x"), UnsetSeed::FixedDefault)
    );
    assert_ne!(
        none_hash(None, UnsetSeed::Random),
        none_hash(None, UnsetSeed::Random)
    );
    assert_eq!(
        none_hash(None, UnsetSeed::FixedDefault),
        none_hash(Some(DEFAULT_NONE_HASH_SEED), UnsetSeed::Random)
    );
    assert_ne!(
        none_hash(Some(""), UnsetSeed::Random),
        none_hash(None, UnsetSeed::FixedDefault)
    );
}

#[test]
fn int_form_is_low_64_bits_big_endian() {
    let mut d = [0u8; 32];
    d[0] = 0xff;
    d[24..].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let h = BlockHash(d);
    assert_eq!(h.low64(), 0x0102_0304_0506_0708);
    assert_eq!(
        h.external(HashForm::Int),
        ExternalBlockHash::Int(0x0102_0304_0506_0708)
    );
    assert_eq!(
        h.external(HashForm::Bytes),
        ExternalBlockHash::Bytes(d.to_vec())
    );
    // Both wire forms of one digest key the same in an index.
    assert_eq!(
        h.external(HashForm::Bytes).low64(),
        h.external(HashForm::Int).low64()
    );
    assert_eq!(ExternalBlockHash::Bytes(vec![1, 2]).low64(), 0x0102);
}

/// Our CBOR writer gives cbor2's canonical bytes for every kind of value.
#[test]
fn cbor_matches_cbor2() {
    let vectors = fixture_json("cbor.json");
    let vectors = vectors.as_array().expect("list");
    assert!(vectors.len() > 40);
    for v in vectors {
        let value = key_from_json(&v["value"]);
        let mut buf = Vec::new();
        cbor(&mut buf, &value);
        assert_eq!(hex(&buf), v["cbor"].as_str().expect("hex"), "{value:?}");
    }
    // Past what cbor.json holds: 32-bit lengths and bignums.
    let mut buf = Vec::new();
    cbor(&mut buf, &ExtraKey::Bytes(vec![0; 70_000]));
    assert_eq!(&buf[..5], &[0x5a, 0x00, 0x01, 0x11, 0x70]);
    buf.clear();
    cbor(&mut buf, &ExtraKey::Int(1 << 64));
    assert_eq!(hex(&buf), "c249010000000000000000");
    buf.clear();
    cbor(&mut buf, &ExtraKey::Int(-(1 << 64) - 1));
    assert_eq!(hex(&buf), "c349010000000000000000");
}
