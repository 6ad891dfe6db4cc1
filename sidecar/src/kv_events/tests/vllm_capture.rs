//! Messages real vLLM 0.26.0 published on an H200 (`hw-tests/vllm/capture_events.py`, recorded
//! by `hw-tests/vllm/run.sh`): every frame as it crossed the wire, hex-encoded, one JSON line per
//! multipart message (`kind` "pub" from the SUB socket, "replay" from a DEALER asking the replay
//! socket for everything from 0). Decoded by our decoder, checked against vLLM's own rules, and
//! fed through the router's index.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::fixture_dir;
use crate::kv_events::{decode_batch, KvEvent, END_SEQ};
use crate::router::kv_index::{KvIndex, StoredRun};

const CAPTURE: &str = "vllm-0.26.0-h200.jsonl";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// (kind, frames) of every captured message.
fn capture() -> Vec<(String, Vec<Vec<u8>>)> {
    let path = fixture_dir().join(CAPTURE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("capture line");
            let frames = v["frames"]
                .as_array()
                .expect("frames")
                .iter()
                .map(|f| unhex(f.as_str().expect("hex frame")))
                .collect();
            (v["kind"].as_str().expect("kind").to_string(), frames)
        })
        .collect()
}

#[test]
fn real_vllm_messages_decode_and_follow_vllms_rules() {
    let mut published: HashMap<(Vec<u8>, u64), Vec<u8>> = HashMap::new();
    let mut last: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut stored_runs = 0;
    for (kind, frames) in capture().iter().filter(|(k, _)| k == "pub") {
        assert_eq!(frames.len(), 3, "{kind}: topic, sequence, payload");
        let topic = &frames[0];
        assert!(topic.starts_with(b"kv@127.0.0.1:"), "{topic:?}");
        let seq = u64::from_be_bytes(frames[1].as_slice().try_into().expect("8-byte sequence"));
        if let Some(prev) = last.insert(topic.clone(), seq) {
            assert_eq!(seq, prev + 1, "sequence numbers follow one another");
        }
        let batch = decode_batch(&frames[2]).expect("real vLLM payload decodes");
        assert_eq!(batch.data_parallel_rank, Some(0));
        assert!(batch.ts > 1.7e9, "a Unix time");
        for e in &batch.events {
            if let KvEvent::BlockStored(s) = e {
                stored_runs += 1;
                assert_eq!(s.block_size, 16);
                assert!(
                    s.blocks().is_some(),
                    "token_ids cover the run's blocks exactly"
                );
                assert_eq!(s.medium.as_deref(), Some("GPU"));
                assert_eq!(s.kv_cache_spec_kind.as_deref(), Some("full_attention"));
            }
        }
        published.insert((topic.clone(), seq), frames[2].clone());
    }
    assert!(stored_runs > 0, "the capture holds stores");
    // The replay socket answers with the same payloads, then the end marker.
    let replays: Vec<_> = capture()
        .into_iter()
        .filter(|(k, _)| k == "replay")
        .collect();
    assert!(!replays.is_empty());
    let mut ends = 0;
    for (_, f) in replays {
        assert_eq!(f.len(), 4, "empty delimiter, topic, sequence, payload");
        assert!(f[0].is_empty());
        if f[2] == END_SEQ {
            ends += 1;
            continue;
        }
        let seq = u64::from_be_bytes(f[2].as_slice().try_into().unwrap());
        if let Some(p) = published.get(&(f[1].clone(), seq)) {
            assert_eq!(p, &f[3], "replayed payload {seq} is the published one");
        }
    }
    assert!(ends >= 1, "each replay ends with vLLM's end marker");
}

#[test]
fn the_router_index_follows_real_vllm_events() {
    // Every stored run chains from nothing or from a block stored before it on that engine.
    let idx = KvIndex::new(16, 1 << 20);
    let mut seen: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut indexed = 0;
    for (_, frames) in capture().iter().filter(|(k, _)| k == "pub") {
        let topic = String::from_utf8_lossy(&frames[0]).into_owned();
        let endpoint = topic.split('@').nth(1).unwrap().to_string();
        idx.set_synced(&endpoint, true);
        let batch = decode_batch(&frames[2]).unwrap();
        for e in &batch.events {
            match e {
                KvEvent::BlockStored(s) => {
                    let hashes: Vec<u64> = s.block_hashes.iter().map(|h| h.low64()).collect();
                    let parent = s.parent_block_hash.as_ref().map(|h| h.low64());
                    let known = seen.entry(endpoint.clone()).or_default();
                    if let Some(p) = parent {
                        assert!(known.contains(&p), "a parent vLLM stored before");
                    }
                    known.extend(&hashes);
                    let run = StoredRun {
                        dp_rank: 0,
                        medium: s.medium.as_deref(),
                        parent,
                        hashes: &hashes,
                        token_ids: &s.token_ids,
                        block_size: 16,
                        tagged: false,
                    };
                    indexed += idx.stored(&endpoint, &run).expect("indexed");
                }
                KvEvent::BlockRemoved(r) => {
                    let hashes: Vec<u64> = r.block_hashes.iter().map(|h| h.low64()).collect();
                    idx.removed(&endpoint, 0, r.medium.as_deref(), &hashes);
                }
                KvEvent::AllBlocksCleared => idx.cleared(&endpoint),
            }
        }
    }
    assert!(indexed > 0);
    // A stored run's own token ids, as a prompt, match on its engine.
    let (_, frames) = capture()
        .into_iter()
        .find(|(k, f)| {
            k == "pub"
                && decode_batch(&f[2]).unwrap().events.iter().any(|e| {
                    matches!(e, KvEvent::BlockStored(s) if s.parent_block_hash.is_none() && s.block_hashes.len() >= 2)
                })
        })
        .expect("a run from a prompt's start");
    let batch = decode_batch(&frames[2]).unwrap();
    let KvEvent::BlockStored(s) = batch
        .events
        .iter()
        .find(|e| matches!(e, KvEvent::BlockStored(s) if s.parent_block_hash.is_none()))
        .unwrap()
    else {
        unreachable!()
    };
    let bytes: Vec<u8> = s.token_ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    let keys = idx.prompt_hashes(&bytes, 1024);
    let topic = String::from_utf8_lossy(&frames[0]).into_owned();
    let endpoint = topic.split('@').nth(1).unwrap();
    let (n, _) = idx.matched(endpoint, &keys).expect("the engine is indexed");
    assert!(
        n >= 1,
        "the engine holds the run's first block by its events"
    );
}
