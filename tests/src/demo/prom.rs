//! Just enough of the Prometheus text format to read counters: `name{k="v",...} value` lines,
//! comments skipped. Used by the demo to take deltas of the sidecars' counters around a phase.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses every sample line of `text`; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            if close < open {
                return None;
            }
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, Vec::new(), rest)
        }
    };
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.trim().to_string(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        out.push((key.trim().to_string(), value));
    }
}

/// Sums the samples named `name`, grouped by the value of label `by` (missing label: "").
pub fn sum_by(samples: &[Sample], name: &str, by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        *out.entry(s.label(by).unwrap_or_default().to_string())
            .or_insert(0.0) += s.value;
    }
    out
}

/// Sums every sample named `name`.
pub fn sum(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP pd_sidecar_requests Requests by route and prefill decision.
# TYPE pd_sidecar_requests counter
pd_sidecar_requests_total{route="/v1/completions",decision="remote"} 3
pd_sidecar_requests_total{route="/v1/chat/completions",decision="remote"} 2
pd_sidecar_requests_total{route="/v1/chat/completions",decision="local"} 5
pd_sidecar_errors_total{class="prefill_status, \"5xx\""} 1
pd_sidecar_prefill_retries_total 4
garbage line
"#;

    #[test]
    fn sums_counters_by_label() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 5);
        let by = sum_by(&samples, "pd_sidecar_requests_total", "decision");
        assert_eq!(by["remote"], 5.0);
        assert_eq!(by["local"], 5.0);
        assert_eq!(sum(&samples, "pd_sidecar_prefill_retries_total"), 4.0);
        let errors = sum_by(&samples, "pd_sidecar_errors_total", "class");
        assert_eq!(errors["prefill_status, \"5xx\""], 1.0);
    }
}
