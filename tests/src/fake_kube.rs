//! A fake Kubernetes API server on loopback for the InferencePool watch:
//! list and watch of `inferencepools` (any group and version) and `pods` in
//! a namespace, with `labelSelector` (equality terms), `fieldSelector`
//! (`metadata.name=`), `resourceVersion` and streamed watch events
//! (`{"type": "ADDED"|"MODIFIED"|"DELETED", "object": ...}`, one JSON object
//! a line), as the API server's REST protocol has them. It can go down
//! (listener closed, every connection dropped) and come back on the same
//! port with its state, as an API server restart does.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Pool,
    Pod,
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    ty: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    log: Vec<Change>,
    /// Request lines seen, for diagnostics.
    seen: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
}

pub struct FakeKube {
    port: u16,
    shared: Arc<Shared>,
    conns: Option<Conns>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

type Conns = Arc<Mutex<JoinSet<()>>>;

impl FakeKube {
    /// Starts serving on a free loopback port.
    pub async fn start() -> FakeKube {
        let (changes, _) = broadcast::channel(1024);
        let mut k = FakeKube {
            port: 0,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changes,
            }),
            conns: None,
            accept: None,
        };
        k.up().await;
        k
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes a kubeconfig pointing at this server into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    async fn up(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        // The port may linger for a moment after `down`.
        let listener = {
            let mut tries = 0;
            loop {
                match TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(_) if tries < 100 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("fake API server cannot bind {addr}: {e}"),
                }
            }
        };
        self.port = listener.local_addr().unwrap().port();
        let conns: Conns = Arc::new(Mutex::new(JoinSet::new()));
        let shared = self.shared.clone();
        let set = conns.clone();
        self.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                set.lock().unwrap().spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
        self.conns = Some(conns);
    }

    /// The API server goes away: the listener closes and every open
    /// connection (watches included) is dropped.
    pub async fn down(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
            let _ = a.await;
        }
        if let Some(set) = self.conns.take() {
            set.lock().unwrap().abort_all();
        }
    }

    /// Back on the same port, with the same objects and history.
    pub async fn back_up(&mut self) {
        self.up().await;
    }

    /// Request lines received so far (method, path and query).
    pub fn seen(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().seen.clone()
    }

    /// Creates or replaces an InferencePool (`apiVersion` e.g.
    /// `inference.networking.k8s.io/v1`).
    pub fn apply_pool(&self, namespace: &str, name: &str, api_version: &str, spec: Value) {
        let obj = json!({
            "apiVersion": api_version,
            "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("pool-{name}")},
            "spec": spec,
        });
        // One object per group and version: they are different resources.
        self.put(Kind::Pool, namespace, &format!("{api_version}/{name}"), obj);
    }

    /// Deletes the pool of that name in every group and version.
    pub fn delete_pool(&self, namespace: &str, name: &str) {
        let keys: Vec<String> = {
            let s = self.shared.state.lock().unwrap();
            s.objects
                .keys()
                .filter(|(k, ns, key)| {
                    *k == Kind::Pool && ns == namespace && key.ends_with(&format!("/{name}"))
                })
                .map(|(_, _, key)| key.clone())
                .collect()
        };
        for key in keys {
            self.delete(Kind::Pool, namespace, &key);
        }
    }

    /// Creates or replaces a pod with `labels`, IP and readiness.
    pub fn apply_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ip: &str,
        ready: bool,
    ) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let status = if ready { "True" } else { "False" };
        let obj = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("pod-{name}"), "labels": labels},
            "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": status}],
            },
        });
        self.put(Kind::Pod, namespace, name, obj);
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.delete(Kind::Pod, namespace, name);
    }

    fn put(&self, kind: Kind, namespace: &str, key: &str, mut obj: Value) {
        let mut s = self.shared.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = Value::from(rv.to_string());
        let key = (kind, namespace.to_string(), key.to_string());
        let ty = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, obj.clone());
        self.record(&mut s, kind, namespace, ty, obj);
    }

    fn delete(&self, kind: Kind, namespace: &str, key: &str) {
        let mut s = self.shared.state.lock().unwrap();
        let Some(mut obj) = s
            .objects
            .remove(&(kind, namespace.to_string(), key.to_string()))
        else {
            return;
        };
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::from(s.rv.to_string());
        self.record(&mut s, kind, namespace, "DELETED", obj);
    }

    fn record(&self, s: &mut State, kind: Kind, namespace: &str, ty: &'static str, object: Value) {
        let change = Change {
            rv: s.rv,
            kind,
            namespace: namespace.to_string(),
            ty,
            object,
        };
        s.log.push(change.clone());
        let _ = self.shared.changes.send(change);
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        if let Some(set) = self.conns.take() {
            set.lock().unwrap().abort_all();
        }
    }
}

/// What a request asks for.
struct Query {
    kind: Kind,
    namespace: String,
    list_kind: &'static str,
    api_version: String,
    watch: bool,
    resource_version: u64,
    labels: Vec<(String, String)>,
    name: Option<String>,
    timeout: Duration,
}

fn parse(req: &Request<Incoming>) -> Result<Query, String> {
    let path: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let (kind, namespace, api_version, list_kind) = match path.as_slice() {
        ["api", "v1", "namespaces", ns, "pods"] => (Kind::Pod, *ns, "v1".to_string(), "PodList"),
        ["apis", group, version, "namespaces", ns, "inferencepools"] => (
            Kind::Pool,
            *ns,
            format!("{group}/{version}"),
            "InferencePoolList",
        ),
        _ => return Err(format!("no route for {}", req.uri().path())),
    };
    let mut q = Query {
        kind,
        namespace: namespace.to_string(),
        list_kind,
        api_version,
        watch: false,
        resource_version: 0,
        labels: Vec::new(),
        name: None,
        timeout: Duration::from_secs(290),
    };
    for pair in req.uri().query().unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "watch" => q.watch = v == "true" || v == "1",
            "resourceVersion" => q.resource_version = v.parse().unwrap_or(0),
            "timeoutSeconds" => {
                q.timeout = Duration::from_secs(v.parse().unwrap_or(290));
            }
            "labelSelector" => {
                for term in v.split(',').filter(|t| !t.is_empty()) {
                    let (lk, lv) = term
                        .split_once("==")
                        .or_else(|| term.split_once('='))
                        .ok_or_else(|| format!("unsupported label selector term {term:?}"))?;
                    q.labels.push((lk.to_string(), lv.to_string()));
                }
            }
            "fieldSelector" => {
                for term in v.split(',').filter(|t| !t.is_empty()) {
                    match term.split_once('=') {
                        Some(("metadata.name", n)) => q.name = Some(n.to_string()),
                        _ => return Err(format!("unsupported field selector {term:?}")),
                    }
                }
            }
            _ => {}
        }
    }
    Ok(q)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Query {
    fn matches(&self, kind: Kind, namespace: &str, obj: &Value) -> bool {
        kind == self.kind
            && namespace == self.namespace
            && self
                .name
                .as_ref()
                .is_none_or(|n| obj["metadata"]["name"] == n.as_str())
            && self
                .labels
                .iter()
                .all(|(k, v)| obj["metadata"]["labels"][k] == v.as_str())
            && (kind != Kind::Pool || obj["apiVersion"] == self.api_version.as_str())
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    shared
        .state
        .lock()
        .unwrap()
        .seen
        .push(format!("{} {}", req.method(), req.uri()));
    let q = match parse(&req) {
        Ok(q) => q,
        Err(e) => {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": e, "reason": "NotFound", "code": 404}),
            )
        }
    };
    if !q.watch {
        let s = shared.state.lock().unwrap();
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, ns, _), o)| q.matches(*k, ns, o))
            .map(|(_, o)| o.clone())
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": q.api_version,
                "kind": q.list_kind,
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": items,
            }),
        );
    }
    // Subscribe first, then replay the log past the asked version, then
    // follow: nothing falls between the two.
    let mut rx = shared.changes.subscribe();
    let backlog: Vec<Change> = {
        let s = shared.state.lock().unwrap();
        s.log
            .iter()
            .filter(|c| c.rv > q.resource_version)
            .cloned()
            .collect()
    };
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    tokio::spawn(async move {
        let line = |c: &Change| {
            let mut l = json!({"type": c.ty, "object": c.object}).to_string();
            l.push('\n');
            Ok(Frame::data(Bytes::from(l)))
        };
        let mut last = q.resource_version;
        for c in backlog
            .iter()
            .filter(|c| q.matches(c.kind, &c.namespace, &c.object))
        {
            last = last.max(c.rv);
            if tx.send(line(c)).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(q.timeout);
        tokio::pin!(end);
        loop {
            tokio::select! {
                _ = &mut end => return,
                c = rx.recv() => match c {
                    Ok(c) if c.rv > last && q.matches(c.kind, &c.namespace, &c.object) => {
                        last = c.rv;
                        if tx.send(line(&c)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let stream = tokio_stream_from(body_rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
