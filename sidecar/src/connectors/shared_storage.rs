//! `shared-storage` (formerly `lmcache`): the prefill engine writes the KV cache
//! to storage both engines share; the decode engine gets the client's body as is.

use super::{prefill_only, Connector, Legs, PdRequest};

pub struct SharedStorage;

impl Connector for SharedStorage {
    fn name(&self) -> &'static str {
        "shared-storage"
    }

    fn legs(&self, req: &PdRequest<'_>) -> Result<Legs, String> {
        let mut prefill = req.body.clone();
        prefill_only(req.api, &mut prefill);
        Ok(Legs::Sequential { prefill })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::test_support::obj;
    use crate::request::ApiKind;
    use serde_json::{json, Value};

    #[test]
    fn prefill_limited_decode_untouched() {
        let body = obj(json!({"messages": [], "max_tokens": 30, "stream": true}));
        let req = PdRequest::new(ApiKind::ChatCompletions, &body, "p:1");
        let Legs::Sequential { prefill } = SharedStorage.legs(&req).unwrap() else {
            panic!()
        };
        assert_eq!(
            Value::Object(prefill),
            json!({"messages": [], "max_tokens": 1,
            "max_completion_tokens": 1, "min_tokens": 1, "stream": false})
        );
        assert_eq!(SharedStorage.decode_body(&req, &json!({})).unwrap(), body);
    }
}
