//! `mooncake`: vLLM MooncakeConnector. The decode engine pulls the prefill's
//! KV from the prefill engine named by its engine id, which the prefill pod's
//! bootstrap server lists per data-parallel rank (`GET /query`, asked for by
//! the caller before the legs are built: [`Connector::bootstrap_port`]). Both
//! legs carry one `transfer_id` and run at once; the prefill is sent to the
//! rank whose engine id the decode leg names.

use serde_json::{json, Map, Value};

use super::{prefill_only, Connector, Legs, PdRequest};

/// Header that pins a request to one vLLM data-parallel rank.
pub const DATA_PARALLEL_RANK_HEADER: &str = "x-data-parallel-rank";

/// One rank of a prefill pod, from its bootstrap server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteEngine {
    /// `http://<prefill host>:<bootstrap port>`, sent to the decode engine.
    pub bootstrap_addr: String,
    pub dp_rank: String,
    pub engine_id: String,
}

pub struct Mooncake {
    pub bootstrap_port: u16,
}

impl Connector for Mooncake {
    fn name(&self) -> &'static str {
        "mooncake"
    }

    fn bootstrap_port(&self) -> Option<u16> {
        Some(self.bootstrap_port)
    }

    fn legs(&self, req: &PdRequest<'_>) -> Result<Legs, String> {
        let engine = req
            .remote_engine
            .ok_or("the prefill's Mooncake engine id is unknown")?;
        let transfer_id = format!("xfer-{}", uuid::Uuid::new_v4());
        let mut prefill = req.body.clone();
        prefill.insert(
            "kv_transfer_params".into(),
            json!({
                "do_remote_prefill": false,
                "do_remote_decode": true,
                "transfer_id": transfer_id,
            }),
        );
        prefill_only(req.api, &mut prefill);
        let mut decode = req.body.clone();
        decode.insert(
            "kv_transfer_params".into(),
            json!({
                "do_remote_prefill": true,
                "do_remote_decode": false,
                "transfer_id": transfer_id,
                "remote_bootstrap_addr": engine.bootstrap_addr,
                "remote_engine_id": engine.engine_id,
            }),
        );
        Ok(Legs::Concurrent {
            prefill,
            decode,
            prefill_headers: vec![(DATA_PARALLEL_RANK_HEADER, engine.dp_rank.clone())],
        })
    }
}

/// The ranks a bootstrap server's `/query` answer lists, as (dp rank,
/// engine id): `{"0": {"engine_id": "...", ...}, "1": {...}}`. Ranks
/// without a string `engine_id` are skipped; none at all is an error.
pub fn parse_query(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let doc: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| format!("bootstrap /query is not a JSON object: {e}"))?;
    let mut ranks: Vec<(String, String)> = doc
        .iter()
        .filter_map(|(rank, entry)| {
            let id = entry.get("engine_id")?.as_str()?;
            Some((rank.clone(), id.to_string()))
        })
        .collect();
    if ranks.is_empty() {
        return Err("bootstrap /query lists no engine_id".into());
    }
    ranks.sort();
    Ok(ranks)
}

/// `http://host:port` of a prefill pod's bootstrap server (IPv6 bracketed).
pub fn bootstrap_addr(prefill_target: &str, port: u16) -> String {
    let host = super::host_of(prefill_target);
    if host.contains(':') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::test_support::obj;
    use crate::request::ApiKind;

    #[test]
    fn legs_carry_one_transfer_id_and_the_engine() {
        let body = obj(json!({"model": "m", "prompt": "hi", "stream": true,
            "stream_options": {"include_usage": true}, "max_tokens": 20}));
        let engine = RemoteEngine {
            bootstrap_addr: bootstrap_addr("10.0.0.3:8000", 8998),
            dp_rank: "1".into(),
            engine_id: "eng-1".into(),
        };
        let mut req = PdRequest::new(ApiKind::Completions, &body, "10.0.0.3:8000");
        req.remote_engine = Some(&engine);
        let Legs::Concurrent {
            prefill,
            decode,
            prefill_headers,
        } = (Mooncake {
            bootstrap_port: 8998,
        })
        .legs(&req)
        .unwrap()
        else {
            panic!("concurrent")
        };
        let id = prefill["kv_transfer_params"]["transfer_id"]
            .as_str()
            .unwrap();
        assert!(id.starts_with("xfer-") && id.len() == 41, "{id}");
        assert_eq!(
            prefill["kv_transfer_params"],
            json!({"do_remote_prefill": false, "do_remote_decode": true, "transfer_id": id})
        );
        assert_eq!(prefill["stream"], false);
        assert_eq!(prefill["max_tokens"], 1);
        assert!(prefill.get("stream_options").is_none());
        assert_eq!(
            decode["kv_transfer_params"],
            json!({"do_remote_prefill": true, "do_remote_decode": false, "transfer_id": id,
                "remote_bootstrap_addr": "http://10.0.0.3:8998", "remote_engine_id": "eng-1"})
        );
        assert_eq!(decode["stream"], true);
        assert_eq!(decode["max_tokens"], 20);
        assert_eq!(
            prefill_headers,
            vec![(DATA_PARALLEL_RANK_HEADER, "1".to_string())]
        );
    }

    #[test]
    fn without_the_engine_the_legs_are_refused() {
        let body = obj(json!({"prompt": "hi"}));
        let req = PdRequest::new(ApiKind::Completions, &body, "p:1");
        assert!((Mooncake { bootstrap_port: 1 }).legs(&req).is_err());
    }

    #[test]
    fn query_answers_parse() {
        let ranks = parse_query(
            br#"{"1": {"engine_id": "b", "host": "x"}, "0": {"engine_id": "a"}, "2": {"port": 3}}"#,
        )
        .unwrap();
        assert_eq!(
            ranks,
            vec![("0".into(), "a".into()), ("1".into(), "b".into())]
        );
        assert!(parse_query(b"{}").is_err());
        assert!(parse_query(b"[1]").is_err());
        assert!(parse_query(br#"{"0": "e"}"#).is_err());
        assert_eq!(
            bootstrap_addr("[fd00::3]:8000", 8998),
            "http://[fd00::3]:8998"
        );
    }
}
