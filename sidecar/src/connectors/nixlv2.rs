//! `nixlv2`: vLLM's NixlConnector protocol with `kv_transfer_params` in the body.

use serde_json::{json, Map, Value};

use super::{prefill_only, Connector, Legs, P2pTier, PdRequest};

pub struct NixlV2 {
    /// `--enable-p2p-pull`: the engines run MultiConnector(NixlConnector +
    /// OffloadingConnector), so the prefill may pull a cached prefix first.
    pub p2p: Option<P2pTier>,
}

impl Connector for NixlV2 {
    fn name(&self) -> &'static str {
        "nixlv2"
    }

    fn legs(&self, req: &PdRequest<'_>) -> Result<Legs, String> {
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
        if let (Some(p2p), Some(Value::Object(params))) =
            (&self.p2p, prefill.get_mut("kv_transfer_params"))
        {
            p2p.pull_into(params, req.kv_source, req.prefill_target);
        }
        prefill_only(req.api, &mut prefill);
        Ok(Legs::Sequential { prefill })
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
        let req = PdRequest::new(ApiKind::Completions, &body, "p:1");
        let Legs::Sequential { prefill } = (NixlV2 { p2p: None }).legs(&req).unwrap() else {
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
    fn with_p2p_pull_the_prefill_pulls_from_the_kv_source() {
        let body = obj(json!({"model": "m", "prompt": "hi"}));
        let mut req = PdRequest::new(ApiKind::Completions, &body, "10.0.0.1:8000");
        req.kv_source = Some("10.0.0.2:8000");
        let conn = NixlV2 {
            p2p: Some(P2pTier {
                base_port: 7777,
                dp_size: 1,
                dp_base_port: 8000,
            }),
        };
        let Legs::Sequential { prefill } = conn.legs(&req).unwrap() else {
            panic!()
        };
        let params = &prefill["kv_transfer_params"];
        assert_eq!(params["do_remote_decode"], true);
        assert_eq!(params["remote_kv_source"]["remote_host"], "10.0.0.2");
        assert_eq!(params["remote_kv_source"]["remote_port"], 7777);
        // Without the flag the source is not passed on.
        let Legs::Sequential { prefill } = (NixlV2 { p2p: None }).legs(&req).unwrap() else {
            panic!()
        };
        assert!(prefill["kv_transfer_params"]
            .get("remote_kv_source")
            .is_none());
    }

    #[test]
    fn decode_leg_copies_params_and_restores_client_fields() {
        let body =
            obj(json!({"model": "m", "messages": [], "stream": true, "max_completion_tokens": 7}));
        let req = PdRequest::new(ApiKind::ChatCompletions, &body, "p:1");
        let params = json!({"do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [1, 2],
            "remote_engine_id": "e", "remote_request_id": "r", "remote_host": "h", "remote_port": 5, "tp_size": 1});
        let decode = (NixlV2 { p2p: None })
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
        let req = PdRequest::new(ApiKind::Completions, &body, "p:1");
        assert!((NixlV2 { p2p: None })
            .decode_body(&req, &json!({"kv_transfer_params": null}))
            .is_err());
    }

    #[test]
    fn responses_and_generate_limits() {
        let body = obj(json!({"input": "x", "max_output_tokens": 9}));
        let req = PdRequest::new(ApiKind::Responses, &body, "p:1");
        let Legs::Sequential { prefill } = (NixlV2 { p2p: None }).legs(&req).unwrap() else {
            panic!()
        };
        assert_eq!(prefill["max_output_tokens"], 1);
        assert!(prefill.get("max_tokens").is_none());

        let body = obj(
            json!({"token_ids": [1, 2], "sampling_params": {"max_tokens": 9, "temperature": 0}}),
        );
        let req = PdRequest::new(ApiKind::Generate, &body, "p:1");
        let Legs::Sequential { prefill } = (NixlV2 { p2p: None }).legs(&req).unwrap() else {
            panic!()
        };
        assert_eq!(
            prefill["sampling_params"],
            json!({"max_tokens": 1, "min_tokens": 1, "temperature": 0})
        );
    }
}
