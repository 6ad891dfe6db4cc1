//! vLLM's prefix-cache block hash with `--prefix-caching-hash-algo sha256_cbor`.
//!
//! vLLM (`vllm/v1/core/kv_cache_utils.py::hash_block_tokens`) hashes each full
//! block as `sha256(cbor2.dumps((parent, tuple(token_ids), extra_keys),
//! canonical=True))`, with `parent` the previous block's 32-byte digest or,
//! for a prompt's first block, `NONE_HASH`. The few CBOR types involved are
//! written here by hand, byte for byte as cbor2's canonical mode does (tested
//! against cbor2's own bytes); no CBOR crate is needed for them.
//!
//! vLLM's default algorithm is `sha256`, which hashes a *pickle* of the same
//! tuple; only `sha256_cbor` (and `xxhash_cbor`) is reproducible outside
//! Python, which is what this module implements.

use ring::digest::{digest, SHA256};

use super::wire::{ExternalBlockHash, ExtraKey, HashForm};

/// The seed vLLM 0.33.0 derives `NONE_HASH` from when `PYTHONHASHSEED` is
/// unset and the algorithm is cryptographic (`DEFAULT_NONE_HASH_SEED`).
pub const DEFAULT_NONE_HASH_SEED: &str = "vllm-none-hash";

/// A block's full digest (vLLM's `BlockHash`, 32 bytes for SHA-256).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// vLLM's int form: `int.from_bytes(digest, "big") & (2**64 - 1)`, i.e.
    /// the last 8 bytes read big-endian.
    pub fn low64(&self) -> u64 {
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&self.0[24..]);
        u64::from_be_bytes(tail)
    }

    /// The hash as vLLM puts it in an event (`maybe_convert_block_hash`).
    pub fn external(&self, form: HashForm) -> ExternalBlockHash {
        match form {
            HashForm::Int => ExternalBlockHash::Int(self.low64()),
            HashForm::Bytes => ExternalBlockHash::Bytes(self.0.to_vec()),
        }
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// What vLLM does for `NONE_HASH` when `PYTHONHASHSEED` is unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsetSeed {
    /// vLLM 0.26.0: `os.urandom(32)` per process, used as the digest itself;
    /// another process cannot reproduce the hashes.
    Random,
    /// vLLM 0.33.0 (sha256 variants): `sha256_cbor("vllm-none-hash")`, the same
    /// in every process.
    FixedDefault,
}

/// `NONE_HASH`, the parent digest of every prompt's first block: set
/// `PYTHONHASHSEED` (any string, even empty) gives `sha256_cbor(seed)`, the
/// string CBOR-encoded; unset follows `unset`.
pub fn none_hash(python_hash_seed: Option<&str>, unset: UnsetSeed) -> BlockHash {
    match (python_hash_seed, unset) {
        (Some(seed), _) => sha256_cbor_str(seed),
        (None, UnsetSeed::Random) => BlockHash(rand::random()),
        (None, UnsetSeed::FixedDefault) => sha256_cbor_str(DEFAULT_NONE_HASH_SEED),
    }
}

/// [`none_hash`] with this process's `PYTHONHASHSEED`, as an engine reads it.
pub fn none_hash_from_env(unset: UnsetSeed) -> BlockHash {
    none_hash(std::env::var("PYTHONHASHSEED").ok().as_deref(), unset)
}

fn sha256_cbor_str(s: &str) -> BlockHash {
    let mut buf = Vec::with_capacity(s.len() + 9);
    head(&mut buf, 3, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
    sha256(&buf)
}

fn sha256(bytes: &[u8]) -> BlockHash {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    BlockHash(out)
}

/// vLLM's `hash_block_tokens(sha256_cbor, parent, token_ids, extra_keys)`.
pub fn hash_block_tokens(
    none_hash: &BlockHash,
    parent: Option<&BlockHash>,
    token_ids: &[u32],
    extra_keys: Option<&[ExtraKey]>,
) -> BlockHash {
    let mut buf = Vec::with_capacity(48 + token_ids.len() * 5);
    block_input(&mut buf, none_hash, parent, token_ids, extra_keys);
    sha256(&buf)
}

/// `(parent or NONE_HASH, tuple(token_ids), extra_keys)`, CBOR-encoded.
fn block_input(
    buf: &mut Vec<u8>,
    none_hash: &BlockHash,
    parent: Option<&BlockHash>,
    token_ids: &[u32],
    extra_keys: Option<&[ExtraKey]>,
) {
    head(buf, 4, 3);
    let parent = parent.unwrap_or(none_hash);
    head(buf, 2, 32);
    buf.extend_from_slice(&parent.0);
    head(buf, 4, token_ids.len() as u64);
    for &t in token_ids {
        head(buf, 0, t.into());
    }
    match extra_keys {
        Some(keys) => {
            head(buf, 4, keys.len() as u64);
            keys.iter().for_each(|k| cbor(buf, k));
        }
        None => buf.push(0xf6),
    }
}

/// Chains block hashes over a prompt, one per full block, as vLLM's
/// `request_block_hasher` does; a trailing partial block is not hashed.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    none_hash: BlockHash,
    block_size: usize,
}

impl BlockHasher {
    /// `block_size` is the engine's (vLLM's `--block-size`, 16 by default);
    /// zero is taken as one.
    pub fn new(none_hash: BlockHash, block_size: usize) -> Self {
        Self {
            none_hash,
            block_size: block_size.max(1),
        }
    }

    pub fn none_hash(&self) -> &BlockHash {
        &self.none_hash
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The digests of `token_ids`' full blocks, the first chained from
    /// `parent` (`None`: the prompt's start).
    pub fn chain(&self, parent: Option<&BlockHash>, token_ids: &[u32]) -> Vec<BlockHash> {
        self.chain_with(parent, token_ids, |_| None)
    }

    /// [`Self::chain`] with each block's extra keys (LoRA, multimodal, cache
    /// salt), `extra_keys[i]` for block `i`; missing entries count as `None`.
    pub fn chain_with_extra_keys(
        &self,
        parent: Option<&BlockHash>,
        token_ids: &[u32],
        extra_keys: &[Option<Vec<ExtraKey>>],
    ) -> Vec<BlockHash> {
        self.chain_with(parent, token_ids, |i| {
            extra_keys.get(i).and_then(Option::as_deref)
        })
    }

    fn chain_with<'k>(
        &self,
        parent: Option<&BlockHash>,
        token_ids: &[u32],
        extra: impl Fn(usize) -> Option<&'k [ExtraKey]>,
    ) -> Vec<BlockHash> {
        let mut out = Vec::with_capacity(token_ids.len() / self.block_size);
        let mut prev = parent.copied();
        let mut buf = Vec::with_capacity(48 + self.block_size * 5);
        for (i, block) in token_ids.chunks_exact(self.block_size).enumerate() {
            buf.clear();
            block_input(&mut buf, &self.none_hash, prev.as_ref(), block, extra(i));
            let h = sha256(&buf);
            out.push(h);
            prev = Some(h);
        }
        out
    }
}

/// A CBOR head: major type and argument in the shortest form.
fn head(buf: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => buf.push(m | n as u8),
        24..=0xff => buf.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            buf.push(m | 25);
            buf.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            buf.push(m | 26);
            buf.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            buf.push(m | 27);
            buf.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// One value as `cbor2.dumps(value, canonical=True)` writes it.
pub(crate) fn cbor(buf: &mut Vec<u8>, v: &ExtraKey) {
    match v {
        ExtraKey::Nil => buf.push(0xf6),
        ExtraKey::Bool(b) => buf.push(if *b { 0xf5 } else { 0xf4 }),
        ExtraKey::Int(i) => cbor_int(buf, *i),
        ExtraKey::Float(f) => cbor_float(buf, *f),
        ExtraKey::Str(s) => {
            head(buf, 3, s.len() as u64);
            buf.extend_from_slice(s.as_bytes());
        }
        ExtraKey::Bytes(b) => {
            head(buf, 2, b.len() as u64);
            buf.extend_from_slice(b);
        }
        ExtraKey::Tuple(items) => {
            head(buf, 4, items.len() as u64);
            items.iter().for_each(|x| cbor(buf, x));
        }
        ExtraKey::Map(items) => {
            // Canonical CBOR (RFC 7049 3.9, as cbor2 does it): keys ordered by
            // encoded length, then bytewise.
            let mut entries: Vec<(Vec<u8>, &ExtraKey)> = items
                .iter()
                .map(|(k, v)| {
                    let mut kb = Vec::new();
                    cbor(&mut kb, k);
                    (kb, v)
                })
                .collect();
            entries.sort_by(|a, b| (a.0.len(), &a.0).cmp(&(b.0.len(), &b.0)));
            head(buf, 5, entries.len() as u64);
            for (kb, v) in entries {
                buf.extend_from_slice(&kb);
                cbor(buf, v);
            }
        }
    }
}

fn cbor_int(buf: &mut Vec<u8>, i: i128) {
    let (major, n) = if i >= 0 {
        (0, i as u128)
    } else {
        (1, (-1 - i) as u128)
    };
    match u64::try_from(n) {
        Ok(n) => head(buf, major, n),
        Err(_) => {
            // Past 64 bits: a bignum, tag 2 (positive) or 3 (negative).
            buf.push(0xc0 | (2 + major));
            let bytes = n.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            head(buf, 2, (bytes.len() - skip) as u64);
            buf.extend_from_slice(&bytes[skip..]);
        }
    }
}

/// cbor2's canonical float: the shortest of half, single and double that
/// keeps the value; NaN as half-precision `0x7e00`.
fn cbor_float(buf: &mut Vec<u8>, f: f64) {
    if f.is_nan() {
        buf.extend_from_slice(&[0xf9, 0x7e, 0x00]);
        return;
    }
    let single = f as f32;
    if f64::from(single) != f {
        buf.push(0xfb);
        buf.extend_from_slice(&f.to_bits().to_be_bytes());
    } else if let Some(half) = f32_to_f16_exact(single) {
        buf.push(0xf9);
        buf.extend_from_slice(&half.to_be_bytes());
    } else {
        buf.push(0xfa);
        buf.extend_from_slice(&single.to_bits().to_be_bytes());
    }
}

/// The IEEE half-precision bits of `f` when `f` is exactly representable.
fn f32_to_f16_exact(f: f32) -> Option<u16> {
    let bits = f.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        // Infinity (NaN is handled by the caller).
        return (mant == 0).then_some(sign | 0x7c00);
    }
    if exp == 0 {
        // Zero, or an f32 subnormal (far below f16's range).
        return (mant == 0).then_some(sign);
    }
    let e = exp - 127;
    if (-14..=15).contains(&e) {
        // Normal half: 10 mantissa bits survive.
        return (mant & 0x1fff == 0)
            .then(|| sign | (((e + 15) as u16) << 10) | (mant >> 13) as u16);
    }
    if (-24..-14).contains(&e) {
        // Subnormal half: value = m * 2^-24 with m = significand * 2^(e+1).
        let sig = mant | 0x80_0000;
        let shift = (-(e + 1)) as u32;
        let m = sig >> shift;
        return (m << shift == sig).then_some(sign | m as u16);
    }
    None
}
