//! Fields of a request body that only Tandem may set. vLLM's NixlConnector
//! reads `kv_transfer_params` to learn which host to pull KV from and which
//! of its blocks; SGLang reads `bootstrap_host`/`bootstrap_port`/
//! `bootstrap_room`; NIXL v1 reads the same fields at the top level. A client
//! that sets them could point a decode engine at any host, or at other users'
//! blocks, so pd-router removes them from every client body and pd-sidecar
//! from every body it forwards, before any leg is built.
//!
//! Fast path: a body in which none of the names can occur, not even written
//! with `\u` escapes, is returned as it came, unparsed.

use bytes::Bytes;
use serde_json::{Map, Value};

/// Always removed: vLLM's transfer parameters.
pub const KV_TRANSFER_PARAMS: &str = "kv_transfer_params";
/// NIXL v1 (`--kv-connector nixl`): `kv_transfer_params` and the transfer
/// fields v1 reads at the top level.
pub const NIXL_V1_RESERVED: [&str; 9] = [
    KV_TRANSFER_PARAMS,
    "do_remote_prefill",
    "do_remote_decode",
    "remote_engine_id",
    "remote_block_ids",
    "remote_host",
    "remote_port",
    "remote_request_id",
    "tp_size",
];
/// SGLang: `kv_transfer_params` and SGLang's disaggregation fields; also what
/// pd-router removes from every client body.
pub const SGLANG_RESERVED: [&str; 4] = [
    KV_TRANSFER_PARAMS,
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
];

/// Why a body that may carry a reserved field could not be cleaned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripError {
    InvalidJson(String),
    NotAnObject,
}

/// Removes the top-level `fields` from `body`; true if any was there.
pub fn strip_map(body: &mut Map<String, Value>, fields: &[&str]) -> bool {
    let mut removed = false;
    for f in fields {
        removed |= body.remove(*f).is_some();
    }
    removed
}

/// `raw` without the top-level `fields`. Returns `raw` itself (no copy, no
/// parse) when no field name and no `\u` escape occurs in it; otherwise
/// parses it, and re-serialises it only when a field was removed. A body
/// that may hide a field but does not parse is refused: the engine's parser
/// might accept what ours does not (`NaN`, say) and read the field.
pub fn strip(raw: Bytes, fields: &[&str]) -> Result<Bytes, StripError> {
    let may_hold = memchr::memmem::find(&raw, b"\\u").is_some()
        || fields
            .iter()
            .any(|f| memchr::memmem::find(&raw, f.as_bytes()).is_some());
    if !may_hold {
        return Ok(raw);
    }
    let mut body = match serde_json::from_slice::<Value>(&raw) {
        Ok(Value::Object(body)) => body,
        Ok(_) => return Err(StripError::NotAnObject),
        Err(e) => return Err(StripError::InvalidJson(e.to_string())),
    };
    if !strip_map(&mut body, fields) {
        return Ok(raw);
    }
    let out = serde_json::to_vec(&Value::Object(body))
        .map_err(|e| StripError::InvalidJson(e.to_string()))?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(raw: &str, fields: &[&str]) -> Result<Value, StripError> {
        strip(Bytes::from(raw.to_string()), fields)
            .map(|b| serde_json::from_slice(&b).expect("still JSON"))
    }

    #[test]
    fn reserved_fields_go_and_everything_else_stays() {
        let got = run(
            r#"{"model":"m","prompt":"p","kv_transfer_params":{"do_remote_prefill":true,"remote_host":"127.0.0.1"},"max_tokens":3}"#,
            &[KV_TRANSFER_PARAMS],
        )
        .unwrap();
        assert_eq!(got, json!({"model": "m", "prompt": "p", "max_tokens": 3}));
        let got = run(
            r#"{"prompt":"p","bootstrap_host":"evil","bootstrap_port":1,"bootstrap_room":7}"#,
            &SGLANG_RESERVED,
        )
        .unwrap();
        assert_eq!(got, json!({"prompt": "p"}));
    }

    #[test]
    fn bodies_without_the_names_pass_untouched_and_unparsed() {
        // Not even JSON: nothing to hide a field in, so the engine judges it.
        let raw = Bytes::from_static(b"{not json at all");
        let out = strip(raw.clone(), &[KV_TRANSFER_PARAMS]).unwrap();
        assert_eq!(out.as_ptr(), raw.as_ptr(), "the same bytes, not a copy");
        // The name inside a prompt string is not a field: kept as sent.
        let raw = Bytes::from_static(br#"{"prompt":"what is kv_transfer_params?"}"#);
        assert_eq!(strip(raw.clone(), &[KV_TRANSFER_PARAMS]).unwrap(), raw);
    }

    #[test]
    fn escaped_names_and_duplicate_keys_do_not_slip_through() {
        let got = run(
            r#"{"prompt":"p","kv_transfer_param\u0073":{"remote_host":"127.0.0.1"}}"#,
            &[KV_TRANSFER_PARAMS],
        )
        .unwrap();
        assert_eq!(got, json!({"prompt": "p"}));
        let got = run(
            r#"{"kv_transfer_params":null,"prompt":"p","kv_transfer_params":{"remote_host":"x"}}"#,
            &[KV_TRANSFER_PARAMS],
        )
        .unwrap();
        assert_eq!(got, json!({"prompt": "p"}));
    }

    #[test]
    fn a_body_that_may_hide_a_field_but_does_not_parse_is_refused() {
        let err = run(
            r#"{"x":NaN,"kv_transfer_params":{"remote_host":"127.0.0.1"}}"#,
            &[KV_TRANSFER_PARAMS],
        )
        .unwrap_err();
        assert!(matches!(err, StripError::InvalidJson(_)), "{err:?}");
        assert_eq!(
            run(r#"["kv_transfer_params"]"#, &[KV_TRANSFER_PARAMS]).unwrap_err(),
            StripError::NotAnObject
        );
    }
}
