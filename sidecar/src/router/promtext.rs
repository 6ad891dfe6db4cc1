//! A small parser of the Prometheus text exposition format (what vLLM's
//! `/metrics` serves), enough to read a handful of engine gauges robustly.
//!
//! Owns: splitting the text into samples (name, labels, value, optional
//! timestamp), label-value unescaping, the special values `NaN`, `+Inf`,
//! `-Inf`. Comments (`# HELP`, `# TYPE`, anything after `#`) and blank lines are
//! skipped; a malformed line is an error for that line only, so one bad series
//! never hides the others. Label parsing is lazy: a caller that only wants a
//! few families looks at the name first and pays for labels only on those.
//! Nothing here knows which metrics matter (see `probe`).

use std::borrow::Cow;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample<'a> {
    /// The metric name (unescaped when it was quoted, as in `{"a.b",x="y"}`).
    pub name: Cow<'a, str>,
    /// The text after the opening brace up to and including the closing one,
    /// already checked to be well formed ("}" when there are no labels).
    raw_labels: &'a str,
    pub value: f64,
    /// Milliseconds since the epoch, when the line carries one.
    pub timestamp_ms: Option<i64>,
}

impl<'a> Sample<'a> {
    /// The labels, in order, with their values unescaped. A quoted metric name
    /// inside the braces is not a label and is skipped.
    pub fn labels(&self) -> impl Iterator<Item = (Cow<'a, str>, Cow<'a, str>)> + 'a {
        let mut rest = self.raw_labels;
        std::iter::from_fn(move || loop {
            // The text was validated by `parse_line`, so each step succeeds.
            let item = label_item(rest).ok()??;
            rest = item.rest;
            if let Some(value) = item.value {
                return Some((item.name, value));
            }
        })
    }

    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<Cow<'a, str>> {
        self.labels().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// Why a line is not a sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Every sample of `text`, or an error per malformed line.
pub fn samples(text: &str) -> impl Iterator<Item = Result<Sample<'_>, ParseError>> {
    text.lines().enumerate().filter_map(|(i, line)| {
        parse_line(line)
            .map_err(|message| ParseError {
                line: i + 1,
                message,
            })
            .transpose()
    })
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn trim_ws(s: &str) -> &str {
    s.trim_start_matches([' ', '\t'])
}

/// A bare metric or label name at the start of `s`: (name, rest).
fn bare_name(s: &str) -> Option<(&str, &str)> {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, c)) if is_name_start(c) => {}
        _ => return None,
    }
    let end = chars
        .find(|&(_, c)| !is_name_char(c))
        .map_or(s.len(), |(i, _)| i);
    Some((&s[..end], &s[end..]))
}

/// A double-quoted string at the start of `s` (the opening quote included):
/// (unescaped content, rest after the closing quote).
fn quoted(s: &str) -> Result<(Cow<'_, str>, &str), String> {
    let body = s.strip_prefix('"').ok_or("expected '\"'")?;
    let mut owned: Option<String> = None;
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                let value = match owned {
                    Some(o) => Cow::Owned(o),
                    None => Cow::Borrowed(&body[..i]),
                };
                return Ok((value, &body[i + 1..]));
            }
            '\\' => {
                let (_, next) = chars.next().ok_or("unterminated escape")?;
                let out = owned.get_or_insert_with(|| body[..i].to_string());
                match next {
                    'n' => out.push('\n'),
                    '\\' => out.push('\\'),
                    '"' => out.push('"'),
                    // The format defines only the three escapes above; keep
                    // anything else as written rather than reject the line.
                    other => {
                        out.push('\\');
                        out.push(other);
                    }
                }
            }
            c => {
                if let Some(o) = owned.as_mut() {
                    o.push(c);
                }
            }
        }
    }
    Err("unterminated quoted string".into())
}

/// One element inside the braces.
struct LabelItem<'a> {
    name: Cow<'a, str>,
    /// None: a quoted metric name, not a label.
    value: Option<Cow<'a, str>>,
    /// After the element and its separator.
    rest: &'a str,
}

/// The next element of a label list (`rest` starts after `{` or a `,`);
/// `Ok(None)` at the closing brace.
fn label_item(rest: &str) -> Result<Option<LabelItem<'_>>, String> {
    let s = trim_ws(rest);
    if s.starts_with('}') {
        return Ok(None);
    }
    let (name, after_name) = if s.starts_with('"') {
        quoted(s)?
    } else {
        let (n, r) = bare_name(s).ok_or_else(|| format!("bad label name at {:?}", head(s)))?;
        (Cow::Borrowed(n), r)
    };
    let after_name = trim_ws(after_name);
    let (value, after_value) = if let Some(v) = after_name.strip_prefix('=') {
        let (value, r) = quoted(trim_ws(v))?;
        (Some(value), r)
    } else if s.starts_with('"') {
        // A quoted string without `=` is the metric name (UTF-8 names).
        (None, after_name)
    } else {
        return Err(format!("expected '=' after label {name:?}"));
    };
    let after_value = trim_ws(after_value);
    let rest = if let Some(r) = after_value.strip_prefix(',') {
        r
    } else if after_value.starts_with('}') {
        after_value
    } else {
        return Err(format!("expected ',' or '}}' at {:?}", head(after_value)));
    };
    Ok(Some(LabelItem { name, value, rest }))
}

fn head(s: &str) -> &str {
    let end = s.char_indices().nth(16).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

/// Parses a sample value: a float, `NaN`, `+Inf`, `-Inf` (any case).
pub fn parse_value(s: &str) -> Option<f64> {
    match s.to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "+inf" | "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => {
            // Rust also accepts "infinity" and the like; the format does not.
            if s.bytes()
                .any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E')
            {
                return None;
            }
            s.parse().ok()
        }
    }
}

/// One line: `Ok(None)` for comments and blank lines.
pub fn parse_line(line: &str) -> Result<Option<Sample<'_>>, String> {
    let s = trim_ws(line.trim_end_matches(['\r', ' ', '\t']));
    if s.is_empty() || s.starts_with('#') {
        return Ok(None);
    }
    let (mut name, rest) = if s.starts_with('{') {
        (None, s)
    } else {
        let (n, r) = bare_name(s).ok_or_else(|| format!("bad metric name at {:?}", head(s)))?;
        (Some(Cow::Borrowed(n)), r)
    };
    let (raw_labels, rest) = match rest.strip_prefix('{') {
        Some(inner) => {
            let mut cursor = inner;
            while let Some(item) = label_item(cursor)? {
                if item.value.is_none() {
                    if name.is_some() {
                        return Err("two metric names".into());
                    }
                    name = Some(item.name);
                }
                cursor = item.rest;
            }
            let after = trim_ws(cursor).strip_prefix('}').ok_or("expected '}'")?;
            (&inner[..inner.len() - after.len()], after)
        }
        None => ("}", rest),
    };
    let name = name.ok_or("no metric name")?;
    if !rest.starts_with([' ', '\t']) {
        return Err(format!("expected a space before the value of {name}"));
    }
    let mut fields = trim_ws(rest).split([' ', '\t']).filter(|f| !f.is_empty());
    let value_text = fields.next().ok_or_else(|| format!("{name}: no value"))?;
    let value =
        parse_value(value_text).ok_or_else(|| format!("{name}: bad value {value_text:?}"))?;
    let timestamp_ms = match fields.next() {
        // OpenMetrics exemplars follow a '#'.
        None | Some("#") => None,
        Some(t) => Some(
            t.parse::<i64>()
                .or_else(|_| t.parse::<f64>().map(|f| (f * 1000.0) as i64))
                .map_err(|_| format!("{name}: bad timestamp {t:?}"))?,
        ),
    };
    Ok(Some(Sample {
        name,
        raw_labels,
        value,
        timestamp_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Sample<'_> {
        parse_line(line).unwrap().unwrap()
    }

    #[test]
    fn plain_and_labelled_samples() {
        let s = one("vllm:num_requests_waiting 3");
        assert_eq!(
            (s.name.as_ref(), s.value),
            ("vllm:num_requests_waiting", 3.0)
        );
        assert_eq!(s.labels().count(), 0);
        let s = one(r#"vllm:num_requests_running{model_name="m",engine="0"} 2.5"#);
        assert_eq!(s.value, 2.5);
        let labels: Vec<_> = s.labels().collect();
        assert_eq!(
            labels,
            vec![
                (Cow::from("model_name"), Cow::from("m")),
                (Cow::from("engine"), Cow::from("0"))
            ]
        );
        assert_eq!(s.label("engine").as_deref(), Some("0"));
        assert_eq!(s.label("nope"), None);
        // Trailing comma, spaces, tabs, CRLF, an empty label set.
        let s = one("a{ x = \"1\" ,\ty=\"2\", }\t7\r");
        assert_eq!(s.label("y").as_deref(), Some("2"));
        assert_eq!(s.value, 7.0);
        assert_eq!(one("a{} 1").labels().count(), 0);
    }

    #[test]
    fn escaped_label_values() {
        let s = one(r#"m{path="C:\\dir",q="say \"hi\"",nl="a\nb",odd="\x"} 1"#);
        assert_eq!(s.label("path").as_deref(), Some(r"C:\dir"));
        assert_eq!(s.label("q").as_deref(), Some(r#"say "hi""#));
        assert_eq!(s.label("nl").as_deref(), Some("a\nb"));
        assert_eq!(s.label("odd").as_deref(), Some(r"\x"));
        // A '}' or ',' inside a quoted value does not end the label set.
        let s = one(r#"m{a="x}, y=\"z",b="2"} 5"#);
        assert_eq!(s.label("a").as_deref(), Some(r#"x}, y="z"#));
        assert_eq!(s.value, 5.0);
    }

    #[test]
    fn special_values_and_timestamps() {
        assert!(one("m NaN").value.is_nan());
        assert_eq!(one("m +Inf").value, f64::INFINITY);
        assert_eq!(one("m -Inf").value, f64::NEG_INFINITY);
        assert_eq!(one("m 1.5e-3").value, 0.0015);
        assert_eq!(one("m -0").value, 0.0);
        let s = one(r#"m{le="+Inf"} 4 1712345678901"#);
        assert_eq!(s.timestamp_ms, Some(1_712_345_678_901));
        assert_eq!(s.label("le").as_deref(), Some("+Inf"));
        // An OpenMetrics exemplar after the value is ignored.
        assert_eq!(one(r#"m_bucket{le="1"} 3 # {trace_id="x"} 1"#).value, 3.0);
    }

    #[test]
    fn comments_blank_lines_and_quoted_names() {
        assert_eq!(parse_line("# HELP m Help text {with braces}"), Ok(None));
        assert_eq!(parse_line("# TYPE m gauge"), Ok(None));
        assert_eq!(parse_line("   "), Ok(None));
        let s = one(r#"{"my.metric",a="b"} 9"#);
        assert_eq!(s.name, "my.metric");
        assert_eq!(s.labels().collect::<Vec<_>>().len(), 1);
        assert_eq!(s.label("a").as_deref(), Some("b"));
    }

    #[test]
    fn malformed_lines_are_errors_for_that_line_only() {
        for bad in [
            "m",
            "m{a=\"1\"}",
            "m{a=\"1\" 2",
            "m{a=1} 2",
            "m{a=\"unterminated} 2",
            "m{=\"x\"} 1",
            "m abc",
            "m infinity",
            "m 1 notatime",
            "9m 1",
            "{a=\"b\"} 1",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?} parsed");
        }
        let text = "# TYPE a gauge\na 1\nbroken{ 2\nb{x=\"y\"} 3\n";
        let all: Vec<_> = samples(text).collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].as_ref().unwrap().value, 1.0);
        assert_eq!(all[1].as_ref().unwrap_err().line, 3);
        assert_eq!(all[2].as_ref().unwrap().name, "b");
    }
}
