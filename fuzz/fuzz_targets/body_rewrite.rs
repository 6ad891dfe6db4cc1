//! A client's body through everything pd-sidecar does to it before the
//! legs: removing reserved fields, validating, and every connector's prefill
//! and decode bodies. No input may panic; a stripped body is still a JSON
//! object and holds no reserved field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use sidecar::config::ConnectorKind;
use sidecar::connectors::{self, Legs, PdRequest};
use sidecar::request::ApiKind;
use sidecar::sanitize;

fuzz_target!(|data: &[u8]| {
    let reserved = sanitize::SGLANG_RESERVED;
    if let Ok(clean) = sanitize::strip(data.to_vec().into(), &reserved) {
        if clean.as_ref() != data {
            let v: Value = serde_json::from_slice(&clean).expect("a stripped body is JSON");
            let obj = v.as_object().expect("an object");
            assert!(reserved.iter().all(|k| !obj.contains_key(*k)));
        }
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    for api in [
        ApiKind::Completions,
        ApiKind::ChatCompletions,
        ApiKind::Responses,
        ApiKind::Generate,
    ] {
        let _ = sidecar::validate::check(api, &body);
        for kind in [
            ConnectorKind::Nixlv2,
            ConnectorKind::Nixl,
            ConnectorKind::SharedStorage,
            ConnectorKind::Sglang,
        ] {
            let connector = connectors::for_kind(kind, 8998);
            let req = PdRequest {
                api,
                body: &body,
                prefill_target: "127.0.0.1:8000",
            };
            match connector.legs(&req) {
                Legs::Sequential { prefill } => {
                    let resp = json!({"kv_transfer_params": prefill.get("kv_transfer_params"),
                                      "remote_block_ids": [1, 2]});
                    let _ = connector.decode_body(&req, &resp);
                    let _ = connector.decode_body(&req, &Value::Object(body.clone()));
                }
                Legs::Concurrent { .. } => {}
            }
        }
    }
    let mut doc = Value::Object(body);
    let _ = sidecar::body::rewrite_usage(&mut doc, 7);
});
