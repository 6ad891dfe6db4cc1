//! The parse phase: which API a request speaks, its token limits, its prompt
//! text, and how many tokens that prompt has. Pure functions over the JSON body.

use std::path::Path;

use serde_json::{Map, Value};

/// OpenAI-compatible APIs the sidecar disaggregates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiKind {
    Completions,
    ChatCompletions,
    /// Anthropic's Messages API, which vLLM also serves; llm-d treats it as chat.
    Messages,
    Responses,
    Generate,
}

impl ApiKind {
    pub fn from_path(path: &str) -> Option<ApiKind> {
        match path {
            "/v1/completions" => Some(ApiKind::Completions),
            "/v1/chat/completions" => Some(ApiKind::ChatCompletions),
            "/v1/messages" => Some(ApiKind::Messages),
            "/v1/responses" => Some(ApiKind::Responses),
            "/inference/v1/generate" => Some(ApiKind::Generate),
            _ => None,
        }
    }

    pub fn route(self) -> &'static str {
        match self {
            ApiKind::Completions => "/v1/completions",
            ApiKind::ChatCompletions => "/v1/chat/completions",
            ApiKind::Messages => "/v1/messages",
            ApiKind::Responses => "/v1/responses",
            ApiKind::Generate => "/inference/v1/generate",
        }
    }

    /// Top-level token limit fields that the prefill leg sets to 1.
    pub fn token_limit_fields(self) -> &'static [&'static str] {
        match self {
            ApiKind::Completions | ApiKind::ChatCompletions | ApiKind::Messages => {
                &["max_tokens", "max_completion_tokens", "min_tokens"]
            }
            ApiKind::Responses => &["max_output_tokens"],
            ApiKind::Generate => &[],
        }
    }

    /// Token limit fields nested in `sampling_params` (the generate API).
    pub fn sampling_limit_fields(self) -> &'static [&'static str] {
        match self {
            ApiKind::Generate => &["max_tokens", "min_tokens"],
            _ => &[],
        }
    }
}

/// Counts prompt tokens, exactly with a tokenizer or by the 4-bytes-per-token estimate.
pub enum TokenCounter {
    Estimate,
    Tokenizer(Box<tokenizers::Tokenizer>),
}

impl TokenCounter {
    pub fn load(path: Option<&Path>) -> Result<TokenCounter, String> {
        match path {
            None => Ok(TokenCounter::Estimate),
            Some(p) => tokenizers::Tokenizer::from_file(p)
                .map(|t| TokenCounter::Tokenizer(Box::new(t)))
                .map_err(|e| format!("--tokenizer={}: {e}", p.display())),
        }
    }

    fn count_text(&self, text: &str) -> u64 {
        match self {
            TokenCounter::Estimate => (text.len() as u64).div_ceil(4),
            TokenCounter::Tokenizer(t) => t
                .encode_fast(text, false)
                .map(|e| e.len() as u64)
                .unwrap_or_else(|_| (text.len() as u64).div_ceil(4)),
        }
    }

    /// Prompt tokens of a request body for its API.
    pub fn count(&self, api: ApiKind, body: &Map<String, Value>) -> u64 {
        let mut total = 0u64;
        match api {
            ApiKind::Completions => total += self.count_prompt(body.get("prompt")),
            ApiKind::ChatCompletions | ApiKind::Messages => {
                // Messages: the system prompt is a top-level field (text or text blocks).
                total += self.count_content(body.get("system"));
                if let Some(messages) = body.get("messages").and_then(Value::as_array) {
                    for m in messages {
                        total += self.count_content(m.get("content"));
                    }
                }
            }
            ApiKind::Responses => {
                total += self.count_content(body.get("instructions"));
                match body.get("input") {
                    Some(Value::Array(items)) => {
                        for item in items {
                            total += match item {
                                Value::String(s) => self.count_text(s),
                                other => self.count_content(other.get("content")),
                            };
                        }
                    }
                    other => total += self.count_content(other),
                }
            }
            ApiKind::Generate => {
                total += match body
                    .get("token_ids")
                    .or_else(|| body.get("prompt_token_ids"))
                {
                    Some(Value::Array(ids)) => ids.len() as u64,
                    _ => self.count_prompt(body.get("prompt")),
                }
            }
        }
        total
    }

    /// `prompt`: a string, a list of strings, a list of token ids or a list of such lists.
    fn count_prompt(&self, prompt: Option<&Value>) -> u64 {
        match prompt {
            Some(Value::String(s)) => self.count_text(s),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => self.count_text(s),
                    Value::Number(_) => 1,
                    Value::Array(ids) => ids.len() as u64,
                    _ => 0,
                })
                .sum(),
            _ => 0,
        }
    }

    /// Message content: a string or a list of parts, of which text parts count.
    fn count_content(&self, content: Option<&Value>) -> u64 {
        match content {
            Some(Value::String(s)) => self.count_text(s),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| match p {
                    Value::String(s) => self.count_text(s),
                    _ => p
                        .get("text")
                        .and_then(Value::as_str)
                        .map_or(0, |t| self.count_text(t)),
                })
                .sum(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn estimates_four_bytes_per_token() {
        let c = TokenCounter::Estimate;
        assert_eq!(
            c.count(
                ApiKind::Completions,
                json!({"prompt": "abcdefgh"}).as_object().unwrap()
            ),
            2
        );
        assert_eq!(
            c.count(
                ApiKind::Completions,
                json!({"prompt": "abcdefghi"}).as_object().unwrap()
            ),
            3
        );
        assert_eq!(
            c.count(
                ApiKind::Completions,
                json!({"prompt": ["abcd", "abcd"]}).as_object().unwrap()
            ),
            2
        );
        assert_eq!(
            c.count(
                ApiKind::Completions,
                json!({"prompt": [1, 2, 3]}).as_object().unwrap()
            ),
            3
        );
        assert_eq!(
            c.count(
                ApiKind::Completions,
                json!({"prompt": [[1, 2], [3]]}).as_object().unwrap()
            ),
            3
        );
    }

    #[test]
    fn counts_chat_string_and_text_parts() {
        let c = TokenCounter::Estimate;
        let body = json!({"messages": [
            {"role": "system", "content": "abcdabcd"},
            {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "x"}}]}
        ]});
        assert_eq!(
            c.count(ApiKind::ChatCompletions, body.as_object().unwrap()),
            3
        );
    }

    #[test]
    fn counts_responses_and_generate() {
        let c = TokenCounter::Estimate;
        assert_eq!(
            c.count(
                ApiKind::Responses,
                json!({"input": "abcdabcd", "instructions": "abcd"})
                    .as_object()
                    .unwrap()
            ),
            3
        );
        let body = json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]}]});
        assert_eq!(c.count(ApiKind::Responses, body.as_object().unwrap()), 1);
        assert_eq!(
            c.count(
                ApiKind::Generate,
                json!({"token_ids": [1, 2, 3, 4]}).as_object().unwrap()
            ),
            4
        );
    }

    #[test]
    fn tokenizer_counts_exactly() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/wordlevel-tokenizer.json");
        let c = TokenCounter::load(Some(&path)).unwrap();
        // Three words, 17 bytes: the estimate would say 5.
        let body = json!({"prompt": "hello world again"});
        assert_eq!(c.count(ApiKind::Completions, body.as_object().unwrap()), 3);
        let err = TokenCounter::load(Some(std::path::Path::new("/nonexistent.json")))
            .err()
            .unwrap();
        assert!(err.contains("--tokenizer"), "{err}");
    }

    #[test]
    fn messages_count_the_system_prompt_and_text_blocks() {
        let body = json!({
            "system": [{"type": "text", "text": "abcdefgh"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}]},
                         {"role": "assistant", "content": "abcd"}],
            "max_tokens": 5,
        });
        let c = TokenCounter::Estimate;
        assert_eq!(c.count(ApiKind::Messages, body.as_object().unwrap()), 4);
        assert_eq!(
            ApiKind::Messages.token_limit_fields(),
            ApiKind::ChatCompletions.token_limit_fields()
        );
    }

    #[test]
    fn routes_map_to_kinds() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions"),
            Some(ApiKind::ChatCompletions)
        );
        assert_eq!(
            ApiKind::from_path("/inference/v1/generate"),
            Some(ApiKind::Generate)
        );
        assert_eq!(
            ApiKind::from_path("/v1/messages").map(ApiKind::route),
            Some("/v1/messages")
        );
        assert_eq!(ApiKind::from_path("/v1/models"), None);
    }
}
