//! `offloading`: vLLM OffloadingConnector's P2P tier as the P/D connector.
//! The prefill stores its KV under a fresh `kv_request_id`; the decode engine
//! pulls it from the prefill engine's P2P port. Both legs run at once: the
//! connector keeps blocks stored before the decode side asks for them.

use serde_json::{json, Map, Value};

use super::{host_of, prefill_only, Connector, Legs, P2pTier, PdRequest};

pub struct Offloading {
    pub p2p: P2pTier,
}

impl Connector for Offloading {
    fn name(&self) -> &'static str {
        "offloading"
    }

    fn legs(&self, req: &PdRequest<'_>) -> Result<Legs, String> {
        let kv_request_id = uuid::Uuid::new_v4().to_string();
        let mut prefill = req.body.clone();
        let mut params = Map::new();
        params.insert(
            "remote_decoder".into(),
            json!({ "kv_request_id": kv_request_id }),
        );
        self.p2p
            .pull_into(&mut params, req.kv_source, req.prefill_target);
        prefill.insert("kv_transfer_params".into(), Value::Object(params));
        prefill_only(req.api, &mut prefill);

        // The client's body as sent: its stream and token limits stay.
        let mut decode = req.body.clone();
        decode.insert(
            "kv_transfer_params".into(),
            json!({ "remote_prefiller": {
                "kv_request_id": kv_request_id,
                "remote_host": host_of(req.prefill_target),
                "remote_port": self.p2p.port_for(req.prefill_target),
            }}),
        );
        Ok(Legs::Concurrent {
            prefill,
            decode,
            prefill_headers: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::test_support::obj;
    use crate::request::ApiKind;

    #[test]
    fn legs_share_the_request_id_and_name_the_prefill_p2p_port() {
        let body = obj(json!({"model": "m", "messages": [], "stream": true, "max_tokens": 9}));
        let mut req = PdRequest::new(ApiKind::ChatCompletions, &body, "10.0.0.5:8001");
        req.kv_source = Some("10.0.0.7:8000");
        let conn = Offloading {
            p2p: P2pTier {
                base_port: 7777,
                dp_size: 2,
                dp_base_port: 8000,
            },
        };
        let Legs::Concurrent {
            prefill, decode, ..
        } = conn.legs(&req).unwrap()
        else {
            panic!("concurrent")
        };
        let id = prefill["kv_transfer_params"]["remote_decoder"]["kv_request_id"].clone();
        assert_eq!(id.as_str().unwrap().len(), 36);
        assert_eq!(prefill["stream"], false);
        assert_eq!(prefill["max_tokens"], 1);
        assert!(prefill.get("stream_options").is_none());
        let src = &prefill["kv_transfer_params"]["remote_kv_source"];
        assert_eq!(src["remote_host"], "10.0.0.7");
        assert_eq!(src["remote_port"], 7777);
        assert_ne!(src["kv_request_id"], id, "the source pull has its own id");
        assert_eq!(
            decode["kv_transfer_params"],
            json!({"remote_prefiller": {"kv_request_id": id, "remote_host": "10.0.0.5", "remote_port": 7778}})
        );
        assert_eq!(decode["stream"], true);
        assert_eq!(decode["max_tokens"], 9);
    }
}
