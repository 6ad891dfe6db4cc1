//! Tests of `router::chat`.

use super::*;
use crate::request::ApiKind;
use crate::router::prefix::{block_hashes, prompt_of, prompt_with};
use serde_json::json;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat-template")
}

fn template(config: &str) -> ChatTemplate {
    ChatTemplate::from_config(&dir().join(config))
        .unwrap()
        .expect("a chat template")
}

fn chat_tokenizer() -> ChatTokenizer {
    ChatTokenizer {
        tokenizer: tokenizers::Tokenizer::from_file(dir().join("tokenizer.json")).unwrap(),
        template: Some(template("tokenizer_config.json")),
    }
}

fn body(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn wordlevel() -> tokenizers::Tokenizer {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/wordlevel-tokenizer.json");
    tokenizers::Tokenizer::from_file(path).unwrap()
}

#[test]
fn a_tokenizer_counts_exactly_and_blocks_hold_token_ids() {
    let tok = wordlevel();
    // Three words, 17 bytes: the estimate says 5 tokens, the tokenizer 3 (ids 1, 2, 0).
    let b = body(json!({"prompt": "hello world again"}));
    let p = prompt_with(ApiKind::Completions, &b, Some(&tok));
    assert_eq!(p.tokens, 3);
    assert_eq!(
        p.bytes,
        [1u32, 2, 0]
            .iter()
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<_>>()
    );
    assert_eq!(prompt_of(ApiKind::Completions, &b).tokens, 5);
    // Text and raw ids mix; the ids count one each.
    let p = prompt_with(
        ApiKind::Completions,
        &body(json!({"prompt": ["hello", 7]})),
        Some(&tok),
    );
    assert_eq!(p.tokens, 2);
    // Chat: role and content are tokenized; a block of 2 tokens is 8 bytes of ids.
    let chat = body(json!({"messages": [{"role": "user", "content": "hello world hello world"}]}));
    let p = prompt_with(ApiKind::ChatCompletions, &chat, Some(&tok));
    assert_eq!(p.tokens, 5, "user, then 4 words");
    assert_eq!(block_hashes("m", &p.bytes, 2, 64).len(), 2);
}

/// Every case of cases.json renders to what transformers renders (Jinja2) from the
/// conversation vLLM builds of the request.
#[test]
fn renders_like_transformers_on_vllms_conversation() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let t = template(case["config"].as_str().unwrap());
        let got = t.render(case["request"].as_object().unwrap());
        match &case["expected"] {
            Value::String(expected) => {
                assert_eq!(got.as_deref(), Ok(expected.as_str()), "{name}")
            }
            other => {
                let e = got.unwrap_err();
                let wanted = other["error"].as_str().unwrap();
                assert!(e.contains(wanted), "{name}: {e}");
            }
        }
    }
}

#[test]
fn chat_ids_are_the_rendered_text_without_added_special_tokens() {
    let tok = chat_tokenizer();
    let b = body(json!({"messages": [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "hello world"}
    ]}));
    // <|begin_of_text|> <|start_header_id|> system <|end_header_id|> you are helpful
    // <|eot_id|> ... user ... hello world <|eot_id|> <|start_header_id|> assistant
    // <|end_header_id|>: one BOS, the template's; the tokenizer's post-processor would
    // add a second with add_special_tokens.
    let expected = [
        100, 101, 1, 102, 5, 6, 7, 103, 101, 2, 102, 8, 9, 103, 101, 3, 102,
    ];
    assert_eq!(chat_ids(&tok, &b).unwrap(), expected);
    let text = tok.template.as_ref().unwrap().render(&b).unwrap();
    let with_special = tok.tokenizer.encode(text.as_str(), true).unwrap();
    assert_eq!(
        with_special.get_ids()[..2],
        [100, 100],
        "why vLLM passes false"
    );
    // The prompt the router hashes: those ids, 4 bytes each; the count is exact.
    let p = prompt_with(ApiKind::ChatCompletions, &b, Some(&tok));
    assert_eq!(p.tokens, 17);
    let bytes: Vec<u8> = expected
        .iter()
        .flat_map(|i: &u32| i.to_le_bytes())
        .collect();
    assert_eq!(p.bytes, bytes);
    // Without the template: role + text, 7 tokens.
    let p = prompt_with(ApiKind::ChatCompletions, &b, Some(&tok.tokenizer));
    assert_eq!(p.tokens, 7);
    // Other APIs are not templated.
    let c = body(json!({"prompt": "hello world"}));
    assert_eq!(prompt_with(ApiKind::Completions, &c, Some(&tok)).tokens, 2);
}

#[test]
fn a_failing_template_still_counts_the_request_and_is_counted_once_logged() {
    let tok = chat_tokenizer();
    let t = tok.template.as_ref().unwrap();
    let b = body(json!({"messages": [
        {"role": "user", "content": "hello"}, {"role": "user", "content": "world"}
    ]}));
    assert!(chat_ids(&tok, &b).is_none());
    let p = prompt_with(ApiKind::ChatCompletions, &b, Some(&tok));
    // The approximation with the tokenizer: user hello user world.
    assert_eq!(p.tokens, 4);
    assert_eq!(t.failures(), 2);
    assert!(!t.failed(), "only the first failure asks to be logged");
    // Bodies the template cannot take at all fall back the same way.
    for bad in [
        json!({"messages": "hello"}),
        json!({"messages": [{"content": "no role"}]}),
        json!({"messages": [{"role": "user", "content": "x"}], "continue_final_message": true}),
    ] {
        assert!(chat_ids(&tok, &body(bad.clone())).is_none(), "{bad}");
    }
    assert_eq!(
        prompt_of(ApiKind::ChatCompletions, &b).bytes,
        b"user\nhellouser\nworld"
    );
}

#[test]
fn continue_final_message_cuts_after_the_final_text() {
    let t = template("tokenizer_config.json");
    let text = t
        .render(&body(json!({
            "messages": [{"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "hello world again "}],
            "add_generation_prompt": false, "continue_final_message": true
        })))
        .unwrap();
    assert!(
        text.ends_with("<|end_header_id|>\n\nhello world again"),
        "{text:?}"
    );
}

#[test]
fn content_format_follows_the_templates_loops() {
    assert_eq!(
        template("tokenizer_config.json").content_format,
        ContentFormat::String
    );
    let looping =
        "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}|{% endfor %}{% endfor %}";
    let t = ChatTemplate::new(looping.into(), Vec::new(), "x".into()).unwrap();
    assert_eq!(t.content_format, ContentFormat::OpenAi);
    let out = t
        .render(&body(json!({"messages": [
            {"role": "user", "content": "plain"},
            {"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "image_url", "image_url": {"url": "x"}},
                                         {"type": "text", "text": "b"}]}
        ]})))
        .unwrap();
    assert_eq!(out, "plain|a||b|");
    for (src, loops) in [
        ("{%- for item in message.content | reverse %}", true),
        ("{% for c in content %}", true),
        ("{% for m in messages[1:] %}", false),
        ("{% for m in messages %}{{ m['content'] }}", false),
    ] {
        assert_eq!(loops_over_content(src), loops, "{src}");
    }
}

#[test]
fn tojson_is_pythons_json_dumps() {
    let t = ChatTemplate::new(
        "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ y | tojson }}".into(),
        Vec::new(),
        "x".into(),
    )
    .unwrap();
    let env = &t.env;
    let out = env
        .get_template(TEMPLATE)
        .unwrap()
        .render(minijinja::context! {
            x => to_mj(&json!({"a": "q\"\né中", "b": [1, 2.0, null, true]})),
            y => to_mj(&json!([1e-05, 1e16, 0.1, 123456789012345678u64])),
        })
        .unwrap();
    // json.dumps as transformers' tojson writes them (Jinja2 3.1.6).
    assert_eq!(
        out,
        "{\"a\": \"q\\\"\\né中\", \"b\": [1, 2.0, null, true]}|{\n  \"a\": \"q\\\"\\né中\",\n  \
             \"b\": [\n    1,\n    2.0,\n    null,\n    true\n  ]\n}|[1e-05, 1e+16, 0.1, \
             123456789012345678]"
    );
}

#[test]
fn strftime_formats_like_python() {
    // 2026-12-02 13:05:09 UTC, a Wednesday.
    let t = 1_796_216_709;
    assert_eq!(strftime("%d %b %Y", t), "02 Dec 2026");
    assert_eq!(
        strftime("%A %B %-d, %y %H:%M:%S %p %j %%", t),
        "Wednesday December 2, 26 13:05:09 PM 336 %"
    );
    assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
    assert_eq!(strftime("%d %b %Y", 951_782_400), "29 Feb 2000");
    let now = ChatTemplate::new("{{ strftime_now('%Y') }}".into(), Vec::new(), "x".into())
        .unwrap()
        .render(&body(json!({"messages": []})))
        .unwrap();
    assert!(now.parse::<i32>().is_ok_and(|y| y >= 2025), "{now}");
}

#[test]
fn config_errors_are_clear_at_load() {
    let d = std::env::temp_dir().join(format!("pd-router-chat-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let bad = d.join("tokenizer_config.json");
    std::fs::write(
        &bad,
        r#"{"chat_template": "{% for m in messages %}{{ m.content }"}"#,
    )
    .unwrap();
    let e = ChatTemplate::from_config(&bad).unwrap_err();
    assert!(
        e.contains("chat_template") && e.contains(&bad.display().to_string()),
        "{e}"
    );
    std::fs::write(&bad, r#"{"eos_token": "</s>"}"#).unwrap();
    assert!(ChatTemplate::from_config(&bad).unwrap().is_none());
    std::fs::write(
            &bad,
            r#"{"bos_token": {"content": "<s>"}, "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]}"#,
        )
        .unwrap();
    let t = ChatTemplate::from_config(&bad).unwrap().unwrap();
    assert_eq!(t.render(&body(json!({"messages": []}))).unwrap(), "<s>D");
    // A chat_template.jinja beside the config wins, as in transformers.
    std::fs::write(d.join("chat_template.jinja"), "J{{ messages | length }}").unwrap();
    let t = ChatTemplate::from_config(&bad).unwrap().unwrap();
    assert_eq!(
        t.render(&body(
            json!({"messages": [{"role": "user", "content": ""}]})
        ))
        .unwrap(),
        "J1"
    );
    assert!(ChatTemplate::from_config(&d.join("missing.json")).is_err());
}
