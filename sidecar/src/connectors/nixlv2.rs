//! `nixlv2`: vLLM's NixlConnector protocol with `kv_transfer_params` in the body.

use serde_json::{json, Map, Value};

use super::{prefill_only, Connector, Legs, PdRequest};

pub struct NixlV2;

impl Connector for NixlV2 {
    fn name(&self) -> &'static str {
        "nixlv2"
    }

    fn legs(&self, req: &PdRequest<'_>) -> Legs {
        let mut prefill = req.body.clone();
        prefill.insert(
            "kv_transfer_params".into(),
            json!({
                "do_remote_decode": true,
                "do_remote_prefill": false,
                "remote_engine_id": null,
                "remote_block_ids": null,
                "remote_host": null,
                "remote_port": null
            }),
        );
        prefill_only(req.api, &mut prefill);
        Legs::Sequential { prefill }
    }

    fn decode_body(
        &self,
        req: &PdRequest<'_>,
        prefill: &Value,
    ) -> Result<Map<String, Value>, String> {
        let params = match prefill.get("kv_transfer_params") {
            Some(p @ Value::Object(_)) => p.clone(),
            _ => return Err("prefill response has no kv_transfer_params object".into()),
        };
        // The client's own stream, stream_options and token limits come back
        // with the clone; fields it never sent stay absent.
        let mut decode = req.body.clone();
        decode.insert("kv_transfer_params".into(), params);
        Ok(decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::test_support::obj;
    use crate::request::ApiKind;

    #[test]
    fn prefill_leg_is_one_token_no_stream_with_null_params() {
        let body = obj(json!({"model": "m", "prompt": "hi", "stream": true,
            "stream_options": {"include_usage": true}, "max_tokens": 50, "temperature": 0.5}));
        let req = PdRequest {
            api: ApiKind::Completions,
            body: &body,
            prefill_target: "p:1",
        };
        let Legs::Sequential { prefill } = NixlV2.legs(&req) else {
            panic!("sequential")
        };
        assert_eq!(
            Value::Object(prefill),
            json!({"model": "m", "prompt": "hi", "stream": false,
            "max_tokens": 1, "max_completion_tokens": 1, "min_tokens": 1, "temperature": 0.5,
            "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false,
                "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null}})
        );
    }

    #[test]
    fn decode_leg_copies_params_and_restores_client_fields() {
        let body =
            obj(json!({"model": "m", "messages": [], "stream": true, "max_completion_tokens": 7}));
        let req = PdRequest {
            api: ApiKind::ChatCompletions,
            body: &body,
            prefill_target: "p:1",
        };
        let params = json!({"do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [1, 2],
            "remote_engine_id": "e", "remote_request_id": "r", "remote_host": "h", "remote_port": 5, "tp_size": 1});
        let decode = NixlV2
            .decode_body(&req, &json!({"kv_transfer_params": params.clone()}))
            .unwrap();
        assert_eq!(
            Value::Object(decode),
            json!({"model": "m", "messages": [], "stream": true,
            "max_completion_tokens": 7, "kv_transfer_params": params})
        );
    }

    #[test]
    fn missing_params_is_an_error() {
        let body = obj(json!({"prompt": "x"}));
        let req = PdRequest {
            api: ApiKind::Completions,
            body: &body,
            prefill_target: "p:1",
        };
        assert!(NixlV2
            .decode_body(&req, &json!({"kv_transfer_params": null}))
            .is_err());
    }

    #[test]
    fn responses_and_generate_limits() {
        let body = obj(json!({"input": "x", "max_output_tokens": 9}));
        let req = PdRequest {
            api: ApiKind::Responses,
            body: &body,
            prefill_target: "p:1",
        };
        let Legs::Sequential { prefill } = NixlV2.legs(&req) else {
            panic!()
        };
        assert_eq!(prefill["max_output_tokens"], 1);
        assert!(prefill.get("max_tokens").is_none());

        let body = obj(
            json!({"token_ids": [1, 2], "sampling_params": {"max_tokens": 9, "temperature": 0}}),
        );
        let req = PdRequest {
            api: ApiKind::Generate,
            body: &body,
            prefill_target: "p:1",
        };
        let Legs::Sequential { prefill } = NixlV2.legs(&req) else {
            panic!()
        };
        assert_eq!(
            prefill["sampling_params"],
            json!({"max_tokens": 1, "min_tokens": 1, "temperature": 0})
        );
    }
}
