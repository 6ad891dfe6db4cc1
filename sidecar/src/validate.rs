//! The fields of a request that pd-sidecar reads or rewrites before it
//! starts a prefill leg, checked first: a malformed request must cost no
//! prefill engine its compute or its KV blocks. What the sidecar does not
//! touch is left to the engine, which validates everything.
//!
//! The checks accept what vLLM's request models (pydantic, lax mode) accept:
//! an integer may come as `5`, `5.0` or `"5"`, a boolean as `true`, `1` or
//! `"yes"`. Only what vLLM would refuse anyway is refused here.

use serde_json::{Map, Value};

use crate::request::ApiKind;

/// `Err` is the OpenAI-style message for a 400.
pub fn check(api: ApiKind, body: &Map<String, Value>) -> Result<(), String> {
    for field in api.token_limit_fields() {
        limit(body.get(*field), field)?;
    }
    if let Some(v) = present(body.get("stream")) {
        if !is_boolish(v) {
            return Err("'stream' must be a boolean".into());
        }
    }
    if let Some(v) = present(body.get("stream_options")) {
        if !v.is_object() {
            return Err("'stream_options' must be an object".into());
        }
    }
    match api {
        ApiKind::Completions => match body.get("prompt") {
            // vLLM also takes embeddings instead of a prompt.
            None if body.contains_key("prompt_embeds") => Ok(()),
            None => Err("'prompt' is required".into()),
            Some(p) if is_prompt(p) => Ok(()),
            Some(_) => Err(
                "'prompt' must be a string, a list of strings, a list of token ids or a list of \
                 lists of token ids"
                    .into(),
            ),
        },
        ApiKind::Messages
            if !matches!(
                present(body.get("system")),
                None | Some(Value::String(_) | Value::Array(_))
            ) =>
        {
            Err("'system' must be a string or a list of content blocks".into())
        }
        ApiKind::ChatCompletions | ApiKind::Messages => match body.get("messages") {
            Some(Value::Array(msgs)) if !msgs.is_empty() => {
                if msgs.iter().all(Value::is_object) {
                    Ok(())
                } else {
                    Err("'messages' must be a list of message objects".into())
                }
            }
            Some(Value::Array(_)) => Err("'messages' must not be empty".into()),
            Some(_) => Err("'messages' must be a list of message objects".into()),
            None => Err("'messages' is required".into()),
        },
        ApiKind::Responses => match present(body.get("input")) {
            None => Ok(()),
            Some(Value::String(_) | Value::Array(_)) => Ok(()),
            Some(_) => Err("'input' must be a string or a list of input items".into()),
        },
        ApiKind::Generate => match present(body.get("sampling_params")) {
            None => Ok(()),
            Some(Value::Object(params)) => {
                for field in api.sampling_limit_fields() {
                    limit(params.get(*field), &format!("sampling_params.{field}"))?;
                }
                Ok(())
            }
            Some(_) => Err("'sampling_params' must be an object".into()),
        },
    }
}

fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

/// A token limit: absent, null, or a non-negative integer (as pydantic
/// reads one: `5`, `5.0`, `"5"`).
fn limit(v: Option<&Value>, name: &str) -> Result<(), String> {
    let ok = match present(v) {
        None => true,
        Some(Value::Number(n)) => {
            n.as_u64().is_some()
                || n.as_f64()
                    .is_some_and(|f| f.is_finite() && f >= 0.0 && f.fract() == 0.0)
        }
        Some(Value::String(s)) => s.trim().parse::<u64>().is_ok(),
        Some(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("'{name}' must be a non-negative integer"))
    }
}

/// A boolean as pydantic's lax mode reads one.
fn is_boolish(v: &Value) -> bool {
    match v {
        Value::Bool(_) => true,
        Value::Number(n) => matches!(n.as_u64(), Some(0 | 1)),
        Value::String(s) => matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "f" | "false" | "n" | "no" | "1" | "on" | "t" | "true" | "y" | "yes"
        ),
        _ => false,
    }
}

fn is_prompt(p: &Value) -> bool {
    let ids = |v: &Value| {
        v.as_array()
            .is_some_and(|a| a.iter().all(|t| t.as_u64().is_some()))
    };
    match p {
        Value::String(_) => true,
        Value::Array(items) => {
            items.iter().all(Value::is_string)
                || items.iter().all(|t| t.as_u64().is_some())
                || items.iter().all(ids)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn well_formed_requests_pass() {
        for (api, body) in [
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "max_tokens": 5, "stream": true}),
            ),
            // What pydantic's lax mode takes, vLLM takes.
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "max_tokens": 5.0, "stream": "yes"}),
            ),
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "max_tokens": "7", "stream": 0}),
            ),
            (
                ApiKind::Completions,
                json!({"prompt": ["a", "b"], "max_tokens": null}),
            ),
            (ApiKind::Completions, json!({"prompt": [1, 2, 3]})),
            (
                ApiKind::Completions,
                json!({"prompt": [[1, 2], [3]], "min_tokens": 0}),
            ),
            (
                ApiKind::ChatCompletions,
                json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9,
                       "stream_options": {"include_usage": true}}),
            ),
            (
                ApiKind::Responses,
                json!({"input": "hi", "max_output_tokens": 3}),
            ),
            (
                ApiKind::Responses,
                json!({"input": [{"role": "user", "content": "hi"}]}),
            ),
            (
                ApiKind::Generate,
                json!({"token_ids": [1], "sampling_params": {"max_tokens": 4}}),
            ),
        ] {
            assert_eq!(check(api, &obj(body.clone())), Ok(()), "{body}");
        }
    }

    #[test]
    fn what_the_sidecar_reads_or_rewrites_must_have_its_type() {
        for (api, body, needle) in [
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "max_tokens": "lots"}),
                "max_tokens",
            ),
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "max_tokens": -1}),
                "max_tokens",
            ),
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "min_tokens": 1.5}),
                "min_tokens",
            ),
            (
                ApiKind::Completions,
                json!({"prompt": {"text": "hi"}}),
                "prompt",
            ),
            (ApiKind::Completions, json!({"prompt": [1, "a"]}), "prompt"),
            (ApiKind::Completions, json!({"max_tokens": 3}), "prompt"),
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "stream": "sometimes"}),
                "stream",
            ),
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "max_tokens": 2.5}),
                "max_tokens",
            ),
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "max_tokens": "-3"}),
                "max_tokens",
            ),
            (
                ApiKind::Completions,
                json!({"prompt": "hi", "stream_options": 1}),
                "stream_options",
            ),
            (
                ApiKind::ChatCompletions,
                json!({"messages": "hi"}),
                "messages",
            ),
            (
                ApiKind::ChatCompletions,
                json!({"messages": []}),
                "messages",
            ),
            (
                ApiKind::ChatCompletions,
                json!({"messages": ["hi"]}),
                "messages",
            ),
            (ApiKind::ChatCompletions, json!({}), "messages"),
            (ApiKind::Messages, json!({"max_tokens": 3}), "messages"),
            (
                ApiKind::Messages,
                json!({"messages": [{"role": "user", "content": "hi"}], "system": 5}),
                "system",
            ),
            (
                ApiKind::Messages,
                json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
                "max_tokens",
            ),
            (ApiKind::Responses, json!({"input": 5}), "input"),
            (
                ApiKind::Responses,
                json!({"input": "hi", "max_output_tokens": "x"}),
                "max_output_tokens",
            ),
            (
                ApiKind::Generate,
                json!({"sampling_params": 3}),
                "sampling_params",
            ),
            (
                ApiKind::Generate,
                json!({"sampling_params": {"max_tokens": "x"}}),
                "sampling_params.max_tokens",
            ),
        ] {
            let err = check(api, &obj(body.clone())).unwrap_err();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }
}
