//! `sglang`: SGLang's bootstrap protocol. Both legs carry the same
//! `bootstrap_host`/`bootstrap_port`/`bootstrap_room` and run concurrently; the
//! decode engine fetches the KV cache from the prefill engine's bootstrap server.

use serde_json::{Map, Value};

use super::{host_of, Connector, Legs, PdRequest};

pub struct Sglang {
    pub bootstrap_port: u16,
}

impl Sglang {
    fn with_bootstrap(&self, req: &PdRequest<'_>, room: u64) -> Map<String, Value> {
        let mut body = req.body.clone();
        body.insert(
            "bootstrap_host".into(),
            Value::from(host_of(req.prefill_target)),
        );
        body.insert("bootstrap_port".into(), Value::from(self.bootstrap_port));
        body.insert("bootstrap_room".into(), Value::from(room));
        body
    }
}

impl Connector for Sglang {
    fn reserved_fields(&self) -> &'static [&'static str] {
        &crate::sanitize::SGLANG_RESERVED
    }

    fn name(&self) -> &'static str {
        "sglang"
    }

    fn legs(&self, req: &PdRequest<'_>) -> Result<Legs, String> {
        // SGLang keys rooms by a signed 64-bit integer.
        let room = rand::random::<u64>() >> 1;
        Ok(Legs::Concurrent {
            prefill: self.with_bootstrap(req, room),
            decode: self.with_bootstrap(req, room),
            prefill_headers: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::test_support::obj;
    use crate::request::ApiKind;
    use serde_json::json;

    #[test]
    fn both_legs_share_the_room() {
        let body = obj(json!({"prompt": "x"}));
        let req = PdRequest::new(ApiKind::Completions, &body, "10.1.2.3:8000");
        let Legs::Concurrent {
            prefill, decode, ..
        } = (Sglang {
            bootstrap_port: 8998,
        })
        .legs(&req)
        .unwrap()
        else {
            panic!()
        };
        assert_eq!(prefill, decode);
        assert_eq!(prefill["bootstrap_host"], "10.1.2.3");
        assert_eq!(prefill["bootstrap_port"], 8998);
        assert!(prefill["bootstrap_room"].as_i64().is_some());
        let req6 = PdRequest::new(ApiKind::Completions, &body, "[fd00::1]:8000");
        let Legs::Concurrent { prefill, .. } = (Sglang { bootstrap_port: 1 }).legs(&req6).unwrap()
        else {
            panic!()
        };
        assert_eq!(prefill["bootstrap_host"], "fd00::1");
    }
}
