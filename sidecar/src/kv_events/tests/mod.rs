//! Tests of the KV-events wire layer. The fixtures under
//! `tests/fixtures/kv_events/` come from real msgspec, cbor2 and pyzmq
//! (`gen.py` there); the interop tests drive pyzmq from the repository's
//! `.venv`.

mod codec;
mod hashing;
mod interop;
mod transport;
mod vllm_capture;

use std::path::PathBuf;

use serde_json::{json, Value};

use super::wire::{EventBatch, ExternalBlockHash, ExtraKey, KvEvent};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/kv_events")
}

fn fixture_json(name: &str) -> Value {
    let path = fixture_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The JSON form gen.py writes for what msgspec decoded.
fn batch_json(b: &EventBatch) -> Value {
    json!({
        "ts": b.ts,
        "data_parallel_rank": b.data_parallel_rank,
        "events": b.events.iter().map(event_json).collect::<Vec<_>>(),
    })
}

fn event_json(e: &KvEvent) -> Value {
    let hashes = |hs: &[ExternalBlockHash]| hs.iter().map(hash_json).collect::<Vec<_>>();
    match e {
        KvEvent::BlockStored(s) => json!({
            "type": "BlockStored",
            "block_hashes": hashes(&s.block_hashes),
            "parent_block_hash": s.parent_block_hash.as_ref().map(hash_json),
            "token_ids": s.token_ids,
            "block_size": s.block_size,
            "lora_id": s.lora_id,
            "medium": s.medium,
            "lora_name": s.lora_name,
            "extra_keys": s.extra_keys.as_ref().map(|ks| ks
                .iter()
                .map(|k| k.as_ref().map(|items| items.iter().map(key_json).collect::<Vec<_>>()))
                .collect::<Vec<_>>()),
            "group_idx": s.group_idx,
            "kv_cache_spec_kind": s.kv_cache_spec_kind,
            "kv_cache_spec_sliding_window": s.kv_cache_spec_sliding_window,
            "locality": s.locality,
            "ownership": s.ownership,
            "session_id": s.session_id,
            "lookahead_token_ids": s.lookahead_token_ids,
        }),
        KvEvent::BlockRemoved(r) => json!({
            "type": "BlockRemoved",
            "block_hashes": hashes(&r.block_hashes),
            "medium": r.medium,
            "group_idx": r.group_idx,
            "locality": r.locality,
            "ownership": r.ownership,
        }),
        KvEvent::AllBlocksCleared => json!({"type": "AllBlocksCleared"}),
    }
}

fn hash_json(h: &ExternalBlockHash) -> Value {
    match h {
        ExternalBlockHash::Int(v) => json!({"int": v}),
        ExternalBlockHash::Bytes(b) => json!({"bytes": hex(b)}),
    }
}

fn key_json(k: &ExtraKey) -> Value {
    match k {
        ExtraKey::Nil => Value::Null,
        ExtraKey::Bool(b) => json!({"bool": b}),
        ExtraKey::Int(i) => match (i64::try_from(*i), u64::try_from(*i)) {
            (Ok(v), _) => json!({"int": v}),
            (_, Ok(v)) => json!({"int": v}),
            _ => panic!("int out of range"),
        },
        ExtraKey::Float(f) => json!({"float": python_repr(*f)}),
        ExtraKey::Str(s) => json!({"str": s}),
        ExtraKey::Bytes(b) => json!({"bytes": hex(b)}),
        ExtraKey::Tuple(items) => json!({"tuple": items.iter().map(key_json).collect::<Vec<_>>()}),
        ExtraKey::Map(items) => {
            json!({"map": items.iter().map(|(k, v)| json!([key_json(k), key_json(v)])).collect::<Vec<_>>()})
        }
    }
}

/// Python's `repr` of a float, as gen.py writes floats.
fn python_repr(f: f64) -> String {
    match f {
        f if f.is_nan() => "nan".into(),
        f if f.is_infinite() => if f > 0.0 { "inf" } else { "-inf" }.into(),
        f if f == f.trunc() && f.abs() < 1e16 => format!("{f:.1}"),
        f => format!("{f:?}"),
    }
}

/// The inverse of [`key_json`], for hash inputs and CBOR vectors.
fn key_from_json(v: &Value) -> ExtraKey {
    let Some(obj) = v.as_object() else {
        assert!(v.is_null(), "{v}");
        return ExtraKey::Nil;
    };
    let (kind, val) = obj.iter().next().expect("one key");
    match kind.as_str() {
        "bool" => ExtraKey::Bool(val.as_bool().expect("bool")),
        "int" => ExtraKey::Int(match (val.as_i64(), val.as_u64()) {
            (Some(v), _) => v.into(),
            (_, Some(v)) => v.into(),
            _ => panic!("int {val}"),
        }),
        "float" => ExtraKey::Float(
            val.as_str()
                .and_then(|f| f.parse().ok())
                .expect("float as repr"),
        ),
        "str" => ExtraKey::Str(val.as_str().expect("str").to_owned()),
        "bytes" => ExtraKey::Bytes(unhex(val.as_str().expect("hex"))),
        "tuple" => ExtraKey::Tuple(
            val.as_array()
                .expect("list")
                .iter()
                .map(key_from_json)
                .collect(),
        ),
        "map" => ExtraKey::Map(
            val.as_array()
                .expect("pairs")
                .iter()
                .map(|p| (key_from_json(&p[0]), key_from_json(&p[1])))
                .collect(),
        ),
        other => panic!("unknown kind {other}"),
    }
}
