//! `shared-storage` (formerly `lmcache`): the prefill engine writes the KV cache
//! to storage both engines share; the decode engine gets the client's body as is.
//! With vLLM's `cache_hit_threshold` in the body, as llm-d: the decode engine is
//! asked first; only if it answers `cache_threshold` (too little of the prompt
//! cached) does the prefill run, and then both legs carry the threshold at 0.

use serde_json::{Map, Value};

use super::{no_cache_threshold, prefill_only, Connector, Legs, PdRequest, CACHE_HIT_THRESHOLD};

pub struct SharedStorage;

impl Connector for SharedStorage {
    fn name(&self) -> &'static str {
        "shared-storage"
    }

    fn legs(&self, req: &PdRequest<'_>) -> Result<Legs, String> {
        let mut prefill = req.body.clone();
        prefill_only(req.api, &mut prefill);
        no_cache_threshold(&mut prefill);
        Ok(Legs::Sequential { prefill })
    }

    fn decode_first(&self, req: &PdRequest<'_>) -> bool {
        req.body
            .get(CACHE_HIT_THRESHOLD)
            .is_some_and(|v| !v.is_null())
    }

    fn decode_body(
        &self,
        req: &PdRequest<'_>,
        _prefill_response: &Value,
    ) -> Result<Map<String, Value>, String> {
        let mut body = req.body.clone();
        no_cache_threshold(&mut body);
        Ok(body)
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
        assert!(!SharedStorage.decode_first(&req));
    }

    #[test]
    fn a_cache_hit_threshold_asks_the_decode_engine_first_then_zero_on_both_legs() {
        let body = obj(json!({"prompt": "x", "max_tokens": 30, "cache_hit_threshold": 0.8}));
        let req = PdRequest::new(ApiKind::Completions, &body, "p:1");
        assert!(SharedStorage.decode_first(&req));
        let Legs::Sequential { prefill } = SharedStorage.legs(&req).unwrap() else {
            panic!()
        };
        assert_eq!(prefill["cache_hit_threshold"], 0);
        let decode = SharedStorage.decode_body(&req, &json!({})).unwrap();
        assert_eq!(decode["cache_hit_threshold"], 0);
        assert_eq!(decode["max_tokens"], 30);
        let unset = obj(json!({"prompt": "x", "cache_hit_threshold": null}));
        assert!(!SharedStorage.decode_first(&PdRequest::new(ApiKind::Completions, &unset, "p:1")));
    }
}
