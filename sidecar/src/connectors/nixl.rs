//! `nixl`: the legacy NIXL v1 protocol, the transfer fields at the top level of the body.

use serde_json::{Map, Value};

use super::{prefill_only, Connector, Legs, PdRequest};

pub struct NixlV1;

/// Fields a v1 prefill response carries at its top level for the decode leg.
const TRANSFER_FIELDS: [&str; 6] = [
    "remote_block_ids",
    "remote_engine_id",
    "remote_request_id",
    "remote_host",
    "remote_port",
    "tp_size",
];

impl Connector for NixlV1 {
    fn name(&self) -> &'static str {
        "nixl"
    }

    fn reserved_fields(&self) -> &'static [&'static str] {
        &crate::sanitize::NIXL_V1_RESERVED
    }

    fn legs(&self, req: &PdRequest<'_>) -> Result<Legs, String> {
        let mut prefill = req.body.clone();
        prefill.insert("do_remote_decode".into(), Value::Bool(true));
        prefill.insert("do_remote_prefill".into(), Value::Bool(false));
        for field in [
            "remote_engine_id",
            "remote_block_ids",
            "remote_host",
            "remote_port",
        ] {
            prefill.insert(field.into(), Value::Null);
        }
        prefill_only(req.api, &mut prefill);
        Ok(Legs::Sequential { prefill })
    }

    fn decode_body(
        &self,
        req: &PdRequest<'_>,
        prefill: &Value,
    ) -> Result<Map<String, Value>, String> {
        if !prefill.get("remote_block_ids").is_some_and(Value::is_array) {
            return Err("prefill response has no top-level remote_block_ids".into());
        }
        let mut decode = req.body.clone();
        decode.insert("do_remote_prefill".into(), Value::Bool(true));
        for field in TRANSFER_FIELDS {
            if let Some(v) = prefill.get(field) {
                decode.insert(field.into(), v.clone());
            }
        }
        Ok(decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::test_support::obj;
    use crate::request::ApiKind;
    use serde_json::json;

    #[test]
    fn fields_at_top_level_both_ways() {
        let body = obj(json!({"prompt": "x", "stream": true}));
        let req = PdRequest::new(ApiKind::Completions, &body, "p:1");
        let Legs::Sequential { prefill } = NixlV1.legs(&req).unwrap() else {
            panic!()
        };
        assert_eq!(prefill["do_remote_decode"], true);
        assert_eq!(prefill["stream"], false);
        assert!(prefill.get("kv_transfer_params").is_none());
        let resp = json!({"remote_block_ids": [3], "remote_engine_id": "e", "remote_host": "h", "remote_port": 9});
        let decode = NixlV1.decode_body(&req, &resp).unwrap();
        assert_eq!(
            Value::Object(decode),
            json!({"prompt": "x", "stream": true, "do_remote_prefill": true,
            "remote_block_ids": [3], "remote_engine_id": "e", "remote_host": "h", "remote_port": 9})
        );
        assert!(NixlV1.decode_body(&req, &json!({})).is_err());
    }
}
