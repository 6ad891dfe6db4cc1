//! Token accounting without a tokenizer. Owns the prompt-token estimate and the deterministic
//! output tokens; the sidecar's `TokenCounter::Estimate` uses the same estimate so both sides agree
//! on prompt lengths (and so on block counts).
//!
//! Prompt tokens:
//! - a text piece counts `ceil(bytes / 4)` tokens (UTF-8 bytes);
//! - a token-id list counts its length;
//! - a prompt made of several pieces (chat messages, content parts, Responses `instructions` plus
//!   `input` items) counts the sum over its pieces, each rounded up on its own;
//! - a prompt always counts at least 1 token (an engine always has something to prefill).
//!
//! With `--byte-tokens` ([`TextTokens::Bytes`]) a prompt's text pieces are joined first and the
//! whole byte stream is cut into 4-byte tokens, so a prompt counts `ceil(bytes / 4)` of the whole
//! stream (see [`byte_token_ids`]).
//!
//! Output: token `i` is the text `" tok{i}"` (token id `1000 + i` on the token-in/token-out API),
//! so `n` tokens read `" tok0 tok1 ... tok{n-1}"`.

/// Tokens of one text piece: `ceil(bytes / 4)`.
pub fn text_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// Token ids of one text piece: every 4 bytes are one token (so there are exactly
/// [`text_tokens`] of them), whose id is a hash of those bytes. Equal text gives equal ids,
/// which is all the prefix cache and the KV contents need.
pub fn text_token_ids(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.as_bytes().chunks(4).map(|chunk| {
        // FNV-1a over the chunk.
        let mut h: u32 = 0x811c_9dc5;
        for &b in chunk {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
        h
    })
}

/// How text becomes token ids (`--byte-tokens`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TextTokens {
    /// Each text piece on its own, every 4 bytes hashed into one id ([`text_token_ids`]).
    #[default]
    Hashed,
    /// The prompt's text as one byte stream, every 4 bytes one id: the bytes read as a
    /// little-endian u32 ([`byte_token_ids`]).
    Bytes,
}

/// Token ids of a byte stream: every 4 bytes are one token whose id is those bytes as a
/// little-endian u32 (a last short chunk padded with zeros). Laid out as 4 little-endian bytes
/// each, the ids give back the stream (padded): what pd-router hashes for a prompt when it has
/// no tokenizer, so its precise index matches the engine's KV events.
pub fn byte_token_ids(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes.chunks(4).map(|chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        u32::from_le_bytes(word)
    })
}

/// A prompt's token ids, built from its text pieces in order.
#[derive(Debug, Default)]
pub struct PromptIds {
    mode: TextTokens,
    ids: Vec<u32>,
    /// Text not yet cut into tokens ([`TextTokens::Bytes`]: the whole prompt's).
    bytes: Vec<u8>,
}

impl PromptIds {
    pub fn new(mode: TextTokens) -> PromptIds {
        PromptIds {
            mode,
            ..PromptIds::default()
        }
    }

    pub fn push_text(&mut self, s: &str) {
        match self.mode {
            TextTokens::Hashed => self.ids.extend(text_token_ids(s)),
            TextTokens::Bytes => self.bytes.extend_from_slice(s.as_bytes()),
        }
    }

    /// The ids, at least one.
    pub fn finish(mut self) -> Vec<u32> {
        self.ids.extend(byte_token_ids(&self.bytes));
        at_least_one(self.ids)
    }
}

/// Applies the at-least-one rule to a prompt's token ids.
pub fn at_least_one(mut ids: Vec<u32>) -> Vec<u32> {
    if ids.is_empty() {
        ids.push(0);
    }
    ids
}

/// Applies the at-least-one rule to a whole prompt's count.
pub fn prompt_total(count: u64) -> u64 {
    count.max(1)
}

/// The text of output token `i`.
pub fn output_token_text(i: u64) -> String {
    format!(" tok{i}")
}

/// The id of output token `i` (token-in/token-out API).
pub fn output_token_id(i: u64) -> u64 {
    1000 + i
}

/// The text of the first `n` output tokens.
pub fn output_text(n: u64) -> String {
    (0..n).map(output_token_text).collect()
}

/// Blocks needed for `tokens` tokens with `block_size` tokens per block.
pub fn blocks_for(tokens: u64, block_size: u64) -> u64 {
    tokens.div_ceil(block_size.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_rounds_up_per_piece() {
        assert_eq!(text_tokens(""), 0);
        assert_eq!(text_tokens("abcd"), 1);
        assert_eq!(text_tokens("abcde"), 2);
        assert_eq!(prompt_total(0), 1);
        assert_eq!(blocks_for(33, 16), 3);
        assert_eq!(blocks_for(32, 16), 2);
    }

    #[test]
    fn token_ids_follow_the_estimate() {
        for text in ["", "abc", "abcd", "abcde", "héllo wörld"] {
            assert_eq!(
                text_token_ids(text).count() as u64,
                text_tokens(text),
                "{text:?}"
            );
        }
        let a: Vec<u32> = text_token_ids("same prefix, then A").collect();
        let b: Vec<u32> = text_token_ids("same prefix, then B").collect();
        assert_eq!(a[..4], b[..4]);
        assert_ne!(a.last(), b.last());
        assert_eq!(at_least_one(vec![]), vec![0]);
    }

    #[test]
    fn byte_tokens_are_the_stream_in_little_endian_words() {
        let ids: Vec<u32> = byte_token_ids(b"abcdefg").collect();
        assert_eq!(
            ids,
            [u32::from_le_bytes(*b"abcd"), u32::from_le_bytes(*b"efg\0")]
        );
        // Pieces are joined before they are cut: 3 + 3 bytes are 2 tokens, not 1 + 1.
        let mut p = PromptIds::new(TextTokens::Bytes);
        p.push_text("abc");
        p.push_text("def");
        assert_eq!(
            p.finish(),
            [u32::from_le_bytes(*b"abcd"), u32::from_le_bytes(*b"ef\0\0")]
        );
        let mut p = PromptIds::new(TextTokens::Hashed);
        p.push_text("abc");
        p.push_text("def");
        assert_eq!(p.finish().len(), 2);
        assert_eq!(PromptIds::new(TextTokens::Bytes).finish(), [0]);
    }

    #[test]
    fn output_is_deterministic() {
        assert_eq!(output_text(3), " tok0 tok1 tok2");
        assert_eq!(output_token_id(2), 1002);
    }
}
