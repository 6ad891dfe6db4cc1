//! msgpack encoder for [`EventBatch`], byte for byte as vLLM's msgspec
//! structs encode (engine-sim publishes with it).

use rmp::encode::{self as enc, ByteBuf};

use super::wire::{
    BlockRemoved, BlockStored, Encoding, EventBatch, ExternalBlockHash, ExtraKey, KvEvent,
    REMOVED_FIELDS, REMOVED_LEGACY_LEN, REMOVED_REQUIRED_LEN, STORED_FIELDS, STORED_LEGACY_LEN,
    STORED_REQUIRED_LEN, STORED_V0_33_FIRST,
};

/// Encodes a batch as vLLM's msgspec does: the batch `[ts, events, rank]`
/// (rank `nil` when `None`, as `array_like` writes defaults), each event in
/// `encoding`. Byte-identical to msgspec for the same values (for 0.33.0's
/// `BlockStored`, when one of its new fields is set: see `write_event`).
pub fn encode_batch(batch: &EventBatch, encoding: Encoding) -> Vec<u8> {
    let mut w = ByteBuf::with_capacity(64 + batch.events.len() * 64);
    let Ok(_) = enc::write_array_len(&mut w, 3);
    let Ok(_) = enc::write_f64(&mut w, batch.ts);
    let Ok(_) = enc::write_array_len(&mut w, len32(batch.events.len()));
    for event in &batch.events {
        write_event(&mut w, event, encoding);
    }
    match batch.data_parallel_rank {
        Some(rank) => write_int(&mut w, rank.into()),
        None => write_nil(&mut w),
    }
    w.into_vec()
}

/// A field's value, borrowed for writing; `None`-valued fields are the
/// defaults msgspec omits in a map.
enum Val<'a> {
    Hashes(&'a [ExternalBlockHash]),
    Hash(Option<&'a ExternalBlockHash>),
    Tokens(&'a [u32]),
    Int(Option<i128>),
    Str(Option<&'a str>),
    Extra(Option<&'a [Option<Vec<ExtraKey>>]>),
    Lookahead(Option<&'a [Vec<u32>]>),
}

impl Val<'_> {
    fn is_none(&self) -> bool {
        matches!(
            self,
            Val::Hash(None)
                | Val::Int(None)
                | Val::Str(None)
                | Val::Extra(None)
                | Val::Lookahead(None)
        )
    }
}

fn stored_vals(e: &BlockStored) -> [Val<'_>; 15] {
    let int = |v: Option<u32>| Val::Int(v.map(i128::from));
    [
        Val::Hashes(&e.block_hashes),
        Val::Hash(e.parent_block_hash.as_ref()),
        Val::Tokens(&e.token_ids),
        Val::Int(Some(e.block_size.into())),
        Val::Int(e.lora_id.map(i128::from)),
        Val::Str(e.medium.as_deref()),
        Val::Str(e.lora_name.as_deref()),
        Val::Extra(e.extra_keys.as_deref()),
        int(e.group_idx),
        Val::Str(e.kv_cache_spec_kind.as_deref()),
        int(e.kv_cache_spec_sliding_window),
        Val::Str(e.locality.as_deref()),
        Val::Str(e.ownership.as_deref()),
        Val::Str(e.session_id.as_deref()),
        Val::Lookahead(e.lookahead_token_ids.as_deref()),
    ]
}

fn removed_vals(e: &BlockRemoved) -> [Val<'_>; 5] {
    [
        Val::Hashes(&e.block_hashes),
        Val::Str(e.medium.as_deref()),
        Val::Int(e.group_idx.map(i128::from)),
        Val::Str(e.locality.as_deref()),
        Val::Str(e.ownership.as_deref()),
    ]
}

fn write_event(w: &mut ByteBuf, event: &KvEvent, encoding: Encoding) {
    let (names, vals, legacy, required): (&[&str], Vec<Val<'_>>, usize, usize) = match event {
        KvEvent::BlockStored(e) => (
            &STORED_FIELDS,
            stored_vals(e).into(),
            STORED_LEGACY_LEN,
            STORED_REQUIRED_LEN,
        ),
        KvEvent::BlockRemoved(e) => (
            &REMOVED_FIELDS,
            removed_vals(e).into(),
            REMOVED_LEGACY_LEN,
            REMOVED_REQUIRED_LEN,
        ),
        KvEvent::AllBlocksCleared => (&[], Vec::new(), 0, 0),
    };
    match encoding {
        Encoding::Map => {
            let keep = |i: usize, v: &Val<'_>| i < required || !v.is_none();
            let n = vals.iter().enumerate().filter(|(i, v)| keep(*i, v)).count() + 1;
            // msgspec sizes the header by the struct's declared entries: 0.33.0's
            // BlockStored (tag + 15 fields) always gets a map16 header. Written so
            // when a field only 0.33.0 has is set; 0.26.0's fit a fixmap.
            let v0_33 = matches!(event, KvEvent::BlockStored(_))
                && vals[STORED_V0_33_FIRST..].iter().any(|v| !v.is_none());
            if v0_33 && n < 16 {
                w.as_mut_vec().extend_from_slice(&[0xde, 0, n as u8]);
            } else {
                let Ok(_) = enc::write_map_len(w, len32(n));
            }
            write_str(w, "type");
            write_str(w, event.tag());
            for (i, (name, v)) in names.iter().zip(&vals).enumerate() {
                if keep(i, v) {
                    write_str(w, name);
                    write_val(w, v);
                }
            }
        }
        Encoding::Array => {
            let set = vals.iter().rposition(|v| !v.is_none()).map_or(0, |i| i + 1);
            let n = set.max(legacy).min(vals.len());
            let Ok(_) = enc::write_array_len(w, len32(n + 1));
            write_str(w, event.tag());
            for v in &vals[..n] {
                write_val(w, v);
            }
        }
    }
}

fn write_val(w: &mut ByteBuf, v: &Val<'_>) {
    match v {
        Val::Hashes(hs) => {
            let Ok(_) = enc::write_array_len(w, len32(hs.len()));
            for h in *hs {
                write_hash(w, h);
            }
        }
        Val::Hash(Some(h)) => write_hash(w, h),
        Val::Tokens(ts) => write_tokens(w, ts),
        Val::Int(Some(i)) => write_int(w, *i),
        Val::Str(Some(s)) => write_str(w, s),
        Val::Extra(Some(keys)) => {
            let Ok(_) = enc::write_array_len(w, len32(keys.len()));
            for k in *keys {
                match k {
                    Some(items) => write_keys(w, items),
                    None => write_nil(w),
                }
            }
        }
        Val::Lookahead(Some(lists)) => {
            let Ok(_) = enc::write_array_len(w, len32(lists.len()));
            for l in *lists {
                write_tokens(w, l);
            }
        }
        Val::Hash(None)
        | Val::Int(None)
        | Val::Str(None)
        | Val::Extra(None)
        | Val::Lookahead(None) => write_nil(w),
    }
}

fn write_keys(w: &mut ByteBuf, items: &[ExtraKey]) {
    let Ok(_) = enc::write_array_len(w, len32(items.len()));
    for item in items {
        write_key(w, item);
    }
}

fn write_key(w: &mut ByteBuf, key: &ExtraKey) {
    match key {
        ExtraKey::Nil => write_nil(w),
        ExtraKey::Bool(b) => {
            let Ok(()) = enc::write_bool(w, *b);
        }
        ExtraKey::Int(i) => write_int(w, *i),
        ExtraKey::Float(f) => {
            let Ok(()) = enc::write_f64(w, *f);
        }
        ExtraKey::Str(s) => write_str(w, s),
        ExtraKey::Bytes(b) => {
            let Ok(()) = enc::write_bin(w, b);
        }
        ExtraKey::Tuple(items) => write_keys(w, items),
        ExtraKey::Map(items) => {
            let Ok(_) = enc::write_map_len(w, len32(items.len()));
            for (k, v) in items {
                write_key(w, k);
                write_key(w, v);
            }
        }
    }
}

fn write_hash(w: &mut ByteBuf, h: &ExternalBlockHash) {
    match h {
        ExternalBlockHash::Int(v) => {
            let Ok(_) = enc::write_uint(w, *v);
        }
        ExternalBlockHash::Bytes(b) => {
            let Ok(()) = enc::write_bin(w, b);
        }
    }
}

fn write_tokens(w: &mut ByteBuf, ts: &[u32]) {
    let Ok(_) = enc::write_array_len(w, len32(ts.len()));
    for &t in ts {
        let Ok(_) = enc::write_uint(w, t.into());
    }
}

/// msgpack's smallest form, as msgspec writes Python ints; values outside
/// msgpack's range (only constructible by hand) are clamped to it.
fn write_int(w: &mut ByteBuf, v: i128) {
    if v >= 0 {
        let Ok(_) = enc::write_uint(w, u64::try_from(v).unwrap_or(u64::MAX));
    } else {
        let Ok(_) = enc::write_sint(w, i64::try_from(v).unwrap_or(i64::MIN));
    }
}

fn write_str(w: &mut ByteBuf, s: &str) {
    let Ok(()) = enc::write_str(w, s);
}

fn write_nil(w: &mut ByteBuf) {
    let Ok(()) = enc::write_nil(w);
}

/// msgpack lengths are 32-bit; nothing we encode comes near that.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
