//! llm-d-router's `--configuration` (inline YAML) and `--configuration-file`
//! (a YAML file): the same options as the flags, under the flags' names.
//! They are turned into flags placed before the command line's own, and a
//! key whose flag the command line gives is left out, so flags win. Unknown
//! keys and values of the wrong type are errors, as in llm-d (strict YAML).

use std::ffi::OsString;

use serde_norway::Value;

/// The keys llm-d-router's sidecar configuration takes, and their types.
const KEYS: [(&str, Kind); 28] = [
    ("port", Kind::Int),
    ("vllm-port", Kind::Int),
    ("model-server-port", Kind::Int),
    ("mooncake-bootstrap-port", Kind::Int),
    ("p2p-connector-port", Kind::Int),
    ("enable-p2p-pull", Kind::Bool),
    ("prefill-max-retries", Kind::Count),
    ("prefill-retry-backoff", Kind::Str),
    ("tracing", Kind::Bool),
    ("metrics-port", Kind::Int),
    ("data-parallel-size", Kind::Int),
    ("kv-connector", Kind::Str),
    ("connector", Kind::Str),
    ("ec-connector", Kind::Str),
    ("enable-ssrf-protection", Kind::Bool),
    ("enable-prefiller-sampling", Kind::Bool),
    ("secure-proxy", Kind::Bool),
    ("cert-path", Kind::Str),
    ("enable-tls", Kind::List),
    ("tls-insecure-skip-verify", Kind::List),
    ("prefiller-use-tls", Kind::Bool),
    ("decoder-use-tls", Kind::Bool),
    ("prefiller-tls-insecure-skip-verify", Kind::Bool),
    ("decoder-tls-insecure-skip-verify", Kind::Bool),
    ("inference-pool", Kind::Str),
    ("pool-group", Kind::Str),
    ("max-idle-conns-per-host", Kind::Int),
    ("decode-chunk-size", Kind::Int),
];

#[derive(Clone, Copy)]
enum Kind {
    /// Zero means "not set", as llm-d's plain integer keys.
    Int,
    /// Zero is a value (llm-d reads this key through a pointer): `prefill-max-retries: 0`.
    Count,
    Str,
    Bool,
    List,
}

const INLINE: &str = "--configuration";
const FILE: &str = "--configuration-file";

/// `argv` (program name first) with `--configuration`/`--configuration-file`
/// replaced by the flags their YAML gives.
pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let mut rest: Vec<OsString> = Vec::with_capacity(argv.len());
    let (mut inline, mut file) = (None, None);
    let mut it = argv.into_iter();
    if let Some(program) = it.next() {
        rest.push(program);
    }
    while let Some(arg) = it.next() {
        let s = arg.to_string_lossy().into_owned();
        let (name, value) = match s.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (s.clone(), None),
        };
        let slot = match name.as_str() {
            INLINE => &mut inline,
            FILE => &mut file,
            _ => {
                rest.push(arg);
                continue;
            }
        };
        let value = match value {
            Some(v) => v,
            None => it
                .next()
                .map(|v| v.to_string_lossy().into_owned())
                .ok_or_else(|| format!("{name} needs a value"))?,
        };
        *slot = Some(value);
    }
    let yaml = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err(format!("flags {INLINE} and {FILE} are mutually exclusive"))
        }
        (Some(text), None) => text,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| format!("{FILE}={path}: reading the sidecar configuration: {e}"))?,
        (None, None) => return Ok(rest),
    };
    let given: Vec<String> = rest[1..]
        .iter()
        .filter_map(|a| {
            let s = a.to_string_lossy();
            let name = s.split('=').next()?.trim_start_matches('-').to_string();
            s.starts_with("--").then_some(name)
        })
        .collect();
    let flags = flags_of(&yaml, &given)?;
    let mut out = Vec::with_capacity(rest.len() + flags.len());
    let mut rest = rest.into_iter();
    out.extend(rest.next());
    out.extend(flags.into_iter().map(OsString::from));
    out.extend(rest);
    Ok(out)
}

/// The flags a configuration document gives, leaving out those in `given`.
fn flags_of(yaml: &str, given: &[String]) -> Result<Vec<String>, String> {
    let bad = |e: String| format!("sidecar configuration: {e}");
    let doc: Value = serde_norway::from_str(yaml).map_err(|e| bad(e.to_string()))?;
    let map = match doc {
        Value::Mapping(m) => m,
        Value::Null => return Ok(Vec::new()),
        _ => return Err(bad("expected a mapping of option names to values".into())),
    };
    let mut flags = Vec::new();
    for (k, v) in map {
        let key = k
            .as_str()
            .ok_or_else(|| bad(format!("key {k:?} is not a string")))?
            .to_string();
        let kind = KEYS
            .iter()
            .find(|(n, _)| *n == key)
            .map(|(_, kind)| *kind)
            .ok_or_else(|| bad(format!("unknown field {key:?}")))?;
        let wrong = |want: &str| bad(format!("{key}: expected {want}, got {v:?}"));
        let values: Vec<String> = match (kind, &v) {
            // Zero and empty mean "not set", as in llm-d.
            (Kind::Int | Kind::Count, Value::Number(n)) => match n.as_i64() {
                Some(0) if matches!(kind, Kind::Int) => Vec::new(),
                Some(i) => vec![i.to_string()],
                None => return Err(wrong("an integer")),
            },
            (Kind::Str, Value::String(s)) if s.is_empty() => Vec::new(),
            (Kind::Str, Value::String(s)) => vec![s.clone()],
            (Kind::Bool, Value::Bool(b)) => vec![b.to_string()],
            (Kind::List, Value::Sequence(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| wrong("a list of strings"))
                })
                .collect::<Result<_, _>>()?,
            (_, Value::Null) => Vec::new(),
            (Kind::Int | Kind::Count, _) => return Err(wrong("an integer")),
            (Kind::Str, _) => return Err(wrong("a string")),
            (Kind::Bool, _) => return Err(wrong("true or false")),
            (Kind::List, _) => return Err(wrong("a list of strings")),
        };
        if given.contains(&key) {
            continue;
        }
        flags.extend(values.into_iter().map(|v| format!("--{key}={v}")));
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_strs(args: &[&str]) -> Result<Vec<String>, String> {
        let argv = std::iter::once("pd-sidecar")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        expand(argv).map(|v| v.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn inline_yaml_becomes_flags_that_the_command_line_overrides() {
        let out = expand_strs(&[
            "--configuration={port: 8085, vllm-port: 8203, enable-tls: [prefiller, decoder], secure-proxy: false}",
            "--port=9000",
        ])
        .unwrap();
        assert_eq!(
            out,
            vec![
                "pd-sidecar",
                "--vllm-port=8203",
                "--enable-tls=prefiller",
                "--enable-tls=decoder",
                "--secure-proxy=false",
                "--port=9000"
            ]
        );
        let out = expand_strs(&[
            "--configuration={kv-connector: mooncake, mooncake-bootstrap-port: 9001, enable-p2p-pull: false, p2p-connector-port: 7000, tracing: true}",
        ])
        .unwrap();
        assert_eq!(
            out[1..],
            [
                "--kv-connector=mooncake",
                "--mooncake-bootstrap-port=9001",
                "--enable-p2p-pull=false",
                "--p2p-connector-port=7000",
                "--tracing=true"
            ]
        );
        // Nothing to expand: argv as given.
        assert_eq!(
            expand_strs(&["--port=1"]).unwrap(),
            vec!["pd-sidecar", "--port=1"]
        );
    }

    #[test]
    fn a_file_works_the_same_and_errors_name_the_problem() {
        let path = std::env::temp_dir().join(format!("sidecar-cfg-{}.yaml", std::process::id()));
        std::fs::write(
            &path,
            "kv-connector: sglang\ninference-pool: llm/pool\ndecode-chunk-size: 0\nprefill-max-retries: 0\n",
        )
        .unwrap();
        let file = format!("--configuration-file={}", path.display());
        let out = expand_strs(&[&file]).unwrap();
        // A zero is unset, except where llm-d reads the key as a pointer (retries).
        assert_eq!(
            out[1..],
            [
                "--kv-connector=sglang",
                "--inference-pool=llm/pool",
                "--prefill-max-retries=0"
            ]
        );
        let both = expand_strs(&[&file, "--configuration={port: 1}"]).unwrap_err();
        assert!(both.contains("mutually exclusive"), "{both}");
        std::fs::remove_file(&path).ok();
        for (yaml, want) in [
            ("{no-such-option: 1}", "unknown field"),
            ("{port: eighty}", "expected an integer"),
            ("{secure-proxy: yes please}", "true or false"),
            ("{enable-tls: prefiller}", "list of strings"),
            ("[1, 2]", "mapping"),
        ] {
            let err = expand_strs(&[&format!("--configuration={yaml}")]).unwrap_err();
            assert!(err.contains(want), "{yaml}: {err}");
        }
        assert!(expand_strs(&["--configuration-file=/no/such/file"])
            .unwrap_err()
            .contains("/no/such/file"));
        assert!(expand_strs(&["--configuration"])
            .unwrap_err()
            .contains("needs a value"));
    }
}
