//! The OpenAI/vLLM wire formats of the simulator's generation APIs: parsing a request body into a
//! [`GenRequest`] and writing vLLM-shaped responses and SSE chunks. Pure functions over JSON; the
//! P/D fields (`kv_transfer_params`, v1 top-level fields, sglang bootstrap) are read in `pd`.

use serde_json::{json, Map, Value};

use super::error::SimError;
use super::tokens::{output_text, output_token_id, output_token_text, PromptIds, TextTokens};

/// The generation APIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
    /// Anthropic's Messages API (`/v1/messages`), as vLLM serves it.
    Messages,
    Responses,
    Generate,
}

/// What a generation request asks for, independent of its API.
#[derive(Clone, Debug, PartialEq)]
pub struct GenRequest {
    pub api: Api,
    pub model: Option<String>,
    /// Prompt tokens of each choice: several for a completions batch (a list of prompts).
    pub prompts: Vec<u64>,
    /// The token ids behind `prompts`, one list per choice (see `tokens::TextTokens`).
    pub prompt_ids: Vec<Vec<u32>>,
    /// The request's output limit (`max_tokens`, `max_completion_tokens`, `max_output_tokens`,
    /// `sampling_params.max_tokens`), if it set one.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    /// `request_id` from the body (token-in/token-out API).
    pub request_id: Option<String>,
    /// vLLM's `cache_hit_threshold` (0 to 1): below this share of the prompt
    /// found in the prefix cache the request is declined (`cache_threshold`).
    pub cache_hit_threshold: Option<f64>,
}

impl GenRequest {
    pub fn prompt_tokens(&self) -> u64 {
        self.prompts.iter().sum()
    }

    pub fn longest_prompt(&self) -> u64 {
        self.prompts.iter().copied().max().unwrap_or(0)
    }

    /// Every choice's prompt ids, one after the other: what the request's KV blocks hold.
    pub fn kv_tokens(&self) -> Vec<u32> {
        self.prompt_ids.concat()
    }
}

fn bad(msg: impl Into<String>) -> SimError {
    SimError::BadRequest(msg.into())
}

/// Parses a request body of `api`, its text turned into token ids as `text` says.
pub fn parse_request(
    api: Api,
    body: &Map<String, Value>,
    text: TextTokens,
) -> Result<GenRequest, SimError> {
    let model = match body.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad("`model` must be a string")),
    };
    let stream = opt_bool(body, "stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")?.unwrap_or(false),
        Some(_) => return Err(bad("`stream_options` must be an object")),
    };
    let (prompt_ids, max_tokens) = match api {
        Api::Completions => (
            completion_prompts(body.get("prompt"), text)?,
            opt_limit(body, "max_tokens")?,
        ),
        Api::Chat => (
            vec![chat_prompt(None, body.get("messages"), text)?],
            match opt_limit(body, "max_completion_tokens")? {
                Some(n) => Some(n),
                None => opt_limit(body, "max_tokens")?,
            },
        ),
        Api::Messages => (
            vec![chat_prompt(body.get("system"), body.get("messages"), text)?],
            opt_limit(body, "max_tokens")?,
        ),
        Api::Responses => (
            vec![responses_prompt(body, text)?],
            opt_limit(body, "max_output_tokens")?,
        ),
        Api::Generate => {
            let ids = body
                .get("token_ids")
                .or_else(|| body.get("prompt_token_ids"));
            let n = match ids {
                Some(Value::Array(ids)) if !ids.is_empty() => token_ids(ids)?,
                Some(Value::Array(_)) => return Err(bad("`token_ids` must not be empty")),
                _ => return Err(bad("`token_ids` is required (a list of token ids)")),
            };
            let limit = match body.get("sampling_params") {
                None | Some(Value::Null) => None,
                Some(Value::Object(sp)) => opt_limit(sp, "max_tokens")?,
                Some(_) => return Err(bad("`sampling_params` must be an object")),
            };
            (vec![n], limit)
        }
    };
    let request_id = match api {
        Api::Generate => body
            .get("request_id")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    };
    let cache_hit_threshold = match body.get("cache_hit_threshold") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=1.0).contains(&t) => Some(t),
            _ => return Err(bad("`cache_hit_threshold` must be a number from 0 to 1")),
        },
    };
    let prompts = prompt_ids.iter().map(|p| p.len() as u64).collect();
    Ok(GenRequest {
        cache_hit_threshold,
        api,
        model,
        prompts,
        prompt_ids,
        max_tokens,
        stream,
        include_usage,
        request_id,
    })
}

fn opt_bool(obj: &Map<String, Value>, field: &str) -> Result<Option<bool>, SimError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(format!("`{field}` must be a boolean"))),
    }
}

fn opt_limit(obj: &Map<String, Value>, field: &str) -> Result<Option<u64>, SimError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(bad(format!(
                "`{field}` must be an integer of at least 1, got {v}"
            ))),
        },
    }
}

fn token_ids(ids: &[Value]) -> Result<Vec<u32>, SimError> {
    ids.iter()
        .map(|v| v.as_u64().map(|id| (id ^ (id >> 32)) as u32))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| bad("token ids must be non-negative integers"))
}

fn text_ids(s: &str, text: TextTokens) -> Vec<u32> {
    let mut ids = PromptIds::new(text);
    ids.push_text(s);
    ids.finish()
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of token-id lists.
fn completion_prompts(prompt: Option<&Value>, text: TextTokens) -> Result<Vec<Vec<u32>>, SimError> {
    match prompt {
        Some(Value::String(s)) => Ok(vec![text_ids(s, text)]),
        Some(Value::Array(items)) if items.is_empty() => Err(bad("`prompt` must not be empty")),
        Some(Value::Array(items)) => {
            if items.iter().all(Value::is_number) {
                return Ok(vec![token_ids(items)?]);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(text_ids(s, text)),
                    Value::Array(ids) if !ids.is_empty() => token_ids(ids),
                    _ => Err(bad(
                        "`prompt` must be a string, a list of strings, a list of token ids or a list of token-id lists",
                    )),
                })
                .collect()
        }
        None | Some(Value::Null) => Err(bad("`prompt` is required")),
        Some(_) => Err(bad(
            "`prompt` must be a string, a list of strings, a list of token ids or a list of token-id lists",
        )),
    }
}

/// Message content (a string, or a list of parts of which text parts count), appended to `out`.
fn content_tokens(content: Option<&Value>, out: &mut PromptIds) {
    match content {
        Some(Value::String(s)) => out.push_text(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                match p {
                    Value::String(s) => out.push_text(s),
                    _ => {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            out.push_text(t);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// Hashed tokens count the messages' content only; byte tokens lay each message out as
/// pd-router does without a tokenizer (role, newline, content), so their ids are its bytes.
/// `system`: the Messages API's top-level system prompt, first.
fn chat_prompt(
    system: Option<&Value>,
    messages: Option<&Value>,
    text: TextTokens,
) -> Result<Vec<u32>, SimError> {
    let messages = match messages {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err(bad("`messages` must not be empty")),
        None | Some(Value::Null) => return Err(bad("`messages` is required")),
        Some(_) => return Err(bad("`messages` must be a list of messages")),
    };
    let mut ids = PromptIds::new(text);
    content_tokens(system, &mut ids);
    for m in messages {
        if !m.is_object() {
            return Err(bad("each message must be an object"));
        }
        if text == TextTokens::Bytes {
            if let Some(role) = m.get("role").and_then(Value::as_str) {
                ids.push_text(role);
                ids.push_text("\n");
            }
        }
        content_tokens(m.get("content"), &mut ids);
    }
    Ok(ids.finish())
}

fn responses_prompt(body: &Map<String, Value>, text: TextTokens) -> Result<Vec<u32>, SimError> {
    let mut ids = PromptIds::new(text);
    content_tokens(body.get("instructions"), &mut ids);
    match body.get("input") {
        Some(Value::String(s)) => ids.push_text(s),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => ids.push_text(s),
                    other => content_tokens(other.get("content"), &mut ids),
                }
            }
        }
        None | Some(Value::Null) => return Err(bad("`input` is required")),
        Some(_) => return Err(bad("`input` must be a string or a list of input items")),
    }
    Ok(ids.finish())
}

/// Token counts reported in `usage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    fn to_responses_json(self) -> Value {
        json!({
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0},
        })
    }
}

/// Everything a response or a chunk is written from.
#[derive(Clone, Debug)]
pub struct Reply {
    pub api: Api,
    /// `cmpl-...`, `chatcmpl-...`, `resp_...` or the generate API's request id.
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Number of choices (prompts of a completions batch; 1 otherwise).
    pub choices: usize,
    pub output_tokens: u64,
    pub finish_reason: &'static str,
    pub usage: Usage,
    /// `null`, or the prefill role's handle for the decode engine.
    pub kv_transfer_params: Value,
    /// v1 (`nixl`) prefill: fields also returned at the top level of the body.
    pub top_level: Option<Map<String, Value>>,
}

impl Reply {
    /// The non-streaming response body.
    pub fn full_body(&self) -> Value {
        let n = self.output_tokens;
        let text = output_text(n);
        let mut body = match self.api {
            Api::Completions => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": (0..self.choices).map(|i| json!({
                    "index": i,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": self.finish_reason,
                    "stop_reason": null,
                    "prompt_logprobs": null,
                })).collect::<Vec<_>>(),
                "usage": self.usage.to_json(),
            }),
            Api::Chat => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": null,
                    "finish_reason": self.finish_reason,
                    "stop_reason": null,
                }],
                "usage": self.usage.to_json(),
                "prompt_logprobs": null,
            }),
            Api::Messages => json!({
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": if self.finish_reason == "length" { "max_tokens" } else { "end_turn" },
                "stop_sequence": null,
                "usage": {
                    "input_tokens": self.usage.prompt_tokens,
                    "output_tokens": self.usage.completion_tokens,
                    "cache_read_input_tokens": self.usage.cached_tokens,
                },
            }),
            Api::Responses => json!({
                "id": self.id,
                "object": "response",
                "created_at": self.created,
                "model": self.model,
                "status": "completed",
                "output": [{
                    "type": "message",
                    "id": format!("msg_{}", self.id.trim_start_matches("resp_")),
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }],
                "usage": self.usage.to_responses_json(),
            }),
            Api::Generate => json!({
                "request_id": self.id,
                "choices": [{
                    "index": 0,
                    "token_ids": (0..n).map(output_token_id).collect::<Vec<_>>(),
                    "finish_reason": self.finish_reason,
                }],
                "usage": self.usage.to_json(),
            }),
        };
        if let Some(obj) = body.as_object_mut() {
            obj.insert("kv_transfer_params".into(), self.kv_transfer_params.clone());
            if let Some(top) = &self.top_level {
                obj.extend(top.clone());
            }
        }
        body
    }

    /// The SSE events for output token `i` (one per choice). The last token's chunk carries
    /// `finish_reason` (and, for a streamed prefill, `kv_transfer_params`).
    pub fn token_events(&self, i: u64) -> String {
        let last = i + 1 == self.output_tokens;
        let finish = if last {
            Value::from(self.finish_reason)
        } else {
            Value::Null
        };
        let token = output_token_text(i);
        let mut out = String::new();
        for c in 0..self.choices {
            let choice = match self.api {
                Api::Chat => {
                    let delta = if i == 0 {
                        json!({"role": "assistant", "content": token})
                    } else {
                        json!({"content": token})
                    };
                    json!({"index": c, "delta": delta, "logprobs": null, "finish_reason": finish})
                }
                _ => json!({
                    "index": c,
                    "text": token,
                    "logprobs": null,
                    "finish_reason": finish,
                    "stop_reason": null,
                }),
            };
            let mut chunk = self.chunk_head();
            chunk.insert("choices".into(), json!([choice]));
            if last && !self.kv_transfer_params.is_null() {
                chunk.insert("kv_transfer_params".into(), self.kv_transfer_params.clone());
            }
            push_event(&mut out, &Value::Object(chunk));
        }
        out
    }

    /// The one event of an answer with no tokens (a request declined under
    /// `cache_hit_threshold`): empty text, `finish_reason`.
    pub fn finish_only_event(&self) -> String {
        let choice = match self.api {
            Api::Chat => json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": self.finish_reason}),
            _ => json!({"index": 0, "text": "", "logprobs": null,
                "finish_reason": self.finish_reason, "stop_reason": null}),
        };
        let mut chunk = self.chunk_head();
        chunk.insert("choices".into(), json!([choice]));
        let mut out = String::new();
        push_event(&mut out, &Value::Object(chunk));
        out
    }

    /// The final usage event (`stream_options.include_usage`).
    pub fn usage_event(&self) -> String {
        let mut chunk = self.chunk_head();
        chunk.insert("choices".into(), json!([]));
        chunk.insert("usage".into(), self.usage.to_json());
        let mut out = String::new();
        push_event(&mut out, &Value::Object(chunk));
        out
    }

    fn chunk_head(&self) -> Map<String, Value> {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            _ => "text_completion",
        };
        let mut m = Map::new();
        m.insert("id".into(), Value::from(self.id.as_str()));
        m.insert("object".into(), Value::from(object));
        m.insert("created".into(), Value::from(self.created));
        m.insert("model".into(), Value::from(self.model.as_str()));
        m
    }
}

fn push_event(out: &mut String, v: &Value) {
    out.push_str("data: ");
    out.push_str(&v.to_string());
    out.push_str("\n\n");
}

pub const DONE_EVENT: &str = "data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn completion_prompt_forms() {
        let p = |v: Value| {
            parse_request(Api::Completions, &obj(v), TextTokens::Hashed).map(|r| r.prompts)
        };
        assert_eq!(p(json!({"prompt": "abcdefghi"})).unwrap(), vec![3]);
        assert_eq!(p(json!({"prompt": ""})).unwrap(), vec![1]);
        assert_eq!(
            p(json!({"prompt": ["abcd", "abcdabcd"]})).unwrap(),
            vec![1, 2]
        );
        assert_eq!(p(json!({"prompt": [1, 2, 3]})).unwrap(), vec![3]);
        assert_eq!(p(json!({"prompt": [[1, 2], [3]]})).unwrap(), vec![2, 1]);
        assert!(p(json!({})).is_err());
        assert!(p(json!({"prompt": []})).is_err());
        assert!(p(json!({"prompt": [1, "a"]})).is_err());
        assert!(p(json!({"prompt": {"a": 1}})).is_err());
    }

    #[test]
    fn chat_counts_text_parts_per_piece() {
        let body = obj(json!({
            "messages": [
                {"role": "system", "content": "abcde"},
                {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "x"}}]}
            ],
            "max_tokens": 5,
            "max_completion_tokens": 3,
            "stream": true,
            "stream_options": {"include_usage": true}
        }));
        let r = parse_request(Api::Chat, &body, TextTokens::Hashed).unwrap();
        assert_eq!(r.prompts, vec![3]);
        assert_eq!(r.max_tokens, Some(3));
        assert!(r.stream && r.include_usage);
        assert!(parse_request(
            Api::Chat,
            &obj(json!({"messages": "hi"})),
            TextTokens::Hashed
        )
        .is_err());
    }

    #[test]
    fn limits_and_other_apis() {
        let bad_limit = obj(json!({"prompt": "x", "max_tokens": 0}));
        assert!(parse_request(Api::Completions, &bad_limit, TextTokens::Hashed).is_err());
        let r = parse_request(
            Api::Responses,
            &obj(json!({"input": [{"role": "user", "content": "abcdabcd"}], "instructions": "ab", "max_output_tokens": 4})),
            TextTokens::Hashed,
        )
        .unwrap();
        assert_eq!((r.prompts.clone(), r.max_tokens), (vec![3], Some(4)));
        let r = parse_request(
            Api::Generate,
            &obj(json!({"token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2}, "request_id": "g1"})),
            TextTokens::Hashed,
        )
        .unwrap();
        assert_eq!((r.prompts.clone(), r.max_tokens), (vec![3], Some(2)));
        assert_eq!(r.request_id.as_deref(), Some("g1"));
        assert!(parse_request(
            Api::Generate,
            &obj(json!({"token_ids": []})),
            TextTokens::Hashed
        )
        .is_err());
    }

    /// With byte tokens the engine's ids, laid out as 4 little-endian bytes each, are the
    /// bytes pd-router hashes for the same body without a tokenizer (full 4-byte chunks: the
    /// engine pads the last one, the router hashes only full blocks).
    #[test]
    fn byte_tokens_are_the_routers_prompt_bytes() {
        use sidecar::request::ApiKind;
        use sidecar::router::prefix::prompt_of;
        let chat = obj(json!({"messages": [
            {"role": "system", "content": "You are terse. Catalogue: item 1, item 2, item 3."},
            {"role": "user", "content": [{"type": "text", "text": "Which item"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": " is lightest?"}]},
            {"role": "assistant", "content": "Item 2 (héllo wörld)."},
            {"role": "user", "content": "And the heaviest?"}
        ]}));
        let completion = obj(
            json!({"prompt": "Answer in one short sentence. Question 6: What colour do you get by mixing blue and yellow?\nAnswer:"}),
        );
        let messages = obj(json!({
            "system": [{"type": "text", "text": "You are terse. Catalogue: item 1, item 2."}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Which item is lightest?"}]},
                {"role": "assistant", "content": "Item 2 (héllo wörld)."},
                {"role": "user", "content": "And the heaviest?"}
            ],
            "max_tokens": 8,
        }));
        for (api, kind, body) in [
            (Api::Chat, ApiKind::ChatCompletions, &chat),
            (Api::Completions, ApiKind::Completions, &completion),
            (Api::Messages, ApiKind::Messages, &messages),
        ] {
            let r = parse_request(api, body, TextTokens::Bytes).unwrap();
            let router = prompt_of(kind, body);
            let engine: Vec<u8> = r.prompt_ids[0]
                .iter()
                .flat_map(|id| id.to_le_bytes())
                .collect();
            let full = router.bytes.len() / 4 * 4;
            assert!(full >= 64, "{api:?}: a prompt of several chunks");
            assert_eq!(engine[..full], router.bytes[..full], "{api:?}");
            assert_eq!(
                r.prompts,
                vec![router.tokens],
                "{api:?}: ceil(bytes / 4) of the whole stream"
            );
        }
        // Hashed tokens (the default) never match: they are not the bytes.
        let r = parse_request(Api::Completions, &completion, TextTokens::Hashed).unwrap();
        let engine: Vec<u8> = r.prompt_ids[0]
            .iter()
            .flat_map(|id| id.to_le_bytes())
            .collect();
        assert_ne!(
            engine[..4],
            prompt_of(ApiKind::Completions, &completion).bytes[..4]
        );
    }

    #[test]
    fn byte_tokens_cover_every_api() {
        let p = |api: Api, v: Value| parse_request(api, &obj(v), TextTokens::Bytes).unwrap();
        // A batch of strings: each its own prompt.
        let r = p(Api::Completions, json!({"prompt": ["abcde", "abcd"]}));
        assert_eq!(r.prompts, vec![2, 1]);
        assert_eq!(r.prompt_ids[1], vec![u32::from_le_bytes(*b"abcd")]);
        // Token ids stay ids.
        assert_eq!(
            p(Api::Completions, json!({"prompt": [7, 8]})).prompt_ids,
            vec![vec![7, 8]]
        );
        // Chat: role, newline, content, one stream: "user\nab" is 7 bytes, 2 tokens.
        let r = p(
            Api::Chat,
            json!({"messages": [{"role": "user", "content": "ab"}]}),
        );
        assert_eq!(
            r.prompt_ids[0],
            [u32::from_le_bytes(*b"user"), u32::from_le_bytes(*b"\nab\0")]
        );
        // Responses: instructions and input content (no roles), as one stream.
        let r = p(
            Api::Responses,
            json!({"instructions": "ab", "input": [{"role": "user", "content": "cdef"}, "g"]}),
        );
        assert_eq!(
            r.prompt_ids[0],
            [u32::from_le_bytes(*b"abcd"), u32::from_le_bytes(*b"efg\0")]
        );
        assert_eq!(
            p(Api::Chat, json!({"messages": [{"content": ""}]})).prompts,
            vec![1]
        );
    }

    #[test]
    fn chat_stream_chunks_carry_role_then_finish() {
        let reply = Reply {
            api: Api::Chat,
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
            choices: 1,
            output_tokens: 2,
            finish_reason: "length",
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_tokens: 0,
            },
            kv_transfer_params: Value::Null,
            top_level: None,
        };
        let first: Value =
            serde_json::from_str(reply.token_events(0).trim().trim_start_matches("data: "))
                .unwrap();
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
        let last: Value =
            serde_json::from_str(reply.token_events(1).trim().trim_start_matches("data: "))
                .unwrap();
        assert_eq!(last["choices"][0]["delta"]["content"], " tok1");
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(
            reply.full_body()["choices"][0]["message"]["content"],
            " tok0 tok1"
        );
        assert_eq!(reply.full_body()["usage"]["total_tokens"], 5);
    }
}
