//! The P/D side of a request (DESIGN.md "Life of a request", steps 4-6): which role a request
//! plays, the `kv_transfer_params` a prefill returns, the decode's checks on what it was handed,
//! and the release notification a decode sends back to the prefill engine (through the KV agent). Supports vLLM's
//! NixlConnector form (`kv_transfer_params` object, "nixlv2") and the legacy v1 form ("nixl": the
//! same fields at the top level of the body). sglang bootstrap fields are only noted;
//! Mooncake and OffloadingConnector legs are computed locally (no transfer engine for them here).

use serde_json::{json, Map, Value};

use super::blocks::BlockId;
use super::error::SimError;

/// The `kv_transfer_params` shape a prefill answers with (`--kv-params`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvParamsShape {
    /// vLLM 0.26: `remote_block_ids` as one list per KV-cache group (one here), with
    /// `remote_num_tokens` and `remote_blocks_expiry_time`.
    Grouped,
    /// Older vLLM: one flat list of block ids.
    Flat,
}

/// What the decode engine was handed by the prefill engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeParams {
    pub block_ids: Vec<u64>,
    pub remote_engine_id: Option<String>,
    pub remote_request_id: String,
    pub remote_host: String,
    pub remote_port: u16,
    pub tp_size: u64,
}

/// The role of a generation request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// An ordinary request (local prefill and decode).
    Local,
    /// Prefill for a remote decode: compute, hold the blocks, return the handle.
    /// `legacy`: the v1 form, which also gets the handle at the top level of the response.
    Prefill { legacy: bool },
    /// Decode of a prompt prefilled elsewhere.
    Decode(DecodeParams),
}

impl Role {
    pub fn is_prefill(&self) -> bool {
        matches!(self, Role::Prefill { .. })
    }
}

fn bad(msg: impl Into<String>) -> SimError {
    SimError::BadRequest(msg.into())
}

fn flag(obj: &Map<String, Value>, field: &str) -> bool {
    obj.get(field).and_then(Value::as_bool) == Some(true)
}

/// Reads the request's role from its body. `header_request_id` (the `x-request-id` header) stands
/// in for a v1 decode's missing `remote_request_id`.
pub fn detect_role(
    body: &Map<String, Value>,
    header_request_id: Option<&str>,
) -> Result<Role, SimError> {
    let (src, legacy, prefix) = match body.get("kv_transfer_params") {
        Some(Value::Object(kv)) => (kv, false, "kv_transfer_params."),
        None | Some(Value::Null) => (body, true, ""),
        Some(_) => return Err(bad("`kv_transfer_params` must be an object")),
    };
    // Mooncake's legs name a transfer, not blocks: engine-sim has no Mooncake
    // transfer engine, so both are computed here like an ordinary request.
    if !legacy && src.contains_key("transfer_id") {
        return Ok(Role::Local);
    }
    let remote_decode = flag(src, "do_remote_decode");
    let remote_prefill = flag(src, "do_remote_prefill");
    match (remote_decode, remote_prefill) {
        (true, true) => Err(bad(format!(
            "`{prefix}do_remote_decode` and `{prefix}do_remote_prefill` cannot both be true"
        ))),
        (true, false) => Ok(Role::Prefill { legacy }),
        (false, true) => decode_params(src, prefix, legacy.then_some(header_request_id).flatten())
            .map(Role::Decode),
        (false, false) => Ok(Role::Local),
    }
}

fn decode_params(
    src: &Map<String, Value>,
    prefix: &str,
    fallback_request_id: Option<&str>,
) -> Result<DecodeParams, SimError> {
    let ints = |ids: &[Value]| {
        ids.iter()
            .map(Value::as_u64)
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| {
                bad(format!(
                    "`{prefix}remote_block_ids` must hold non-negative integers"
                ))
            })
    };
    let block_ids = match src.get("remote_block_ids") {
        // vLLM 0.26: one list per KV-cache group; the simulator has one group.
        Some(Value::Array(groups)) if groups.first().is_some_and(Value::is_array) => {
            match groups.as_slice() {
                [Value::Array(ids)] => ints(ids)?,
                _ => {
                    return Err(bad(format!(
                        "`{prefix}remote_block_ids` has {} KV-cache groups; engine-sim has one",
                        groups.len()
                    )))
                }
            }
        }
        Some(Value::Array(ids)) => ints(ids)?,
        _ => {
            return Err(bad(format!(
                "do_remote_prefill is set but `{prefix}remote_block_ids` is missing or not a list"
            )))
        }
    };
    let remote_host = match src.get("remote_host") {
        Some(Value::String(h)) if !h.is_empty() => h.clone(),
        _ => {
            return Err(bad(format!(
                "do_remote_prefill is set but `{prefix}remote_host` is missing"
            )))
        }
    };
    let remote_port = match src.get("remote_port") {
        Some(Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Some(Value::String(s)) => s.parse::<u16>().ok(),
        _ => None,
    }
    .filter(|p| *p != 0)
    .ok_or_else(|| {
        bad(format!(
            "do_remote_prefill is set but `{prefix}remote_port` is missing or not a port number"
        ))
    })?;
    let remote_request_id = match src.get("remote_request_id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => fallback_request_id.map(str::to_string).ok_or_else(|| {
            bad(format!(
                "do_remote_prefill is set but `{prefix}remote_request_id` is missing"
            ))
        })?,
    };
    let tp_size = match src.get("tp_size") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or_else(|| bad(format!("`{prefix}tp_size` must be a positive integer")))?,
    };
    Ok(DecodeParams {
        block_ids,
        remote_engine_id: src
            .get("remote_engine_id")
            .and_then(Value::as_str)
            .map(str::to_string),
        remote_request_id,
        remote_host,
        remote_port,
        tp_size,
    })
}

impl DecodeParams {
    /// The handle must cover exactly the prompt's blocks.
    pub fn check_blocks(&self, prompt_tokens: u64, block_size: u64) -> Result<(), SimError> {
        let expected = super::tokens::blocks_for(prompt_tokens, block_size);
        if self.block_ids.len() as u64 == expected {
            Ok(())
        } else {
            Err(bad(format!(
                "remote_block_ids has {} blocks but the prompt has {prompt_tokens} tokens, which need {expected} blocks of {block_size} tokens",
                self.block_ids.len()
            )))
        }
    }

    /// The notification the prefill engine frees the blocks on: `"<remote_request_id>:<tp_size>"`.
    pub fn notif(&self) -> String {
        format!("{}:{}", self.remote_request_id, self.tp_size)
    }
}

/// Where a prefill engine can be reached, and under which id it holds a request's blocks.
pub struct PrefillHandle<'a> {
    pub block_ids: &'a [BlockId],
    pub engine_id: &'a str,
    pub request_id: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub shape: KvParamsShape,
    /// Prompt tokens the blocks hold (vLLM 0.26's `remote_num_tokens`).
    pub num_tokens: u64,
    /// When the blocks are freed without a notification, Unix seconds.
    pub expiry_unix_s: f64,
}

impl PrefillHandle<'_> {
    /// The `kv_transfer_params` a prefill answers with.
    pub fn kv_transfer_params(&self) -> Value {
        let mut v = json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_block_ids": self.block_ids,
            "remote_engine_id": self.engine_id,
            "remote_request_id": self.request_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": 1,
        });
        if self.shape == KvParamsShape::Grouped {
            v["remote_block_ids"] = json!([self.block_ids]);
            v["remote_num_tokens"] = json!(self.num_tokens);
            v["remote_blocks_expiry_time"] = json!(self.expiry_unix_s);
        }
        v
    }

    /// The v1 form's top-level fields.
    pub fn top_level(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("remote_block_ids".into(), json!(self.block_ids));
        m.insert("remote_engine_id".into(), json!(self.engine_id));
        m.insert("remote_request_id".into(), json!(self.request_id));
        m.insert("remote_host".into(), json!(self.host));
        m.insert("remote_port".into(), json!(self.port));
        m
    }
}

/// The sglang bootstrap fields of a request, if any, for the log.
pub fn sglang_bootstrap(body: &Map<String, Value>) -> Option<String> {
    let fields = ["bootstrap_host", "bootstrap_port", "bootstrap_room"];
    if fields.iter().any(|f| body.contains_key(*f)) {
        Some(
            fields
                .iter()
                .map(|f| format!("{f}={}", body.get(*f).unwrap_or(&Value::Null)))
                .collect::<Vec<_>>()
                .join(" "),
        )
    } else {
        None
    }
}

/// Formats `host:port` for a URL (brackets an IPv6 literal).
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn detects_roles_in_both_forms() {
        assert_eq!(
            detect_role(&obj(json!({"prompt": "x"})), None).unwrap(),
            Role::Local
        );
        let v2 = obj(
            json!({"kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false, "remote_block_ids": null}}),
        );
        assert_eq!(
            detect_role(&v2, None).unwrap(),
            Role::Prefill { legacy: false }
        );
        let v1 = obj(json!({"do_remote_decode": true}));
        assert_eq!(
            detect_role(&v1, None).unwrap(),
            Role::Prefill { legacy: true }
        );
        let both = obj(
            json!({"kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": true}}),
        );
        assert!(detect_role(&both, None).is_err());
        assert!(detect_role(&obj(json!({"kv_transfer_params": 3})), None).is_err());
    }

    #[test]
    fn vllm_0_26_grouped_params_round_trip_and_flat_ones_still_read() {
        let ids: [BlockId; 2] = [7, 8];
        let mut handle = PrefillHandle {
            block_ids: &ids,
            engine_id: "e",
            request_id: "r",
            host: "127.0.0.1",
            port: 9000,
            shape: KvParamsShape::Grouped,
            num_tokens: 20,
            expiry_unix_s: 1_800_000_000.5,
        };
        let grouped = handle.kv_transfer_params();
        assert_eq!(grouped["remote_block_ids"], json!([[7, 8]]));
        assert_eq!(grouped["remote_num_tokens"], 20);
        assert_eq!(grouped["remote_blocks_expiry_time"], 1_800_000_000.5);
        handle.shape = KvParamsShape::Flat;
        let flat = handle.kv_transfer_params();
        assert_eq!(flat["remote_block_ids"], json!([7, 8]));
        assert!(flat.get("remote_num_tokens").is_none());
        for params in [grouped, flat] {
            let mut p = params.clone();
            p["do_remote_prefill"] = json!(true);
            let Role::Decode(d) =
                detect_role(&obj(json!({"kv_transfer_params": p})), None).unwrap()
            else {
                panic!("not decode")
            };
            assert_eq!(d.block_ids, vec![7, 8]);
        }
        let two_groups = obj(json!({"kv_transfer_params": {"do_remote_prefill": true,
            "remote_block_ids": [[1], [2]], "remote_host": "h", "remote_port": 1, "remote_request_id": "r"}}));
        assert!(detect_role(&two_groups, None).is_err());
    }

    #[test]
    fn decode_params_are_checked() {
        let ok = obj(json!({"kv_transfer_params": {
            "do_remote_prefill": true, "remote_block_ids": [4, 5], "remote_engine_id": "e",
            "remote_request_id": "r", "remote_host": "127.0.0.1", "remote_port": 9000, "tp_size": 1
        }}));
        let Role::Decode(p) = detect_role(&ok, None).unwrap() else {
            panic!("not decode")
        };
        assert_eq!(p.notif(), "r:1");
        assert!(p.check_blocks(17, 16).is_ok());
        assert!(p.check_blocks(33, 16).is_err());
        let no_host = obj(
            json!({"kv_transfer_params": {"do_remote_prefill": true, "remote_block_ids": [1], "remote_port": 1, "remote_request_id": "r"}}),
        );
        assert!(detect_role(&no_host, None).is_err());
        // v1: request id from the header when the body has none.
        let v1 = obj(
            json!({"do_remote_prefill": true, "remote_block_ids": [1], "remote_host": "h", "remote_port": "80"}),
        );
        let Role::Decode(p) = detect_role(&v1, Some("hdr")).unwrap() else {
            panic!("not decode")
        };
        assert_eq!((p.remote_request_id.as_str(), p.remote_port), ("hdr", 80));
        assert!(detect_role(&v1, None).is_err());
    }

    #[test]
    fn formats_ipv6_hosts() {
        assert_eq!(host_port("::1", 80), "[::1]:80");
        assert_eq!(host_port("10.0.0.1", 80), "10.0.0.1:80");
    }
}
