//! Mooncake: which engine a prefill pod runs, per data-parallel rank, asked
//! of its bootstrap server (`GET http://<host>:<port>/query`) once per
//! prefill endpoint and kept until a prefill leg to it fails (a restarted
//! engine has a new id).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderMap, Method, Uri};
use http_body_util::{BodyExt, Limited};
use rand::Rng;

use crate::connectors::{mooncake, RemoteEngine};
use crate::error::ProxyError;
use crate::upstream::{self, HttpClient};

/// As long as vLLM's own bootstrap timeout.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `/query` answer read.
const MAX_ANSWER: usize = 1 << 20;
/// Prefill endpoints remembered; past it the table starts over.
const MAX_ENTRIES: usize = 4096;

pub struct EngineIds {
    port: u16,
    known: Mutex<HashMap<String, Vec<(String, String)>>>,
}

impl EngineIds {
    pub fn new(port: u16) -> Self {
        EngineIds {
            port,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// One rank of the prefill pod `target` (a random one when it has several,
    /// to spread load over them).
    pub async fn resolve(
        &self,
        client: &HttpClient,
        target: &str,
    ) -> Result<RemoteEngine, ProxyError> {
        let addr = mooncake::bootstrap_addr(target, self.port);
        let cached = self.lock().get(target).cloned();
        let ranks = match cached {
            Some(ranks) => ranks,
            None => {
                let ranks =
                    query(client, &addr)
                        .await
                        .map_err(|detail| ProxyError::PrefillBootstrap {
                            target: target.to_string(),
                            detail,
                        })?;
                let mut known = self.lock();
                if known.len() >= MAX_ENTRIES {
                    known.clear();
                }
                known.insert(target.to_string(), ranks.clone());
                ranks
            }
        };
        let (dp_rank, engine_id) = ranks[rand::rng().random_range(0..ranks.len())].clone();
        Ok(RemoteEngine {
            bootstrap_addr: addr,
            dp_rank,
            engine_id,
        })
    }

    /// A prefill leg to `target` failed: ask its bootstrap server again next time.
    pub fn forget(&self, target: &str) {
        self.lock().remove(target);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<(String, String)>>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn query(client: &HttpClient, addr: &str) -> Result<Vec<(String, String)>, String> {
    let uri: Uri = format!("{addr}/query")
        .parse()
        .map_err(|e| format!("{addr}/query: {e}"))?;
    let ask = async {
        let resp = upstream::send_buffered(
            client,
            &Method::GET,
            &uri,
            &HeaderMap::new(),
            bytes::Bytes::new(),
        )
        .await
        .map_err(|e| format!("{uri}: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("{uri}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{uri} answered {status}"));
        }
        mooncake::parse_query(&body)
    };
    tokio::time::timeout(QUERY_TIMEOUT, ask)
        .await
        .map_err(|_| format!("{uri}: no answer in {} s", QUERY_TIMEOUT.as_secs()))?
}
