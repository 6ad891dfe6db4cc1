//! vLLM OffloadingConnector's P2P tier, as llm-d's sidecar addresses it: an
//! engine pulls KV named by a `kv_request_id` from a peer's P2P port. The
//! fields nest under the party they describe: `remote_decoder` on the
//! prefill leg, `remote_prefiller` on the decode leg, `remote_kv_source` for
//! a pull of a cached prefix from a third engine.

use serde_json::{json, Map, Value};

use super::host_of;
use crate::config::{split_host_port, Config};

pub const REMOTE_KV_SOURCE: &str = "remote_kv_source";

/// Where engines listen for P2P pulls.
#[derive(Clone, Copy, Debug)]
pub struct P2pTier {
    /// `--p2p-connector-port`: data-parallel rank 0's port.
    pub base_port: u16,
    /// `--data-parallel-size`.
    pub dp_size: u16,
    /// `--port`: a target's port minus this is its rank (each rank of a pod
    /// is served on port + rank).
    pub dp_base_port: u16,
}

impl P2pTier {
    /// The tier as the sidecar's flags describe it.
    pub fn of(cfg: &Config) -> P2pTier {
        P2pTier {
            base_port: cfg.p2p_connector_port,
            dp_size: cfg.data_parallel_size,
            dp_base_port: cfg.port,
        }
    }

    /// The P2P port of the engine behind `target` (`host:port`): rank r
    /// listens on base + r; a port outside the rank range is rank 0's.
    pub fn port_for(&self, target: &str) -> u16 {
        if self.dp_size <= 1 {
            return self.base_port;
        }
        match split_host_port(target) {
            Some((_, port))
                if port >= self.dp_base_port && port - self.dp_base_port < self.dp_size =>
            {
                self.base_port + (port - self.dp_base_port)
            }
            _ => self.base_port,
        }
    }

    /// `remote_kv_source`'s value for a pull from `source`; its request id is
    /// its own (only the pulling side uses it).
    pub fn source_params(&self, source: &str) -> Value {
        json!({
            "kv_request_id": uuid::Uuid::new_v4().to_string(),
            "remote_host": host_of(source),
            "remote_port": self.port_for(source),
        })
    }

    /// Adds the pull of a cached prefix to a prefill leg's transfer
    /// parameters, unless there is no source or it is the prefill engine itself.
    pub fn pull_into(&self, params: &mut Map<String, Value>, source: Option<&str>, prefill: &str) {
        if let Some(source) = source.filter(|s| !same_endpoint(s, prefill)) {
            params.insert(REMOTE_KV_SOURCE.into(), self.source_params(source));
        }
    }
}

/// Whether two `host:port` strings (an `http://` prefix, IPv6 brackets
/// optional) name one endpoint.
pub fn same_endpoint(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> (String, Option<u16>) {
        let s = s.split_once("://").map_or(s, |(_, rest)| rest);
        let s = s.trim_end_matches('/');
        match split_host_port(s) {
            Some((h, p)) => (h.trim_matches(['[', ']']).to_ascii_lowercase(), Some(p)),
            None => (s.trim_matches(['[', ']']).to_ascii_lowercase(), None),
        }
    }
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(dp_size: u16) -> P2pTier {
        P2pTier {
            base_port: 7777,
            dp_size,
            dp_base_port: 8000,
        }
    }

    #[test]
    fn ports_follow_the_targets_rank() {
        assert_eq!(tier(1).port_for("10.0.0.1:8003"), 7777);
        assert_eq!(tier(4).port_for("10.0.0.1:8000"), 7777);
        assert_eq!(tier(4).port_for("10.0.0.1:8003"), 7780);
        assert_eq!(
            tier(4).port_for("10.0.0.1:8004"),
            7777,
            "past the last rank"
        );
        assert_eq!(tier(4).port_for("10.0.0.1:7999"), 7777, "below rank 0");
        assert_eq!(tier(4).port_for("nonsense"), 7777);
        assert_eq!(tier(2).port_for("[fd00::2]:8001"), 7778);
    }

    #[test]
    fn a_pull_from_oneself_is_left_out() {
        let mut params = Map::new();
        tier(1).pull_into(&mut params, Some("http://10.0.0.1:8000"), "10.0.0.1:8000");
        assert!(params.is_empty());
        tier(1).pull_into(&mut params, None, "10.0.0.1:8000");
        assert!(params.is_empty());
        tier(1).pull_into(&mut params, Some("10.0.0.2:8000"), "10.0.0.1:8000");
        let src = &params[REMOTE_KV_SOURCE];
        assert_eq!(src["remote_host"], "10.0.0.2");
        assert_eq!(src["remote_port"], 7777);
        assert_eq!(src["kv_request_id"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn endpoints_compare_after_normalising() {
        assert!(same_endpoint("[FD00::1]:80", "[fd00::1]:80"));
        assert!(same_endpoint("http://a:1/", "a:1"));
        assert!(!same_endpoint("a:1", "a:2"));
    }
}
