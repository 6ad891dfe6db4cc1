//! The InferencePool watch behind `--enable-ssrf-protection --inference-pool`:
//! the pool (`inference.networking.k8s.io/v1`, or `v1alpha2` of
//! `inference.networking.x-k8s.io`) and the pods its selector picks, through
//! kube-rs watchers (list, then watch, re-listing after errors with backoff).
//! The allowed endpoints are the ready pods' IPs times the pool's target
//! ports, recomputed on every change and published to [`PoolEndpoints`];
//! nothing of the pool is allowed before its first complete list.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use serde_json::Value;

use crate::allow::PoolEndpoints;

/// The pool named by `--inference-pool` and `--pool-group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRef {
    pub namespace: String,
    pub name: String,
    pub group: String,
}

pub const GROUP_V1: &str = "inference.networking.k8s.io";
pub const GROUP_X: &str = "inference.networking.x-k8s.io";

impl PoolRef {
    /// `ns/name`, or `name` with the namespace from `namespace` (the
    /// `INFERENCE_POOL_NAMESPACE` variable, else the pod's own namespace as
    /// the service account mounts it).
    pub fn parse(pool: &str, namespace: Option<&str>, group: &str) -> Result<PoolRef, String> {
        if group != GROUP_V1 && group != GROUP_X {
            return Err(format!(
                "--pool-group={group:?}: expected {GROUP_V1} (v1) or {GROUP_X} (v1alpha2)"
            ));
        }
        let (ns, name) = match pool.split_once('/') {
            Some((ns, name)) => (Some(ns.to_string()), name),
            None => (namespace.map(str::to_string).or_else(own_namespace), pool),
        };
        let Some(ns) = ns.filter(|n| !n.is_empty()) else {
            return Err(format!(
                "--inference-pool={pool:?}: no namespace (use ns/name or set INFERENCE_POOL_NAMESPACE)"
            ));
        };
        if name.is_empty() || name.contains('/') {
            return Err(format!(
                "--inference-pool={pool:?}: expected 'namespace/name' or 'name'"
            ));
        }
        Ok(PoolRef {
            namespace: ns,
            name: name.to_string(),
            group: group.to_string(),
        })
    }

    pub fn version(&self) -> &'static str {
        if self.group == GROUP_X {
            "v1alpha2"
        } else {
            "v1"
        }
    }
}

impl std::fmt::Display for PoolRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} ({}/{})",
            self.namespace,
            self.name,
            self.group,
            self.version()
        )
    }
}

fn own_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Where the allowed prefill pods come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolSource {
    /// An InferencePool's selector and target ports, followed as they change.
    Pool(PoolRef),
    /// A fixed selector and ports (`--prefill-pod-selector`).
    Selector { namespace: String, spec: PoolSpec },
}

impl PoolSource {
    /// `k=v,k2=v2` and the ports, in `namespace` or the pod's own.
    pub fn selector(
        selector: &str,
        ports: &[u16],
        namespace: Option<&str>,
    ) -> Result<PoolSource, String> {
        let mut labels = BTreeMap::new();
        for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, v) = term
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("--prefill-pod-selector: {term:?} is not key=value"))?;
            labels.insert(k.trim().to_string(), v.trim().to_string());
        }
        if labels.is_empty() {
            return Err("--prefill-pod-selector is empty".into());
        }
        if ports.is_empty() || ports.contains(&0) {
            return Err("--prefill-pod-selector needs --prefill-pod-ports (1-65535)".into());
        }
        let Some(namespace) = namespace.map(str::to_string).or_else(own_namespace) else {
            return Err(
                "--prefill-pod-selector: no namespace (set INFERENCE_POOL_NAMESPACE)".into(),
            );
        };
        let mut ports = ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        Ok(PoolSource::Selector {
            namespace,
            spec: PoolSpec {
                selector: labels,
                ports,
            },
        })
    }
}

impl std::fmt::Display for PoolSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolSource::Pool(p) => p.fmt(f),
            PoolSource::Selector { namespace, spec } => write!(
                f,
                "pods {} in {namespace}, ports {:?}",
                spec.label_selector().unwrap_or_default(),
                spec.ports
            ),
        }
    }
}

/// What the allow-list needs of a pool: its pod selector and target ports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolSpec {
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<u16>,
}

impl PoolSpec {
    /// Reads `spec` in either version: v1 `selector.matchLabels` and
    /// `targetPorts[].number`; v1alpha2 `selector` (a plain map) and
    /// `targetPortNumber`. A spec without a selector or ports selects nothing.
    pub fn from_object(obj: &Value) -> PoolSpec {
        let spec = &obj["spec"];
        let labels = spec["selector"]
            .get("matchLabels")
            .unwrap_or(&spec["selector"]);
        let selector = labels
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let port = |v: &Value| {
            v.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
        };
        let mut ports: Vec<u16> = match spec["targetPorts"].as_array() {
            Some(list) => list.iter().filter_map(|p| port(&p["number"])).collect(),
            None => port(&spec["targetPortNumber"]).into_iter().collect(),
        };
        ports.sort_unstable();
        ports.dedup();
        PoolSpec { selector, ports }
    }

    /// `k=v,k2=v2`, or None when the selector is empty (which must select
    /// nothing here, not every pod of the namespace).
    pub fn label_selector(&self) -> Option<String> {
        if self.selector.is_empty() {
            return None;
        }
        Some(
            self.selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        )
    }
}

/// A pod's addresses if it is ready to serve: the Ready condition is True
/// and it is not being deleted.
pub fn ready_ips(pod: &Pod) -> Vec<IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Vec::new();
    }
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// Every ready pod's IP with every target port.
pub fn endpoints<'a>(pods: impl Iterator<Item = &'a Pod>, ports: &[u16]) -> HashSet<SocketAddr> {
    pods.flat_map(ready_ips)
        .flat_map(|ip| ports.iter().map(move |&p| SocketAddr::new(ip, p)))
        .collect()
}

type PodEvents = BoxStream<'static, Result<Event<Pod>, watcher::Error>>;
type PoolEvents = BoxStream<'static, Result<Event<DynamicObject>, watcher::Error>>;

/// The pods of one selector, kept by kube-runtime's reflector (a re-list
/// replaces the store whole at its `InitDone`).
struct PodWatch {
    store: Store<Pod>,
    events: PodEvents,
    /// The first complete list has arrived.
    synced: bool,
}

impl PodWatch {
    fn start(api: &Api<Pod>, selector: &str) -> PodWatch {
        let (store, writer) = reflector::store();
        let events = watcher(api.clone(), watcher::Config::default().labels(selector))
            .default_backoff()
            .reflect(writer)
            .boxed();
        PodWatch {
            store,
            events,
            synced: false,
        }
    }
}

/// Watches the pool (or only the pods of a fixed selector) for as long as
/// the process runs, keeping `out` current. Errors (API down, forbidden,
/// the CRD missing) are logged and retried with backoff; the last published
/// set stays until a new complete list replaces it.
pub async fn watch(client: kube::Client, source: PoolSource, out: Arc<PoolEndpoints>) {
    let pool = source.to_string();
    let mut spec: Option<PoolSpec> = None;
    let mut seen_in_list = false;
    let (namespace, mut pool_events): (String, Option<PoolEvents>) = match &source {
        PoolSource::Pool(p) => {
            let gvk = GroupVersionKind::gvk(&p.group, p.version(), "InferencePool");
            let resource = ApiResource::from_gvk_with_plural(&gvk, "inferencepools");
            let pools: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &p.namespace, &resource);
            let events = watcher(
                pools,
                watcher::Config::default().fields(&format!("metadata.name={}", p.name)),
            )
            .default_backoff()
            .boxed();
            (p.namespace.clone(), Some(events))
        }
        PoolSource::Selector { namespace, .. } => (namespace.clone(), None),
    };
    let pod_api: Api<Pod> = Api::namespaced(client, &namespace);
    let mut pods: Option<PodWatch> = None;
    if let PoolSource::Selector { spec: fixed, .. } = &source {
        spec = Some(fixed.clone());
        pods = fixed
            .label_selector()
            .map(|sel| PodWatch::start(&pod_api, &sel));
    }
    // The ready endpoints of the current spec and pods; nothing without a spec.
    let publish = |spec: &Option<PoolSpec>, pods: &Option<PodWatch>| {
        let set = match (spec, pods) {
            (Some(s), Some(w)) => endpoints(w.store.state().iter().map(|p| p.as_ref()), &s.ports),
            _ => HashSet::new(),
        };
        let n = set.len();
        if out.set(set) {
            tracing::info!(pool = %pool, endpoints = n, "prefill allow-list updated from the InferencePool");
        }
    };
    loop {
        tokio::select! {
            ev = next_event(pool_events.as_mut()) => {
                let Some(ev) = ev else {
                    pool_events = None;
                    continue;
                };
                let new_spec = match ev {
                    Err(e) => {
                        tracing::warn!(pool = %pool, error = %e, "watching the InferencePool failed; retrying");
                        continue;
                    }
                    Ok(Event::Init) => {
                        seen_in_list = false;
                        continue;
                    }
                    Ok(Event::InitApply(o)) => {
                        seen_in_list = true;
                        Some(PoolSpec::from_object(&o.data))
                    }
                    Ok(Event::Apply(o)) => Some(PoolSpec::from_object(&o.data)),
                    Ok(Event::InitDone) if seen_in_list => continue,
                    // Listed and absent, or deleted: it selects nothing.
                    Ok(Event::InitDone | Event::Delete(_)) => None,
                };
                if new_spec == spec && (spec.is_some() || out.synced()) {
                    continue;
                }
                let selector_changed =
                    new_spec.as_ref().map(|s| &s.selector) != spec.as_ref().map(|s| &s.selector);
                spec = new_spec;
                if !selector_changed {
                    // Only the ports changed: same pods.
                    if pods.as_ref().is_some_and(|w| w.synced) || spec.is_none() {
                        publish(&spec, &pods);
                    }
                    continue;
                }
                match spec.as_ref().and_then(PoolSpec::label_selector) {
                    Some(sel) => {
                        tracing::info!(pool = %pool, selector = %sel, ports = ?spec.as_ref().map(|s| &s.ports), "watching the InferencePool's pods");
                        out.unsync();
                        pods = Some(PodWatch::start(&pod_api, &sel));
                    }
                    None => {
                        pods = None;
                        publish(&spec, &pods);
                    }
                }
            }
            ev = next_event(pods.as_mut().map(|w| &mut w.events)) => {
                let Some(ev) = ev else {
                    pods = None;
                    continue;
                };
                let Some(w) = pods.as_mut() else { continue };
                match ev {
                    Err(e) => {
                        tracing::warn!(pool = %pool, error = %e, "watching the pool's pods failed; retrying");
                    }
                    // The store now holds the whole list.
                    Ok(Event::InitDone) => {
                        w.synced = true;
                        publish(&spec, &pods);
                    }
                    Ok(Event::Apply(_) | Event::Delete(_)) if w.synced => publish(&spec, &pods),
                    Ok(_) => {}
                }
            }
        }
    }
}

/// The next event of a watch, or pending for ever while there is none.
async fn next_event<T>(events: Option<&mut BoxStream<'static, T>>) -> Option<T> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// A client from the in-cluster service account, or from `KUBECONFIG` /
/// `~/.kube/config` outside a cluster.
pub async fn client() -> Result<kube::Client, String> {
    kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client configuration (in-cluster or kubeconfig): {e}"))
}

/// Starts the watch on the current runtime.
pub fn spawn(client: kube::Client, source: PoolSource, out: Arc<PoolEndpoints>) {
    tokio::spawn(watch(client, source, out));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pool_refs() {
        let p = PoolRef::parse("ns/pool", None, GROUP_V1).unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.version()),
            ("ns", "pool", "v1")
        );
        let p = PoolRef::parse("pool", Some("other"), GROUP_X).unwrap();
        assert_eq!((p.namespace.as_str(), p.version()), ("other", "v1alpha2"));
        assert!(PoolRef::parse("a/b/c", None, GROUP_V1).is_err());
        assert!(PoolRef::parse("ns/", None, GROUP_V1).is_err());
        assert!(PoolRef::parse("ns/p", None, "example.com").is_err());
    }

    #[test]
    fn both_pool_versions_read() {
        let v1 = json!({"spec": {"selector": {"matchLabels": {"app": "prefill", "llm-d.ai/role": "prefill"}},
                        "targetPorts": [{"number": 8000}, {"number": 8001}, {"number": 0}]}});
        let s = PoolSpec::from_object(&v1);
        assert_eq!(s.ports, vec![8000, 8001]);
        assert_eq!(
            s.label_selector().unwrap(),
            "app=prefill,llm-d.ai/role=prefill"
        );
        let x = json!({"spec": {"selector": {"app": "p"}, "targetPortNumber": 8200}});
        let s = PoolSpec::from_object(&x);
        assert_eq!(
            (s.ports.clone(), s.label_selector()),
            (vec![8200], Some("app=p".into()))
        );
        let empty = PoolSpec::from_object(&json!({"spec": {}}));
        assert!(empty.label_selector().is_none() && empty.ports.is_empty());
    }

    fn pod(ip: &str, ready: &str, deleting: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": ip, "deletionTimestamp": if deleting { json!("2026-12-02T00:00:00Z") } else { Value::Null }},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap()
    }

    #[test]
    fn only_ready_pods_count_with_every_port() {
        let pods = [
            pod("10.0.0.1", "True", false),
            pod("10.0.0.2", "False", false),
            pod("10.0.0.3", "True", true),
            pod("fd00::4", "True", false),
        ];
        let set = endpoints(pods.iter(), &[8000, 8001]);
        let mut got: Vec<String> = set.iter().map(|a| a.to_string()).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                "10.0.0.1:8000",
                "10.0.0.1:8001",
                "[fd00::4]:8000",
                "[fd00::4]:8001"
            ]
        );
        let no_status: Pod = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert!(ready_ips(&no_status).is_empty());
    }
}
