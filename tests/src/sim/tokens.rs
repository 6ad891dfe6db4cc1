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
    fn output_is_deterministic() {
        assert_eq!(output_text(3), " tok0 tok1 tok2");
        assert_eq!(output_token_id(2), 1002);
    }
}
