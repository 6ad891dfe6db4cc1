//! The model's chat template, applied to a chat request the way vLLM does before it
//! tokenizes, so that pd-router counts and hashes the tokens the engine will see.
//!
//! Owns loading the template (HF `tokenizer_config.json`: `chat_template` and the special
//! tokens; a `chat_template.jinja` beside it wins, as in transformers), turning a request's
//! `messages` into the conversation vLLM hands to the template, and rendering it with
//! minijinja set up like transformers' Jinja environment (`trim_blocks`, `lstrip_blocks`,
//! loop controls, `raise_exception`, `strftime_now`, a Python-compatible `tojson`, Python's
//! string and dict methods). It does not tokenize or hash: `prefix.rs` does, with
//! `add_special_tokens=False` as vLLM 0.26 does for chat (transformers'
//! `apply_chat_template(tokenize=True)` encodes the rendered text that way; the template
//! writes the BOS itself where the model has one).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use minijinja::value::{Kwargs, Value as Mj};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::{Map, Value};

/// How message content reaches the template, as vLLM's `chat_template_content_format`
/// "auto" decides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentFormat {
    /// Text parts joined with newlines into one string.
    String,
    /// A list of parts (`{"type": "text", "text": ...}`, `{"type": "image"}`, ...): the
    /// template loops over the content.
    OpenAi,
}

/// A loaded chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The file the template came from.
    pub source: PathBuf,
    /// The special tokens transformers passes to the template (`bos_token`, `eos_token`, ...).
    special: Vec<(String, Mj)>,
    pub content_format: ContentFormat,
    /// The template handles the `developer` role itself (else vLLM makes it `system`).
    developer_role: bool,
    failures: AtomicU64,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChatTemplate({}, {:?})",
            self.source.display(),
            self.content_format
        )
    }
}

/// A tokenizer.json and, when found, the model's chat template.
pub struct ChatTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub template: Option<ChatTemplate>,
}

impl std::ops::Deref for ChatTokenizer {
    type Target = tokenizers::Tokenizer;
    fn deref(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }
}

/// What `prefix::prompt_with` tokenizes with: a tokenizer.json alone, or with the model's
/// chat template.
pub trait PromptTokenizer {
    fn tokenizer(&self) -> &tokenizers::Tokenizer;
    fn chat_template(&self) -> Option<&ChatTemplate> {
        None
    }
}

impl PromptTokenizer for tokenizers::Tokenizer {
    fn tokenizer(&self) -> &tokenizers::Tokenizer {
        self
    }
}

impl PromptTokenizer for ChatTokenizer {
    fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }
    fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }
}

/// The token ids vLLM computes for a chat request: the rendered template encoded without
/// adding special tokens. None without a template, or when rendering or encoding fails
/// (then logged once per template, and the caller counts the messages its own way).
pub fn chat_ids<T: PromptTokenizer + ?Sized>(t: &T, body: &Map<String, Value>) -> Option<Vec<u32>> {
    let template = t.chat_template()?;
    let result = template.render(body).and_then(|text| {
        t.tokenizer()
            .encode_fast(text.as_str(), false)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| format!("tokenizing the rendered chat: {e}"))
    });
    match result {
        Ok(ids) => Some(ids),
        Err(e) => {
            if template.failed() {
                tracing::warn!(
                    template = %template.source.display(),
                    error = %e,
                    "the chat template failed on a request; such requests are counted as role + \
                     text (logged once)"
                );
            }
            None
        }
    }
}

const TEMPLATE: &str = "chat";

/// The special-token keys of a tokenizer_config.json that transformers' `special_tokens_map`
/// hands to the template.
const SPECIAL_TOKENS: [&str; 8] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
];

/// A special token as tokenizer_config.json writes it: a string or an AddedToken object.
fn token_text(v: &Value) -> Option<Mj> {
    match v {
        Value::String(s) => Some(Mj::from(s.as_str())),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(Mj::from),
        Value::Array(items) => Some(Mj::from(
            items.iter().filter_map(token_text).collect::<Vec<_>>(),
        )),
        _ => None,
    }
}

impl ChatTemplate {
    /// The template of a tokenizer_config.json (or of the `chat_template.jinja` beside it).
    /// `Ok(None)`: the model has none.
    pub fn from_config(path: &Path) -> Result<Option<ChatTemplate>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let special = SPECIAL_TOKENS
            .iter()
            .filter_map(|k| {
                config
                    .get(*k)
                    .and_then(token_text)
                    .map(|v| (k.to_string(), v))
            })
            .collect();
        let jinja = path.with_file_name("chat_template.jinja");
        let (source, template) = if jinja.is_file() {
            let t =
                std::fs::read_to_string(&jinja).map_err(|e| format!("{}: {e}", jinja.display()))?;
            (jinja, t)
        } else {
            match config.get("chat_template") {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(t)) => (path.to_path_buf(), t.clone()),
                // Several named templates: the one named "default", as transformers picks.
                Some(Value::Array(named)) => {
                    let default =
                        named
                            .iter()
                            .find(|t| t["name"] == "default")
                            .ok_or_else(|| {
                                format!(
                            "{}: chat_template lists named templates but none named \"default\"",
                            path.display()
                        )
                            })?;
                    let t = default["template"].as_str().ok_or_else(|| {
                        format!(
                            "{}: chat_template \"default\" has no template",
                            path.display()
                        )
                    })?;
                    (path.to_path_buf(), t.to_string())
                }
                Some(other) => {
                    return Err(format!(
                        "{}: chat_template must be a string, got {other}",
                        path.display()
                    ))
                }
            }
        };
        ChatTemplate::new(template, special, source).map(Some)
    }

    /// Compiles `template`; a syntax error is an error here, not at the first request.
    pub fn new(
        template: String,
        special: Vec<(String, Mj)>,
        source: PathBuf,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| e.to_string())?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Mj, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| {
            strftime(&format, unix_now())
        });
        env.add_filter("tojson", tojson);
        let content_format = if loops_over_content(&template) {
            ContentFormat::OpenAi
        } else {
            ContentFormat::String
        };
        let developer_role = template.contains("\"developer\"") || template.contains("'developer'");
        env.add_template_owned(TEMPLATE, template)
            .map_err(|e| format!("{}: chat_template: {e:#}", source.display()))?;
        Ok(ChatTemplate {
            env,
            source,
            special,
            content_format,
            developer_role,
            failures: AtomicU64::new(0),
        })
    }

    /// Renders a chat request's `messages` as vLLM would hand them to the template.
    pub fn render(&self, body: &Map<String, Value>) -> Result<String, String> {
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .ok_or("no messages list")?;
        let flag = |k: &str, default: bool| body.get(k).and_then(Value::as_bool).unwrap_or(default);
        let add_generation_prompt = flag("add_generation_prompt", true);
        let continue_final = flag("continue_final_message", false);
        if add_generation_prompt && continue_final {
            return Err("add_generation_prompt and continue_final_message are both set".into());
        }
        let conversation = self.conversation(messages)?;
        // transformers: the special tokens, then the caller's kwargs; vLLM: the request's
        // chat_template_kwargs, overridden by the request's own fields that are set.
        let mut ctx: Vec<(String, Mj)> = self.special.clone();
        let mut set = |k: &str, v: Mj| match ctx.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v,
            None => ctx.push((k.to_string(), v)),
        };
        let kwargs = body.get("chat_template_kwargs").and_then(Value::as_object);
        for (k, v) in kwargs.into_iter().flatten() {
            if !v.is_null() {
                set(k, to_mj(v));
            }
        }
        if let Some(effort) = body.get("reasoning_effort").and_then(Value::as_str) {
            set("reasoning_effort", Mj::from(effort));
            if !kwargs.is_some_and(|k| k.contains_key("enable_thinking")) {
                set("enable_thinking", Mj::from(effort != "none"));
            }
        }
        set("messages", Mj::from(conversation.clone()));
        set("tools", body.get("tools").map_or(Mj::from(()), to_mj));
        set(
            "documents",
            body.get("documents").map_or(Mj::from(()), to_mj),
        );
        set("add_generation_prompt", Mj::from(add_generation_prompt));
        let template = self.env.get_template(TEMPLATE).map_err(|e| e.to_string())?;
        let mut text = template
            .render(Mj::from_pairs(ctx))
            .map_err(|e| format!("{e:#}"))?;
        if continue_final {
            // transformers: cut after the final message's (stripped) text.
            let last = conversation.last().ok_or("no messages")?;
            let content = last.get_attr("content").map_err(|e| e.to_string())?;
            let final_text = match content.as_str() {
                Some(s) => s.trim().to_string(),
                None => content
                    .try_iter()
                    .map_err(|e| e.to_string())?
                    .filter_map(|p| {
                        p.get_attr("text")
                            .ok()
                            .and_then(|t| t.as_str().map(str::to_string))
                    })
                    .last()
                    .ok_or("the final message has no text to continue")?
                    .trim()
                    .to_string(),
            };
            let at = text
                .rfind(&final_text)
                .ok_or("the final message is not in the rendered chat")?;
            text.truncate(at + final_text.len());
        }
        Ok(text)
    }

    /// Counts a failed render; true the first time (the caller logs it then).
    pub fn failed(&self) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed) == 0
    }

    /// Requests whose render failed (they were counted by approximation).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// vLLM's conversation: each message rebuilt from its role and content (as one string
    /// or a list of parts, by [`ContentFormat`]) and the fields templates read.
    fn conversation(&self, messages: &[Value]) -> Result<Vec<Mj>, String> {
        let mut out: Vec<Vec<(&str, Mj)>> = Vec::with_capacity(messages.len());
        let developer_to_system = !self.developer_role
            && messages
                .iter()
                .any(|m| m.get("role").and_then(Value::as_str) == Some("developer"));
        for m in messages {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or("a message without a role")?;
            let role = if developer_to_system && role == "developer" {
                "system"
            } else {
                role
            };
            let parts = match m.get("content") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => vec![Part::Text(s)],
                Some(Value::Array(items)) => items.iter().filter_map(Part::of).collect(),
                Some(_) => return Err("message content must be a string or a list".into()),
            };
            let only_text = parts.iter().all(|p| matches!(p, Part::Text(_)));
            let content =
                if self.content_format == ContentFormat::String || (role == "tool" && only_text) {
                    Mj::from(
                        parts
                            .iter()
                            .filter_map(Part::text)
                            .collect::<Vec<_>>()
                            .join("\n"),
                    )
                } else {
                    Mj::from(parts.iter().map(Part::to_mj).collect::<Vec<_>>())
                };
            let mut msg = vec![("role", Mj::from(role)), ("content", content)];
            if role == "assistant" {
                if let Some(Value::Array(calls)) = m.get("tool_calls") {
                    if !calls.is_empty() {
                        msg.push(("tool_calls", tool_calls(calls)?));
                    }
                }
                if let Some(r) = m.get("reasoning").filter(|r| !r.is_null()) {
                    msg.push(("reasoning", to_mj(r)));
                    msg.push(("reasoning_content", to_mj(r)));
                }
            }
            if role == "tool" {
                if let Some(id) = m.get("tool_call_id") {
                    msg.push(("tool_call_id", to_mj(id)));
                }
            }
            if let Some(name) = m.get("name").filter(|n| n.is_string()) {
                msg.push(("name", to_mj(name)));
            }
            if m.get("role").and_then(Value::as_str) == Some("developer") && !developer_to_system {
                msg.push(("tools", m.get("tools").map_or(Mj::from(()), to_mj)));
            }
            out.push(msg);
        }
        if developer_to_system {
            consolidate_system(&mut out);
        }
        Ok(out
            .into_iter()
            .map(|m| Mj::from_pairs(m.into_iter().map(|(k, v)| (k.to_string(), v))))
            .collect())
    }
}

/// vLLM's consolidation after turning `developer` into `system`: when a system message is
/// not first or there are several, they become one, first, joined by blank lines.
fn consolidate_system(out: &mut Vec<Vec<(&str, Mj)>>) {
    let is_system = |m: &Vec<(&str, Mj)>| m[0].1.as_str() == Some("system");
    let systems: Vec<usize> = (0..out.len()).filter(|&i| is_system(&out[i])).collect();
    if systems.is_empty() || (systems == [0]) {
        return;
    }
    let texts: Vec<String> = systems
        .iter()
        .filter_map(|&i| {
            let c = &out[i][1].1;
            let s = match c.as_str() {
                Some(s) => s.to_string(),
                None => c
                    .try_iter()
                    .ok()?
                    .filter_map(|p| {
                        p.get_attr("text")
                            .ok()
                            .and_then(|t| t.as_str().map(str::to_string))
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            (!s.is_empty()).then_some(s)
        })
        .collect();
    out.retain(|m| !is_system(m));
    out.insert(
        0,
        vec![
            ("role", Mj::from("system")),
            ("content", Mj::from(texts.join("\n\n"))),
        ],
    );
}

/// One content part, as vLLM reads it.
enum Part<'a> {
    Text(&'a str),
    /// An image, audio or video part: only its modality reaches the template.
    Media(&'static str),
}

impl<'a> Part<'a> {
    fn of(v: &'a Value) -> Option<Part<'a>> {
        if let Value::String(s) = v {
            return Some(Part::Text(s));
        }
        let kind = v.get("type").and_then(Value::as_str)?;
        let text_key = match kind {
            "text" | "input_text" | "output_text" => "text",
            "refusal" => "refusal",
            "thinking" => "thinking",
            "image_url" | "input_image" | "image_pil" | "image_embeds" => {
                return Some(Part::Media("image"))
            }
            "audio_url" | "input_audio" | "audio_embeds" => return Some(Part::Media("audio")),
            "video_url" => return Some(Part::Media("video")),
            _ => return None,
        };
        v.get(text_key).and_then(Value::as_str).map(Part::Text)
    }

    fn text(&self) -> Option<&'a str> {
        match self {
            Part::Text(t) => Some(t),
            Part::Media(_) => None,
        }
    }

    fn to_mj(&self) -> Mj {
        match self {
            Part::Text(t) => Mj::from_pairs([("type", Mj::from("text")), ("text", Mj::from(*t))]),
            Part::Media(m) => Mj::from_pairs([("type", Mj::from(*m))]),
        }
    }
}

/// An assistant's tool calls with their `arguments` as a mapping, as vLLM passes them
/// (the OpenAI API sends a JSON string; empty or absent means `{}`).
fn tool_calls(calls: &[Value]) -> Result<Mj, String> {
    let mut out = Vec::with_capacity(calls.len());
    for call in calls {
        let mut call = call.clone();
        if let Some(f) = call.get_mut("function").and_then(Value::as_object_mut) {
            let args = match f.get("arguments") {
                Some(Value::String(s)) if !s.is_empty() => match serde_json::from_str::<Value>(s) {
                    Ok(Value::Null) => Value::Object(Map::new()),
                    Ok(v) => v,
                    Err(e) => return Err(format!("tool call arguments are not JSON: {e}")),
                },
                Some(v @ (Value::Object(_) | Value::Array(_))) => v.clone(),
                _ => Value::Object(Map::new()),
            };
            f.insert("arguments".into(), args);
        }
        out.push(to_mj(&call));
    }
    Ok(Mj::from(out))
}

/// A JSON value as a template value.
pub fn to_mj(v: &Value) -> Mj {
    match v {
        Value::Null => Mj::from(()),
        Value::Bool(b) => Mj::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Mj::from(i),
            (None, Some(u)) => Mj::from(u),
            _ => Mj::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Mj::from(s.as_str()),
        Value::Array(items) => Mj::from(items.iter().map(to_mj).collect::<Vec<_>>()),
        Value::Object(m) => Mj::from_pairs(m.iter().map(|(k, v)| (k.clone(), to_mj(v)))),
    }
}

/// Whether the template loops over a message's content (vLLM then passes parts, not a
/// string): a `for` whose iterable is `<something>['content']`, `<something>.content` or
/// a variable named `content`, filters and slices aside.
fn loops_over_content(template: &str) -> bool {
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let end = after.find("%}").unwrap_or(after.len());
        let stmt = after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if let Some(head) = stmt.strip_prefix("for ") {
            if let Some((_, iter)) = head.split_once(" in ") {
                let iter = iter.split(['|', ' ']).next().unwrap_or("").trim();
                let iter = iter.split('[').fold(String::new(), |acc, piece| {
                    if piece.starts_with(':') || piece.starts_with("::") {
                        acc
                    } else if acc.is_empty() {
                        piece.to_string()
                    } else {
                        format!("{acc}[{piece}")
                    }
                });
                if iter == "content"
                    || iter.ends_with("['content']")
                    || iter.ends_with("[\"content\"]")
                    || iter.ends_with(".content")
                {
                    return true;
                }
            }
        }
        rest = &after[end..];
    }
    false
}

/// transformers' `tojson`: Python's `json.dumps` (`ensure_ascii=False`, `", "` and `": "`
/// separators, `indent`, `sort_keys`), not minijinja's HTML-safe compact JSON.
fn tojson(value: &Mj, kwargs: Kwargs) -> Result<Mj, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    let opts = JsonOpts {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    py_json(value, &opts, 0, &mut out)?;
    Ok(Mj::from(out))
}

struct JsonOpts {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn py_json(v: &Mj, o: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = o.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let item_sep = if o.indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let x = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                out.push_str(&py_float(x));
            }
        }
        ValueKind::String => py_string(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Mj> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_json(item, o, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Mj> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_string(&k.to_string(), o.ensure_ascii, out);
                out.push_str(": ");
                py_json(&v.get_item(k)?, o, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize {}", v.kind()),
            ))
        }
    }
    Ok(())
}

/// Python's `repr` of a float: shortest round trip, exponent below 1e-4 and from 1e16.
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = x.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        return format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        );
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

fn py_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `strftime_now`'s formatting of a UNIX time (UTC) for the directives chat templates use:
/// `%Y %y %m %d %e %j %H %I %M %S %p %b %B %a %A %%`, glibc's `%-d`-style unpadded forms.
pub fn strftime(format: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut d = chars.next();
        let unpadded = d == Some('-');
        if unpadded {
            d = chars.next();
        }
        let num = |n: i64, width: usize| {
            if unpadded {
                n.to_string()
            } else {
                format!("{n:0width$}")
            }
        };
        let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        match d {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year % 100, 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('a') => out.push_str(&DAYS[weekday as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday as usize]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests;
