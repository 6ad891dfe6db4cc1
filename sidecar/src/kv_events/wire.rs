//! vLLM's KV-event types with vLLM's field names (`vllm/distributed/kv_events.py`).
//!
//! One type covers every vLLM release we know: fields a release lacks are
//! `None`. Field order is 0.33.0's, which only appends to older releases, so
//! the positional (array) form reads by the same list.

/// A block hash as vLLM sends it (`ExternalBlockHash = bytes | int`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExternalBlockHash {
    /// `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, vLLM's default: the digest read
    /// as a big-endian integer, masked to its low 64 bits.
    Int(u64),
    /// `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`: the raw digest (32 bytes for
    /// `sha256`/`sha256_cbor`, 16 for the xxhash variants).
    Bytes(Vec<u8>),
}

impl ExternalBlockHash {
    /// The low 64 bits of the digest: the same number for both forms of one
    /// hash, so an index can key on `u64` whichever form an engine sends.
    /// For `Bytes` these are the last 8 bytes, big-endian (shorter digests are
    /// zero-extended).
    pub fn low64(&self) -> u64 {
        match self {
            Self::Int(v) => *v,
            Self::Bytes(b) => {
                let tail = &b[b.len().saturating_sub(8)..];
                tail.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
            }
        }
    }
}

/// One element of a block's `extra_keys` tuple: whatever vLLM put there (LoRA
/// name, `(mm identifier, offset)`, cache salt, prompt-embeds digest, ...).
/// The same values feed [`super::hash`], which encodes them as cbor2 does.
#[derive(Clone, Debug, PartialEq)]
pub enum ExtraKey {
    Nil,
    Bool(bool),
    /// msgpack carries -2^63 ..= 2^64-1; `i128` holds both ends.
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// A Python tuple or list (both travel as arrays).
    Tuple(Vec<ExtraKey>),
    /// A Python dict, in wire order. vLLM sends none today; kept so such a
    /// payload decodes as msgspec would.
    Map(Vec<(ExtraKey, ExtraKey)>),
}

/// `BlockStored`: a run of full blocks the engine cached, chained from
/// `parent_block_hash` (`None`: the run starts the prompt).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<ExternalBlockHash>,
    pub parent_block_hash: Option<ExternalBlockHash>,
    /// `block_size` tokens per entry of `block_hashes`, in order.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    /// Deprecated by vLLM in favour of `lora_name`; still sent.
    pub lora_id: Option<i64>,
    /// `"GPU"`, `"CPU"`, ... (0.26.0 also names `"FS"`/`"OBJ"`, 0.33.0 `"STORAGE"`).
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    /// One entry per block; `None` entries for blocks without extra keys.
    pub extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    /// The KV-cache group; hybrid models emit one event per group.
    pub group_idx: Option<u32>,
    /// 0.26.0+: e.g. `"full_attention"`, `"sliding_window"`.
    pub kv_cache_spec_kind: Option<String>,
    pub kv_cache_spec_sliding_window: Option<u32>,
    /// 0.26.0+: `"LOCAL"`/`"REMOTE"` relative to the publisher.
    pub locality: Option<String>,
    /// 0.33.0+.
    pub ownership: Option<String>,
    /// 0.33.0+.
    pub session_id: Option<String>,
    /// 0.33.0+: tokens after each block that its hash also covers.
    pub lookahead_token_ids: Option<Vec<Vec<u32>>>,
}

impl BlockStored {
    /// Each block's hash with its `block_size` tokens, when `token_ids` holds
    /// exactly that many per hash (as vLLM sends them); `None` otherwise.
    pub fn blocks(&self) -> Option<impl Iterator<Item = (&ExternalBlockHash, &[u32])>> {
        let size = self.block_size as usize;
        (size > 0 && self.token_ids.len() == size * self.block_hashes.len()).then(|| {
            self.block_hashes
                .iter()
                .zip(self.token_ids.chunks_exact(size))
        })
    }
}

/// `BlockRemoved`: blocks the engine evicted from `medium`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<ExternalBlockHash>,
    pub medium: Option<String>,
    pub group_idx: Option<u32>,
    /// 0.26.0+.
    pub locality: Option<String>,
    /// 0.33.0+.
    pub ownership: Option<String>,
}

/// One KV-cache event; the msgspec tag is the variant's name.
#[derive(Clone, Debug, PartialEq)]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    /// The engine dropped its whole prefix cache (`reset_prefix_cache`).
    AllBlocksCleared,
}

impl KvEvent {
    /// The msgspec tag vLLM writes for this event.
    pub fn tag(&self) -> &'static str {
        match self {
            Self::BlockStored(_) => "BlockStored",
            Self::BlockRemoved(_) => "BlockRemoved",
            Self::AllBlocksCleared => "AllBlocksCleared",
        }
    }
}

/// `KVEventBatch`: the events of one scheduler step, one ZMQ message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventBatch {
    /// `time.time()` on the engine when the step's events were collected.
    pub ts: f64,
    pub events: Vec<KvEvent>,
    /// Set by vLLM's publisher to its data-parallel rank (0 without DP).
    pub data_parallel_rank: Option<u32>,
}

/// How events are laid out; the batch itself is always a positional array,
/// as in every vLLM release.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// vLLM 0.26.0 and 0.33.0: each event a map tagged by `"type"`, fields by
    /// name, optional fields left out when `None` (msgspec `omit_defaults`).
    #[default]
    Map,
    /// Older vLLM (msgspec `array_like`): each event an array, tag first, then
    /// every field in order (`array_like` writes defaults too). Fields newer
    /// than the legacy set are written only up to the last one set.
    Array,
}

/// Which form [`ExternalBlockHash`] a publisher sends, as vLLM's
/// `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` chooses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HashForm {
    /// `=1` (default): low 64 bits as an unsigned int.
    #[default]
    Int,
    /// `=0`: the raw digest.
    Bytes,
}

/// Field names of `BlockStored` in wire order (0.33.0's; older releases stop
/// earlier). The first five are in every release and are required.
pub(crate) const STORED_FIELDS: [&str; 15] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
];
/// `BlockStored` fields in the last array-like releases (through `group_idx`).
pub(crate) const STORED_LEGACY_LEN: usize = 9;
/// The first `BlockStored` field only 0.33.0 has (`ownership`).
pub(crate) const STORED_V0_33_FIRST: usize = 12;
/// `BlockStored` fields without a default: written even when `None`.
pub(crate) const STORED_REQUIRED_LEN: usize = 7;

/// Field names of `BlockRemoved` in wire order; `block_hashes` is required.
pub(crate) const REMOVED_FIELDS: [&str; 5] = [
    "block_hashes",
    "medium",
    "group_idx",
    "locality",
    "ownership",
];
pub(crate) const REMOVED_LEGACY_LEN: usize = 3;
pub(crate) const REMOVED_REQUIRED_LEN: usize = 2;
