//! The prompt as the router sees it, and the approximate prefix index.
//!
//! Owns: turning a request body into prompt bytes and a token estimate, the
//! block-hash chain over those bytes, and the bounded LRU of block hashes kept
//! per endpoint. It does not know about endpoints, scores or HTTP.
//!
//! Tokens are estimated at 4 bytes each (what the engine simulator counts for
//! text), so a block of `block_size` tokens is `4 * block_size` prompt bytes;
//! token ids are laid out as 4 little-endian bytes each, so for id prompts the
//! blocks line up with the engine's exactly. With a tokenizer.json
//! ([`prompt_with`]) text is turned into token ids first, laid out the same
//! way, so a block is exactly `block_size` tokens and the count is exact; with
//! the model's chat template too, chat messages are first rendered as vLLM
//! renders them (`chat.rs`), so the ids are the engine's.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard};

use serde_json::{Map, Value};

use super::chat::{self, PromptTokenizer};
use crate::request::ApiKind;

/// Bytes per estimated token.
pub const BYTES_PER_TOKEN: usize = 4;

/// The prompt of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prompt {
    /// What the block hashes are computed over.
    pub bytes: Vec<u8>,
    /// Estimated prompt tokens.
    pub tokens: u64,
}

/// Accumulates a prompt's bytes: text as UTF-8, or, with a tokenizer, as the
/// token ids of the text; token ids as 4 little-endian bytes each.
struct Builder<'a> {
    prompt: Prompt,
    tokenizer: Option<&'a tokenizers::Tokenizer>,
    /// Ids pushed (counted only with a tokenizer).
    ids: u64,
}

impl Builder<'_> {
    fn push_text(&mut self, s: &str) {
        let Some(tok) = self.tokenizer else {
            self.prompt.bytes.extend_from_slice(s.as_bytes());
            return;
        };
        match tok.encode_fast(s, false) {
            Ok(enc) => {
                for &id in enc.get_ids() {
                    self.prompt.bytes.extend_from_slice(&id.to_le_bytes());
                }
                self.ids += enc.get_ids().len() as u64;
            }
            // A text the tokenizer cannot take still routes, by its bytes.
            Err(_) => {
                self.prompt.bytes.extend_from_slice(s.as_bytes());
                self.ids += (s.len() as u64).div_ceil(BYTES_PER_TOKEN as u64);
            }
        }
    }

    fn push_id(&mut self, id: &Value) {
        if let Some(id) = id.as_u64() {
            // Vocabularies fit in 32 bits; a larger value still hashes deterministically.
            self.prompt
                .bytes
                .extend_from_slice(&(id as u32).to_le_bytes());
            self.ids += 1;
        }
    }

    /// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
    fn push_prompt(&mut self, prompt: Option<&Value>) {
        match prompt {
            Some(Value::String(s)) => self.push_text(s),
            Some(Value::Array(items)) => {
                for item in items {
                    match item {
                        Value::String(s) => self.push_text(s),
                        Value::Number(_) => self.push_id(item),
                        Value::Array(ids) => ids.iter().for_each(|id| self.push_id(id)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }

    /// Message content: a string, or a list of parts whose text parts count.
    fn push_content(&mut self, content: Option<&Value>) {
        match content {
            Some(Value::String(s)) => self.push_text(s),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part {
                        Value::String(s) => self.push_text(s),
                        other => {
                            if let Some(t) = other.get("text").and_then(Value::as_str) {
                                self.push_text(t);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// A chat-style message: its role, a newline, its content.
    fn push_message(&mut self, message: &Value) {
        if let Some(role) = message.get("role").and_then(Value::as_str) {
            self.push_text(role);
            self.push_text("\n");
        }
        self.push_content(message.get("content"));
    }
}

/// The prompt of a request body for its API, tokens estimated at 4 bytes each.
pub fn prompt_of(api: ApiKind, body: &Map<String, Value>) -> Prompt {
    prompt_with::<tokenizers::Tokenizer>(api, body, None)
}

/// The prompt of a request body for its API. With a tokenizer, text is turned
/// into token ids (so blocks hold exactly `block_size` tokens) and the token
/// count is exact; without one, 4 bytes count as a token. With the model's chat
/// template too, chat messages are rendered and tokenized as vLLM does
/// ([`chat::chat_ids`]); a template that fails counts them as below.
pub fn prompt_with<T: PromptTokenizer + ?Sized>(
    api: ApiKind,
    body: &Map<String, Value>,
    tokenizer: Option<&T>,
) -> Prompt {
    let mut p = Builder {
        prompt: Prompt::default(),
        tokenizer: tokenizer.map(T::tokenizer),
        ids: 0,
    };
    match api {
        ApiKind::Completions => p.push_prompt(body.get("prompt")),
        // No chat template: vLLM renders Anthropic messages through its own conversion.
        ApiKind::Messages => {
            p.push_content(body.get("system"));
            if let Some(messages) = body.get("messages").and_then(Value::as_array) {
                messages.iter().for_each(|m| p.push_message(m));
            }
        }
        ApiKind::ChatCompletions => match tokenizer.and_then(|t| chat::chat_ids(t, body)) {
            Some(ids) => {
                ids.iter()
                    .for_each(|id| p.prompt.bytes.extend_from_slice(&id.to_le_bytes()));
                p.ids += ids.len() as u64;
            }
            None => {
                if let Some(messages) = body.get("messages").and_then(Value::as_array) {
                    messages.iter().for_each(|m| p.push_message(m));
                }
            }
        },
        ApiKind::Responses => {
            p.push_content(body.get("instructions"));
            match body.get("input") {
                Some(Value::Array(items)) => {
                    for item in items {
                        match item {
                            Value::String(s) => p.push_text(s),
                            other => p.push_message(other),
                        }
                    }
                }
                other => p.push_content(other),
            }
        }
        ApiKind::Generate => match body
            .get("prompt_token_ids")
            .or_else(|| body.get("token_ids"))
        {
            Some(Value::Array(ids)) => ids.iter().for_each(|id| p.push_id(id)),
            _ => p.push_prompt(body.get("prompt")),
        },
    }
    let mut prompt = p.prompt;
    prompt.tokens = if tokenizer.is_some() {
        p.ids
    } else {
        (prompt.bytes.len() as u64).div_ceil(BYTES_PER_TOKEN as u64)
    };
    prompt
}

// ---------------------------------------------------------------------------
// Block hashes. Not cryptographic: a collision only costs a worse pick.

const K: u64 = 0x9e37_79b9_7f4a_7c15;
/// Per-lane multipliers (odd, so each step is a bijection of the lane).
const LANES: [u64; 4] = [
    K,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x85eb_ca77_c2b2_ae63,
];

/// Murmur3's 64-bit finaliser: every input bit reaches every output bit.
fn finish(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn word(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(b)
}

/// A digest of `data` alone: four independent lanes over 32-byte stripes, so
/// the multiplications of one block, and of neighbouring blocks, overlap.
fn digest(data: &[u8]) -> u64 {
    let mut lanes = LANES;
    let mut stripes = data.chunks_exact(32);
    for stripe in &mut stripes {
        for (j, lane) in lanes.iter_mut().enumerate() {
            let w = word(&stripe[j * 8..j * 8 + 8]);
            *lane = (*lane ^ w).wrapping_mul(LANES[j]).rotate_left(31);
        }
    }
    for (j, rest) in stripes.remainder().chunks(8).enumerate() {
        lanes[j] = (lanes[j] ^ word(rest))
            .wrapping_mul(LANES[j])
            .rotate_left(31);
    }
    finish(
        lanes[0]
            ^ lanes[1].rotate_left(17)
            ^ lanes[2].rotate_left(31)
            ^ lanes[3].rotate_left(47)
            ^ (data.len() as u64).wrapping_mul(K),
    )
}

/// The hash chain of the prompt's full blocks of `block_size` tokens, at most
/// `max_blocks` of them: `h[i] = chain(h[i-1], digest(block i))`, seeded by
/// the model name, so equal hashes mean equal prefixes for the same model.
/// Only the cheap chaining step is sequential; the digests are independent.
pub fn block_hashes(model: &str, bytes: &[u8], block_size: usize, max_blocks: usize) -> Vec<u64> {
    chain_from(chain_root(model), bytes, block_size, max_blocks)
}

/// Where a model's hash chains start.
pub fn chain_root(model: &str) -> u64 {
    digest(model.as_bytes())
}

/// [`block_hashes`] continued from the hash `prev` of the blocks before
/// `bytes` (the KV-event index chains an engine's runs of stored blocks).
pub fn chain_from(prev: u64, bytes: &[u8], block_size: usize, max_blocks: usize) -> Vec<u64> {
    let block_bytes = block_size.saturating_mul(BYTES_PER_TOKEN).max(1);
    let mut prev = prev;
    bytes
        .chunks_exact(block_bytes)
        .take(max_blocks)
        .map(|block| {
            // The digest is fully mixed, so one multiply keeps the chain's bits mixed too.
            prev = (prev.rotate_left(29) ^ digest(block)).wrapping_mul(K);
            prev
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The per-endpoint LRU of block hashes.

/// The keys are hashes already: use them as they are.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

const NIL: u32 = u32::MAX;

#[derive(Clone)]
struct Node {
    key: u64,
    prev: u32,
    next: u32,
    /// The `insert_chain` pass that last placed this node (see `PrefixLru::pass`).
    placed: u32,
}

/// The prefix indexes of one set of endpoints (decode or prefill), one LRU per
/// endpoint, behind a single lock: a pick matches every candidate under one
/// acquisition instead of one per endpoint.
pub struct PrefixIndex {
    lrus: Mutex<Vec<PrefixLru>>,
}

impl PrefixIndex {
    pub fn new(endpoints: usize, capacity: usize) -> PrefixIndex {
        PrefixIndex {
            lrus: Mutex::new((0..endpoints).map(|_| PrefixLru::new(capacity)).collect()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<PrefixLru>> {
        // A panic while holding the lock cannot leave an LRU worse than stale.
        self.lrus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f(k, matched)` for each endpoint position `endpoints[k]` with the
    /// number of leading blocks of `hashes` it is believed to hold.
    pub fn matched(&self, hashes: &[u64], endpoints: &[usize], mut f: impl FnMut(usize, usize)) {
        if hashes.is_empty() {
            return;
        }
        let lrus = self.lock();
        for (k, &e) in endpoints.iter().enumerate() {
            f(k, lrus.get(e).map_or(0, |l| l.matched_prefix(hashes)));
        }
    }

    /// The index of another set of endpoints: endpoint `k` starts with a copy
    /// of `from`'s endpoint `at[k]` (an endpoint that stays keeps its cache), or
    /// empty where `at[k]` is None.
    pub fn carried(from: &PrefixIndex, at: &[Option<usize>], capacity: usize) -> PrefixIndex {
        let old = from.lock();
        let lrus = at
            .iter()
            .map(|a| {
                a.and_then(|i| old.get(i).cloned())
                    .unwrap_or_else(|| PrefixLru::new(capacity))
            })
            .collect();
        PrefixIndex {
            lrus: Mutex::new(lrus),
        }
    }

    /// Records that endpoint `endpoint` now holds the prefix `hashes`.
    pub fn record(&self, endpoint: usize, hashes: &[u64]) {
        if hashes.is_empty() {
            return;
        }
        if let Some(lru) = self.lock().get_mut(endpoint) {
            lru.insert_chain(hashes);
        }
    }
}

/// A bounded set of block hashes with least-recently-used eviction: an
/// intrusive doubly linked list over a slab, so every operation is O(1) and
/// memory never exceeds the capacity.
#[derive(Clone)]
pub struct PrefixLru {
    map: HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>,
    nodes: Vec<Node>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    capacity: usize,
    /// Counts `insert_chain` calls; a node whose `placed` equals it was
    /// placed by the current call.
    pass: u32,
}

impl PrefixLru {
    pub fn new(capacity: usize) -> PrefixLru {
        PrefixLru {
            map: HashMap::default(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.clamp(1, NIL as usize - 1),
            pass: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    /// How many of the chain `hashes`, from the first, are present, in
    /// O(log n) lookups. The index holds whole prefixes: a prompt's chain is
    /// recorded last block first, so each block is used more recently than
    /// every block after it, and LRU eviction removes a chain from its tail.
    /// So "block i is present" holds for a leading run of blocks, and a binary
    /// search finds where the run ends.
    pub fn matched_prefix(&self, hashes: &[u64]) -> usize {
        // Most lookups end at once: the first block absent, or the whole chain present.
        match hashes.first() {
            Some(&h) if self.contains(h) => {}
            _ => return 0,
        }
        let last = hashes.len() - 1;
        if self.contains(hashes[last]) {
            return hashes.len();
        }
        let (mut lo, mut hi) = (1, last);
        // Invariant: hashes[..lo] present, hashes[hi] absent.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.contains(hashes[mid]) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Takes the run of nodes `first..=last` (linked in that order) out of the list.
    fn unlink_run(&mut self, first: u32, last: u32) {
        let prev = self.nodes[first as usize].prev;
        let next = self.nodes[last as usize].next;
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    /// Links the run `first..=last` in right after `after` (at the head when NIL).
    fn link_after(&mut self, after: u32, first: u32, last: u32) {
        let next = match after {
            NIL => std::mem::replace(&mut self.head, first),
            a => std::mem::replace(&mut self.nodes[a as usize].next, first),
        };
        self.nodes[first as usize].prev = after;
        self.nodes[last as usize].next = next;
        match next {
            NIL => self.tail = last,
            n => self.nodes[n as usize].prev = last,
        }
    }

    /// A node for the absent `key`, not linked in: a new one, or, when full,
    /// the least recently used one's, whose key is dropped.
    fn alloc(&mut self, key: u64) -> u32 {
        let i = if self.map.len() >= self.capacity {
            let victim = self.tail;
            self.unlink_run(victim, victim);
            let old = self.nodes[victim as usize].key;
            self.map.remove(&old);
            self.nodes[victim as usize].key = key;
            victim
        } else {
            self.nodes.push(Node {
                key,
                prev: NIL,
                next: NIL,
                placed: 0,
            });
            (self.nodes.len() - 1) as u32
        };
        self.map.insert(key, i);
        i
    }

    /// Marks `key` as most recently used, adding it (and evicting the least
    /// recently used key when full) if absent.
    pub fn insert(&mut self, key: u64) {
        self.insert_chain(&[key]);
    }

    /// Records a prompt's chain: afterwards `hashes[0], hashes[1], ...` are
    /// the most recently used keys, in that order, so the leading blocks,
    /// which every later match needs, are evicted last (a chain longer than
    /// the capacity keeps its leading blocks). The same order as inserting
    /// the keys one by one from the last, but a run of keys already linked in
    /// chain order (a prompt seen before) moves as one splice: one map lookup
    /// per run instead of one per key.
    pub fn insert_chain(&mut self, hashes: &[u64]) {
        let hashes = &hashes[..hashes.len().min(self.capacity)];
        self.pass = self.pass.wrapping_add(1);
        if self.pass == 0 {
            // After 2^32 passes: forget old marks so none equals the new pass.
            self.nodes.iter_mut().for_each(|n| n.placed = 0);
            self.pass = 1;
        }
        let pass = self.pass;
        // The placed keys are the list's first nodes, head..=cursor.
        let mut cursor = NIL;
        let mut i = 0;
        while i < hashes.len() {
            let first = match self.map.get(&hashes[i]) {
                // A key repeated within the chain is placed already.
                Some(&n) if self.nodes[n as usize].placed == pass => {
                    i += 1;
                    continue;
                }
                Some(&n) => n,
                None => {
                    // Evicts the tail if full: never a placed node, since the
                    // chain is no longer than the capacity.
                    let n = self.alloc(hashes[i]);
                    self.nodes[n as usize].placed = pass;
                    self.link_after(cursor, n, n);
                    cursor = n;
                    i += 1;
                    continue;
                }
            };
            // Extend the run while the list already follows the chain. The run
            // lies after the placed nodes, so it never reaches one of them.
            self.nodes[first as usize].placed = pass;
            let mut last = first;
            i += 1;
            while i < hashes.len() {
                let next = self.nodes[last as usize].next;
                if next == NIL || self.nodes[next as usize].key != hashes[i] {
                    break;
                }
                self.nodes[next as usize].placed = pass;
                last = next;
                i += 1;
            }
            let in_place = match cursor {
                NIL => self.head == first,
                c => self.nodes[c as usize].next == first,
            };
            if !in_place {
                self.unlink_run(first, last);
                self.link_after(cursor, first, last);
            }
            cursor = last;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn completions_prompt_bytes_and_tokens() {
        let p = prompt_of(ApiKind::Completions, &body(json!({"prompt": "abcdefghi"})));
        assert_eq!((p.bytes.as_slice(), p.tokens), (&b"abcdefghi"[..], 3));
        let p = prompt_of(ApiKind::Completions, &body(json!({"prompt": [1, 2, 3]})));
        assert_eq!(p.tokens, 3);
        assert_eq!(p.bytes, [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
        let p = prompt_of(
            ApiKind::Completions,
            &body(json!({"prompt": [[1, 2], [3]]})),
        );
        assert_eq!(p.tokens, 3);
        let p = prompt_of(
            ApiKind::Completions,
            &body(json!({"prompt": ["abcd", "efgh"]})),
        );
        assert_eq!((p.bytes.as_slice(), p.tokens), (&b"abcdefgh"[..], 2));
        assert_eq!(
            prompt_of(ApiKind::Completions, &body(json!({"prompt": 5}))).tokens,
            0
        );
    }

    #[test]
    fn chat_responses_and_generate_prompts() {
        let chat = body(json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}
        ]}));
        let p = prompt_of(ApiKind::ChatCompletions, &chat);
        assert_eq!(p.bytes, b"system\nbe briefuser\nhi");
        let resp = body(
            json!({"instructions": "rules", "input": [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}, "tail"]}),
        );
        assert_eq!(
            prompt_of(ApiKind::Responses, &resp).bytes,
            b"rulesuser\nqtail"
        );
        assert_eq!(
            prompt_of(ApiKind::Responses, &body(json!({"input": "plain"}))).bytes,
            b"plain"
        );
        let gen = body(json!({"prompt_token_ids": [7, 8]}));
        assert_eq!(prompt_of(ApiKind::Generate, &gen).tokens, 2);
        let gen = body(json!({"prompt": "abcd"}));
        assert_eq!(prompt_of(ApiKind::Generate, &gen).bytes, b"abcd");
    }

    #[test]
    fn same_prefix_gives_same_leading_hashes() {
        let shared = "x".repeat(64 * 3); // three 16-token blocks
        let a = format!("{shared}{}", "a".repeat(64 * 2));
        let b = format!("{shared}{}", "b".repeat(64 * 2));
        let ha = block_hashes("m", a.as_bytes(), 16, 256);
        let hb = block_hashes("m", b.as_bytes(), 16, 256);
        assert_eq!(ha.len(), 5);
        assert_eq!(ha[..3], hb[..3]);
        assert_ne!(ha[3], hb[3]);
        assert_ne!(ha[4], hb[4]);
        // Chained: an equal block after a different one hashes differently.
        let c = format!("{}{shared}", "c".repeat(64));
        let hc = block_hashes("m", c.as_bytes(), 16, 256);
        assert_ne!(hc[1], ha[0]);
        // Seeded by the model.
        assert_ne!(block_hashes("other", a.as_bytes(), 16, 256)[0], ha[0]);
    }

    #[test]
    fn only_full_blocks_up_to_the_cap_are_hashed() {
        let text = "y".repeat(64 * 4 + 63);
        assert_eq!(block_hashes("m", text.as_bytes(), 16, 256).len(), 4);
        assert_eq!(block_hashes("m", text.as_bytes(), 16, 2).len(), 2);
        assert!(block_hashes("m", b"short", 16, 256).is_empty());
        // Odd block sizes (not a multiple of 8 bytes) work too.
        assert_eq!(block_hashes("m", text.as_bytes(), 3, 256).len(), 319 / 12);
    }

    #[test]
    fn lru_is_bounded_and_evicts_least_recent() {
        let mut lru = PrefixLru::new(3);
        for k in [1, 2, 3] {
            lru.insert(k);
        }
        lru.insert(1); // 1 is now the most recent; 2 the least
        lru.insert(4);
        assert_eq!(lru.len(), 3);
        assert!(!lru.contains(2));
        assert!(lru.contains(1) && lru.contains(3) && lru.contains(4));
        for k in 100..1000 {
            lru.insert(k);
        }
        assert_eq!(lru.len(), 3);
        assert!(lru.contains(999) && lru.contains(998) && lru.contains(997));
        assert_eq!(lru.nodes.len(), 3, "the slab never grows past the capacity");
    }

    #[test]
    fn matched_prefix_stops_at_the_first_miss() {
        let mut lru = PrefixLru::new(100);
        lru.insert_chain(&[10, 11, 12]);
        assert_eq!(lru.matched_prefix(&[10, 11, 12, 13]), 3);
        assert_eq!(lru.matched_prefix(&[10, 11, 12]), 3);
        assert_eq!(lru.matched_prefix(&[10, 11, 99, 98, 97]), 2);
        assert_eq!(lru.matched_prefix(&[10, 98]), 1);
        assert_eq!(lru.matched_prefix(&[99, 10]), 0);
        assert_eq!(lru.matched_prefix(&[]), 0);
        // A chain longer than the capacity keeps its leading blocks.
        let mut small = PrefixLru::new(2);
        small.insert_chain(&[1, 2, 3, 4]);
        assert_eq!(small.matched_prefix(&[1, 2, 3, 4]), 2);
    }

    /// The binary search agrees with a walk from the first block for any mix
    /// of recorded chains, shared prefixes and evictions.
    #[test]
    fn matched_prefix_equals_a_linear_walk_under_eviction() {
        let walk = |lru: &PrefixLru, h: &[u64]| h.iter().take_while(|k| lru.contains(**k)).count();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for capacity in [7, 40, 300] {
            let mut lru = PrefixLru::new(capacity);
            // Prompts: one of 5 shared preambles, then a private tail, in 16-byte blocks.
            let prompts: Vec<Vec<u64>> = (0..200)
                .map(|i| {
                    let pre = "p".repeat(16 * (1 + (next() % 12) as usize));
                    let text = format!("{}{pre}{}", i % 5, "t".repeat(16 * (next() % 9) as usize));
                    let text = format!("{text}{i:016}");
                    block_hashes("m", text.as_bytes(), 4, 256)
                })
                .collect();
            for (i, p) in prompts.iter().enumerate() {
                lru.insert_chain(p);
                for q in prompts.iter().take(i + 1).rev().take(30) {
                    assert_eq!(lru.matched_prefix(q), walk(&lru, q), "capacity {capacity}");
                }
            }
        }
    }

    #[test]
    fn one_index_per_endpoint_under_one_lock() {
        let index = PrefixIndex::new(3, 100);
        index.record(1, &[1, 2, 3]);
        index.record(2, &[1]);
        index.record(9, &[1]); // not an endpoint: ignored
        let mut seen = Vec::new();
        index.matched(&[1, 2, 3, 4], &[2, 0, 1], |k, m| seen.push((k, m)));
        assert_eq!(seen, [(0, 1), (1, 0), (2, 3)]);
    }

    #[test]
    fn digests_differ_in_every_lane_and_tail() {
        let base = vec![7u8; 64 + 5];
        let h = digest(&base);
        for i in 0..base.len() {
            let mut v = base.clone();
            v[i] ^= 1;
            assert_ne!(digest(&v), h, "byte {i}");
        }
        assert_ne!(digest(&base[..64]), digest(&base[..65]), "length counts");
    }

    /// Keys from most to least recently used.
    fn order(lru: &PrefixLru) -> Vec<u64> {
        let mut out = Vec::new();
        let mut i = lru.head;
        while i != NIL {
            out.push(lru.nodes[i as usize].key);
            assert!(out.len() <= lru.len(), "the list has a cycle");
            i = lru.nodes[i as usize].next;
        }
        out
    }

    /// `insert_chain` leaves exactly the order (and evicts exactly the keys)
    /// that inserting one key at a time from the chain's end would.
    #[test]
    fn chain_splicing_matches_one_key_at_a_time() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for capacity in [1, 5, 16, 64] {
            let mut lru = PrefixLru::new(capacity);
            // The reference: most recent first.
            let mut model: std::collections::VecDeque<u64> = Default::default();
            let chains: Vec<Vec<u64>> = (0..12)
                .map(|c| (0..1 + next(40)).map(|k| c * 1000 + k).collect())
                .collect();
            for _ in 0..400 {
                let chain = &chains[next(12) as usize];
                let mut keys: Vec<u64> = chain[..1 + next(chain.len() as u64) as usize].to_vec();
                if next(10) == 0 {
                    keys.push(keys[0]); // a repeated key
                }
                lru.insert_chain(&keys);
                let kept = &keys[..keys.len().min(capacity)];
                for &k in kept.iter().rev() {
                    model.retain(|&m| m != k);
                    model.push_front(k);
                    model.truncate(capacity);
                }
                assert_eq!(order(&lru), Vec::from(model.clone()), "capacity {capacity}");
                assert_eq!(lru.len(), model.len());
            }
        }
    }
}
