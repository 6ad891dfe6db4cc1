//! msgpack decoder for [`EventBatch`], laid out as vLLM's msgspec structs are.
//!
//! Decoding reads straight from the payload into the wire types: no
//! intermediate value tree, no recursion except inside `extra_keys` (bounded by
//! [`MAX_DEPTH`]), and no allocation sized by a length the payload claims
//! before the bytes are there. Like msgspec it skips unknown map keys and
//! extra trailing array elements and fills missing trailing optional fields
//! with `None`; unlike msgspec (which reads only the layout its structs
//! declare) it reads both layouts at both levels, and it also reads the oldest
//! `BlockStored` (five fields, no `medium`/`lora_name`).

use rmp::Marker;

use super::wire::{
    BlockRemoved, BlockStored, EventBatch, ExternalBlockHash, ExtraKey, KvEvent, REMOVED_FIELDS,
    STORED_FIELDS,
};

/// Deepest nesting accepted inside one `extra_keys` entry.
pub const MAX_DEPTH: usize = 32;

/// Why a payload is not a vLLM event batch. `at` is a byte offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload ends early (byte {at})")]
    Truncated { at: usize },
    #[error("invalid msgpack at byte {at}: {what}")]
    Malformed { at: usize, what: &'static str },
    #[error("byte {at}: `{field}` should be {expected}")]
    Type {
        at: usize,
        field: &'static str,
        expected: &'static str,
    },
    #[error("byte {at}: `{field}` is out of range")]
    Range { at: usize, field: &'static str },
    #[error("unknown event type {0:?}")]
    UnknownTag(String),
    #[error("`{tag}` lacks required field `{field}`")]
    MissingField {
        tag: &'static str,
        field: &'static str,
    },
    #[error("{0} bytes after the batch")]
    Trailing(usize),
}

type Result<T> = std::result::Result<T, DecodeError>;

/// Decodes one ZMQ payload (`KVEventBatch`), in either layout.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let at = r.pos;
    let mut batch = EventBatch::default();
    match r.head()? {
        Head::Array(n) => {
            if n < 2 {
                return Err(DecodeError::Type {
                    at,
                    field: "batch",
                    expected: "[ts, events, ...]",
                });
            }
            batch.ts = r.float("ts")?;
            batch.events = r.events()?;
            if n > 2 {
                batch.data_parallel_rank = r.opt(|r| r.uint("data_parallel_rank"))?;
            }
            for _ in 3..n {
                r.skip()?;
            }
        }
        Head::Map(n) => {
            let (mut ts, mut events) = (None, None);
            for _ in 0..n {
                match r.key()? {
                    "ts" => ts = Some(r.float("ts")?),
                    "events" => events = Some(r.events()?),
                    "data_parallel_rank" => {
                        batch.data_parallel_rank = r.opt(|r| r.uint("data_parallel_rank"))?
                    }
                    _ => r.skip()?,
                }
            }
            let missing = |field| DecodeError::MissingField {
                tag: "EventBatch",
                field,
            };
            batch.ts = ts.ok_or(missing("ts"))?;
            batch.events = events.ok_or(missing("events"))?;
        }
        _ => {
            return Err(DecodeError::Type {
                at,
                field: "batch",
                expected: "an array or a map",
            })
        }
    }
    match payload.len() - r.pos {
        0 => Ok(batch),
        n => Err(DecodeError::Trailing(n)),
    }
}

/// One msgpack value's header: scalars carry their value, containers and
/// strings their length.
enum Head {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(usize),
    Bin(usize),
    Array(usize),
    Map(usize),
    /// Extension: the type byte plus `usize` data bytes follow.
    Ext(usize),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(DecodeError::Truncated { at: self.buf.len() })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn be(&mut self, n: usize) -> Result<u64> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn head(&mut self) -> Result<Head> {
        let at = self.pos;
        let byte = self.take(1)?[0];
        Ok(match Marker::from_u8(byte) {
            Marker::Null => Head::Nil,
            Marker::True => Head::Bool(true),
            Marker::False => Head::Bool(false),
            Marker::FixPos(v) => Head::Int(v.into()),
            Marker::FixNeg(v) => Head::Int(v.into()),
            Marker::U8 => Head::Int(self.be(1)?.into()),
            Marker::U16 => Head::Int(self.be(2)?.into()),
            Marker::U32 => Head::Int(self.be(4)?.into()),
            Marker::U64 => Head::Int(self.be(8)?.into()),
            Marker::I8 => Head::Int((self.be(1)? as u8 as i8).into()),
            Marker::I16 => Head::Int((self.be(2)? as u16 as i16).into()),
            Marker::I32 => Head::Int((self.be(4)? as u32 as i32).into()),
            Marker::I64 => Head::Int((self.be(8)? as i64).into()),
            Marker::F32 => Head::Float(f32::from_bits(self.be(4)? as u32).into()),
            Marker::F64 => Head::Float(f64::from_bits(self.be(8)?)),
            Marker::FixStr(n) => Head::Str(n.into()),
            Marker::Str8 => Head::Str(self.be(1)? as usize),
            Marker::Str16 => Head::Str(self.be(2)? as usize),
            Marker::Str32 => Head::Str(self.be(4)? as usize),
            Marker::Bin8 => Head::Bin(self.be(1)? as usize),
            Marker::Bin16 => Head::Bin(self.be(2)? as usize),
            Marker::Bin32 => Head::Bin(self.be(4)? as usize),
            Marker::FixArray(n) => Head::Array(n.into()),
            Marker::Array16 => Head::Array(self.be(2)? as usize),
            Marker::Array32 => Head::Array(self.be(4)? as usize),
            Marker::FixMap(n) => Head::Map(n.into()),
            Marker::Map16 => Head::Map(self.be(2)? as usize),
            Marker::Map32 => Head::Map(self.be(4)? as usize),
            Marker::FixExt1 => Head::Ext(1),
            Marker::FixExt2 => Head::Ext(2),
            Marker::FixExt4 => Head::Ext(4),
            Marker::FixExt8 => Head::Ext(8),
            Marker::FixExt16 => Head::Ext(16),
            Marker::Ext8 => Head::Ext(self.be(1)? as usize),
            Marker::Ext16 => Head::Ext(self.be(2)? as usize),
            Marker::Ext32 => Head::Ext(self.be(4)? as usize),
            Marker::Reserved => {
                return Err(DecodeError::Malformed {
                    at,
                    what: "reserved byte 0xc1",
                })
            }
        })
    }

    /// Skips one whole value without recursing: `pending` counts the values
    /// still to skip, so nesting depth costs nothing.
    fn skip(&mut self) -> Result<()> {
        let mut pending: usize = 1;
        while pending > 0 {
            pending -= 1;
            match self.head()? {
                Head::Str(n) | Head::Bin(n) => drop(self.take(n)?),
                Head::Ext(n) => drop(self.take(n + 1)?),
                Head::Array(n) => pending = pending.saturating_add(n),
                Head::Map(n) => pending = pending.saturating_add(n.saturating_mul(2)),
                Head::Nil | Head::Bool(_) | Head::Int(_) | Head::Float(_) => {}
            }
        }
        Ok(())
    }

    /// `None` for nil, else `f`'s value.
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        if self.buf.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            return Ok(None);
        }
        f(self).map(Some)
    }

    fn int(&mut self, field: &'static str) -> Result<i128> {
        let at = self.pos;
        match self.head()? {
            Head::Int(v) => Ok(v),
            _ => Err(DecodeError::Type {
                at,
                field,
                expected: "an integer",
            }),
        }
    }

    fn uint<T: TryFrom<i128>>(&mut self, field: &'static str) -> Result<T> {
        let at = self.pos;
        T::try_from(self.int(field)?).map_err(|_| DecodeError::Range { at, field })
    }

    fn float(&mut self, field: &'static str) -> Result<f64> {
        let at = self.pos;
        match self.head()? {
            Head::Float(v) => Ok(v),
            // msgspec reads an int into a float field.
            Head::Int(v) => Ok(v as f64),
            _ => Err(DecodeError::Type {
                at,
                field,
                expected: "a number",
            }),
        }
    }

    fn str_ref(&mut self, field: &'static str) -> Result<&'a str> {
        let at = self.pos;
        match self.head()? {
            Head::Str(n) => {
                std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Malformed {
                    at,
                    what: "string is not UTF-8",
                })
            }
            _ => Err(DecodeError::Type {
                at,
                field,
                expected: "a string",
            }),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String> {
        self.str_ref(field).map(str::to_owned)
    }

    fn key(&mut self) -> Result<&'a str> {
        self.str_ref("map key")
    }

    /// An array header; `Vec` capacity is capped by the bytes left, since
    /// every element takes at least one.
    fn array(&mut self, field: &'static str) -> Result<(usize, usize)> {
        let at = self.pos;
        match self.head()? {
            Head::Array(n) => Ok((n, n.min(self.buf.len() - self.pos))),
            _ => Err(DecodeError::Type {
                at,
                field,
                expected: "an array",
            }),
        }
    }

    fn list<T>(
        &mut self,
        field: &'static str,
        mut f: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<Vec<T>> {
        let (n, cap) = self.array(field)?;
        let mut out = Vec::with_capacity(cap);
        for _ in 0..n {
            out.push(f(self)?);
        }
        Ok(out)
    }

    fn hash(&mut self, field: &'static str) -> Result<ExternalBlockHash> {
        let at = self.pos;
        match self.head()? {
            Head::Bin(n) => Ok(ExternalBlockHash::Bytes(self.take(n)?.to_vec())),
            Head::Int(v) => match u64::try_from(v) {
                Ok(v) => Ok(ExternalBlockHash::Int(v)),
                // Some producers send the same 64 bits as a signed i64
                // (two's complement); read them back as vLLM's unsigned value.
                Err(_) => i64::try_from(v)
                    .map(|v| ExternalBlockHash::Int(v as u64))
                    .map_err(|_| DecodeError::Range { at, field }),
            },
            _ => Err(DecodeError::Type {
                at,
                field,
                expected: "an integer or bytes",
            }),
        }
    }

    fn extra_key(&mut self, depth: usize) -> Result<ExtraKey> {
        let at = self.pos;
        if depth > MAX_DEPTH {
            return Err(DecodeError::Malformed {
                at,
                what: "extra_keys nested too deep",
            });
        }
        Ok(match self.head()? {
            Head::Nil => ExtraKey::Nil,
            Head::Bool(b) => ExtraKey::Bool(b),
            Head::Int(v) => ExtraKey::Int(v),
            Head::Float(v) => ExtraKey::Float(v),
            Head::Str(n) => ExtraKey::Str(
                std::str::from_utf8(self.take(n)?)
                    .map_err(|_| DecodeError::Malformed {
                        at,
                        what: "string is not UTF-8",
                    })?
                    .to_owned(),
            ),
            Head::Bin(n) => ExtraKey::Bytes(self.take(n)?.to_vec()),
            Head::Array(n) => {
                let mut items = Vec::with_capacity(n.min(self.buf.len() - self.pos));
                for _ in 0..n {
                    items.push(self.extra_key(depth + 1)?);
                }
                ExtraKey::Tuple(items)
            }
            Head::Map(n) => {
                let mut items = Vec::with_capacity(n.min(self.buf.len() - self.pos));
                for _ in 0..n {
                    items.push((self.extra_key(depth + 1)?, self.extra_key(depth + 1)?));
                }
                ExtraKey::Map(items)
            }
            Head::Ext(_) => {
                return Err(DecodeError::Type {
                    at,
                    field: "extra_keys",
                    expected: "no msgpack extension",
                })
            }
        })
    }

    fn events(&mut self) -> Result<Vec<KvEvent>> {
        self.list("events", Self::event)
    }

    fn event(&mut self) -> Result<KvEvent> {
        let at = self.pos;
        match self.head()? {
            Head::Array(0) => Err(DecodeError::Type {
                at,
                field: "event",
                expected: "a tag first",
            }),
            Head::Array(n) => {
                let tag = Tag::parse(self.str_ref("type")?)?;
                let mut fields = Fields::default();
                for i in 1..n {
                    match tag.fields().get(i - 1) {
                        Some(name) => fields.read(name, self)?,
                        None => self.skip()?,
                    }
                }
                fields.finish(tag)
            }
            Head::Map(n) => {
                let (mut tag, mut fields) = (None, Fields::default());
                for _ in 0..n {
                    match self.key()? {
                        "type" => tag = Some(Tag::parse(self.str_ref("type")?)?),
                        name => fields.read(name, self)?,
                    }
                }
                let tag = tag.ok_or(DecodeError::MissingField {
                    tag: "event",
                    field: "type",
                })?;
                fields.finish(tag)
            }
            _ => Err(DecodeError::Type {
                at,
                field: "event",
                expected: "an array or a map",
            }),
        }
    }
}

#[derive(Clone, Copy)]
enum Tag {
    Stored,
    Removed,
    Cleared,
}

impl Tag {
    fn parse(tag: &str) -> Result<Self> {
        match tag {
            "BlockStored" => Ok(Self::Stored),
            "BlockRemoved" => Ok(Self::Removed),
            "AllBlocksCleared" => Ok(Self::Cleared),
            other => Err(DecodeError::UnknownTag(other.to_owned())),
        }
    }

    fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Stored => &STORED_FIELDS,
            Self::Removed => &REMOVED_FIELDS,
            Self::Cleared => &[],
        }
    }
}

/// Every field any event has, read by name before the tag may be known (a
/// map can carry `"type"` last). `Option<Option<_>>`: absent vs sent as nil.
#[derive(Default)]
struct Fields {
    block_hashes: Option<Vec<ExternalBlockHash>>,
    parent_block_hash: Option<Option<ExternalBlockHash>>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u32>,
    lora_id: Option<Option<i64>>,
    medium: Option<String>,
    lora_name: Option<String>,
    extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    group_idx: Option<u32>,
    kv_cache_spec_kind: Option<String>,
    kv_cache_spec_sliding_window: Option<u32>,
    locality: Option<String>,
    ownership: Option<String>,
    session_id: Option<String>,
    lookahead_token_ids: Option<Vec<Vec<u32>>>,
}

impl Fields {
    fn read(&mut self, name: &str, r: &mut Reader<'_>) -> Result<()> {
        let s = |r: &mut Reader<'_>, f| r.opt(|r| r.string(f));
        match name {
            "block_hashes" => {
                self.block_hashes = Some(r.list("block_hashes", |r| r.hash("block_hashes"))?)
            }
            "parent_block_hash" => {
                self.parent_block_hash = Some(r.opt(|r| r.hash("parent_block_hash"))?)
            }
            "token_ids" => self.token_ids = Some(r.list("token_ids", |r| r.uint("token_ids"))?),
            "block_size" => self.block_size = Some(r.uint("block_size")?),
            "lora_id" => self.lora_id = Some(r.opt(|r| r.uint("lora_id"))?),
            "medium" => self.medium = s(r, "medium")?,
            "lora_name" => self.lora_name = s(r, "lora_name")?,
            "extra_keys" => {
                self.extra_keys = r.opt(|r| {
                    r.list("extra_keys", |r| {
                        r.opt(|r| r.list("extra_keys", |r| r.extra_key(1)))
                    })
                })?
            }
            "group_idx" => self.group_idx = r.opt(|r| r.uint("group_idx"))?,
            "kv_cache_spec_kind" => self.kv_cache_spec_kind = s(r, "kv_cache_spec_kind")?,
            "kv_cache_spec_sliding_window" => {
                self.kv_cache_spec_sliding_window =
                    r.opt(|r| r.uint("kv_cache_spec_sliding_window"))?
            }
            "locality" => self.locality = s(r, "locality")?,
            "ownership" => self.ownership = s(r, "ownership")?,
            "session_id" => self.session_id = s(r, "session_id")?,
            "lookahead_token_ids" => {
                self.lookahead_token_ids = r.opt(|r| {
                    r.list("lookahead_token_ids", |r| {
                        r.list("lookahead_token_ids", |r| r.uint("lookahead_token_ids"))
                    })
                })?
            }
            _ => r.skip()?,
        }
        Ok(())
    }

    fn finish(self, tag: Tag) -> Result<KvEvent> {
        let missing = |tag, field| DecodeError::MissingField { tag, field };
        Ok(match tag {
            Tag::Stored => {
                let t = "BlockStored";
                KvEvent::BlockStored(BlockStored {
                    block_hashes: self.block_hashes.ok_or(missing(t, "block_hashes"))?,
                    parent_block_hash: self
                        .parent_block_hash
                        .ok_or(missing(t, "parent_block_hash"))?,
                    token_ids: self.token_ids.ok_or(missing(t, "token_ids"))?,
                    block_size: self.block_size.ok_or(missing(t, "block_size"))?,
                    lora_id: self.lora_id.ok_or(missing(t, "lora_id"))?,
                    medium: self.medium,
                    lora_name: self.lora_name,
                    extra_keys: self.extra_keys,
                    group_idx: self.group_idx,
                    kv_cache_spec_kind: self.kv_cache_spec_kind,
                    kv_cache_spec_sliding_window: self.kv_cache_spec_sliding_window,
                    locality: self.locality,
                    ownership: self.ownership,
                    session_id: self.session_id,
                    lookahead_token_ids: self.lookahead_token_ids,
                })
            }
            Tag::Removed => KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: self
                    .block_hashes
                    .ok_or(missing("BlockRemoved", "block_hashes"))?,
                medium: self.medium,
                group_idx: self.group_idx,
                locality: self.locality,
                ownership: self.ownership,
            }),
            Tag::Cleared => KvEvent::AllBlocksCleared,
        })
    }
}
