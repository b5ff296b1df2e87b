//! A scripted Kubernetes API server (the one thing the tests cannot run for real): Namespaces
//! and Pods in the real API's JSON shapes, served over HTTP/1.1 from inside a namespace of
//! the bed, with list and watch as kube-apiserver does them:
//!
//! - `GET /api/v1/namespaces` and `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`: a
//!   list (`NamespaceList`/`PodList`) at the current `resourceVersion`;
//! - the same with `watch=true&resourceVersion=N`: a chunked stream of `{"type", "object"}`
//!   events after N (history replayed, then live); a version older than the compacted
//!   history gets `ERROR` `410 Gone` (`Expired`), as the real server sends it.
//!
//! Faults for the tests: [`KubeApi::down`]/[`KubeApi::up`] (connections refused, open ones
//! cut), [`KubeApi::end_watches`] (a watch that ends), [`KubeApi::expire`] (history compacted
//! and open watches told `410 Gone`). Every request is recorded ([`KubeApi::requests`]).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, StreamExt};

type Body = BoxBody<Bytes, Infallible>;

/// A request the server received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    /// `namespaces` or `pods`.
    pub resource: String,
    pub watch: bool,
    pub query: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Namespace,
    Pod,
}

struct Event {
    rv: u64,
    kind: Kind,
    /// ADDED, MODIFIED, DELETED.
    kind_of_change: &'static str,
    object: Value,
}

struct Watcher {
    kind: Kind,
    node: Option<String>,
    tx: mpsc::Sender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<String, Value>,
    history: Vec<Event>,
    /// Watches from a version below this get 410 Gone.
    oldest: u64,
    watchers: Vec<Watcher>,
    requests: Vec<Seen>,
    /// Set by [`KubeApi::down`] at once (the listener closes a moment later): requests that
    /// still arrive are refused.
    down: bool,
}

fn pod_node(o: &Value) -> Option<&str> {
    o["spec"]["nodeName"].as_str()
}

fn event_line(change: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": change, "object": object})).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

impl State {
    fn record(&mut self, kind: Kind, change: &'static str, mut object: Value) {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        match kind {
            Kind::Namespace => {
                let name = object["metadata"]["name"].as_str().expect("name").to_string();
                if change == "DELETED" {
                    self.namespaces.remove(&name);
                } else {
                    self.namespaces.insert(name, object.clone());
                }
            }
            Kind::Pod => {
                let key = format!(
                    "{}/{}",
                    object["metadata"]["namespace"].as_str().expect("ns"),
                    object["metadata"]["name"].as_str().expect("name")
                );
                if change == "DELETED" {
                    self.pods.remove(&key);
                } else {
                    self.pods.insert(key, object.clone());
                }
            }
        }
        let line = event_line(change, &object);
        self.watchers.retain(|w| {
            if w.kind != kind
                || (kind == Kind::Pod && w.node.as_deref().is_some_and(|n| pod_node(&object) != Some(n)))
            {
                return true;
            }
            w.tx.try_send(line.clone()).is_ok()
        });
        self.history.push(Event { rv: self.rv, kind, kind_of_change: change, object });
    }
}

/// The scripted API server.
pub struct KubeApi {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    /// true: serving; false: refusing connections and cutting open ones.
    serving: watch::Sender<bool>,
    stop: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// `key=value` pairs of a query string, percent-decoded.
fn query_params(q: &str) -> BTreeMap<String, String> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(v) => {
                            out.push(v);
                            i += 3;
                            continue;
                        }
                        None => out.push(b'%'),
                    }
                }
                b'+' => out.push(b' '),
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).expect("json"))).boxed())
        .expect("response")
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

/// A list item as the real server returns it: without apiVersion and kind.
fn item(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    o
}

fn handle(state: &Mutex<State>, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let params = query_params(&query);
    let (kind, resource) = match path.as_str() {
        "/api/v1/namespaces" => (Kind::Namespace, "namespaces"),
        "/api/v1/pods" => (Kind::Pod, "pods"),
        _ => {
            return full(
                StatusCode::NOT_FOUND,
                &status_object(404, "NotFound", &format!("{path}: not served by this mock")),
            )
        }
    };
    let is_watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    let node = params.get("fieldSelector").and_then(|f| f.strip_prefix("spec.nodeName=")).map(String::from);
    if kind == Kind::Pod && params.contains_key("fieldSelector") && node.is_none() {
        return full(
            StatusCode::BAD_REQUEST,
            &status_object(400, "BadRequest", "only spec.nodeName=<node> is supported"),
        );
    }
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    if st.down {
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            &status_object(503, "ServiceUnavailable", "the API is down"),
        );
    }
    st.requests.push(Seen {
        at: Instant::now(),
        resource: resource.to_string(),
        watch: is_watch,
        query: query.clone(),
    });
    let selected = |o: &Value| kind != Kind::Pod || node.as_deref().is_none_or(|n| pod_node(o) == Some(n));
    if !is_watch {
        let objects = if kind == Kind::Namespace { &st.namespaces } else { &st.pods };
        let items: Vec<Value> = objects.values().filter(|o| selected(o)).map(item).collect();
        let list_kind = if kind == Kind::Namespace { "NamespaceList" } else { "PodList" };
        return full(
            StatusCode::OK,
            &json!({"kind": list_kind, "apiVersion": "v1", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(st.rv);
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    if from < st.oldest {
        let gone =
            status_object(410, "Expired", &format!("too old resource version: {from} ({})", st.oldest));
        let _full_channel_is_impossible = tx.try_send(event_line("ERROR", &gone));
        drop(tx);
    } else {
        for e in st.history.iter().filter(|e| e.rv > from && e.kind == kind && selected(&e.object)) {
            let _full_channel_is_impossible = tx.try_send(event_line(e.kind_of_change, &e.object));
        }
        st.watchers.push(Watcher { kind, node, tx });
    }
    let body = StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .expect("response")
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<Mutex<State>>,
    mut serving: watch::Receiver<bool>,
    stop: tokio_util::sync::CancellationToken,
) {
    let addr = listener.local_addr().expect("bound");
    let mut listener = Some(tokio::net::TcpListener::from_std(listener).expect("tokio listener"));
    let mut cut = tokio_util::sync::CancellationToken::new();
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => { cut.cancel(); return; }
            changed = serving.changed() => {
                if changed.is_err() { return; }
                if *serving.borrow_and_update() {
                    // Back up: the same address again (the listener was closed, not the port).
                    let l = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).expect("socket");
                    l.set_reuse_address(true).expect("reuseaddr");
                    l.set_nonblocking(true).expect("nonblocking");
                    l.bind(&addr.into()).expect("rebinding the API address");
                    l.listen(128).expect("listen");
                    listener = Some(tokio::net::TcpListener::from_std(l.into()).expect("tokio listener"));
                } else {
                    listener = None;
                    cut.cancel();
                    cut = tokio_util::sync::CancellationToken::new();
                    state.lock().unwrap_or_else(|p| p.into_inner()).watchers.clear();
                }
            }
            accepted = accept => {
                let Some((stream, _)) = accepted else { continue };
                let state = state.clone();
                let cut = cut.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let resp = handle(&state, &req);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        }
    }
}

impl KubeApi {
    /// Starts the server on `addr` inside the network namespace at `netns`.
    pub fn start(netns: &Path, addr: SocketAddr) -> anyhow::Result<KubeApi> {
        let state = Arc::new(Mutex::new(State::default()));
        let (serving, serving_rx) = watch::channel(true);
        let stop = tokio_util::sync::CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = netns.to_path_buf();
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                let bound = (|| -> anyhow::Result<std::net::TcpListener> {
                    let f = std::fs::File::open(&netns)
                        .with_context(|| format!("opening {}", netns.display()))?;
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
                    let l = socket2::Socket::new(
                        socket2::Domain::for_address(addr),
                        socket2::Type::STREAM,
                        None,
                    )?;
                    l.set_reuse_address(true)?;
                    l.set_nonblocking(true)?;
                    l.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
                    l.listen(128)?;
                    Ok(l.into())
                })();
                let listener = match bound {
                    Ok(l) => l,
                    Err(e) => {
                        let _gone_only_if_the_test_panicked = ready_tx.send(Err(e));
                        return;
                    }
                };
                // A current-thread runtime: every socket it makes stays in this namespace.
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                let _gone_only_if_the_test_panicked = ready_tx.send(Ok(()));
                rt.block_on(serve(listener, state, serving_rx, stop));
            })
        };
        ready_rx.recv().context("the API server thread died")??;
        Ok(KubeApi { state, addr, serving, stop, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP: it is a mock).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{}\ncontexts:\n- name: mock\n  context:\n    cluster: mock\n    user: ambit\ncurrent-context: mock\nusers:\n- name: ambit\n  user:\n    token: mock-token\n",
            self.addr
        );
        std::fs::write(&path, text).expect("writing the kubeconfig");
        path
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Creates or updates a namespace with `labels`.
    pub fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> =
            labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        self.with(|st| {
            let (change, uid) = match st.namespaces.get(name) {
                Some(o) => ("MODIFIED", o["metadata"]["uid"].clone()),
                None => ("ADDED", json!(format!("ns-{name}-{}", st.rv + 1))),
            };
            let object = json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "uid": uid, "labels": labels, "creationTimestamp": "2026-11-23T00:00:00Z"},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"}
            });
            st.record(Kind::Namespace, change, object);
        });
    }

    /// Creates or replaces a pod object (see [`pod_object`]).
    pub fn pod(&self, object: Value) {
        self.with(|st| {
            let key = format!(
                "{}/{}",
                object["metadata"]["namespace"].as_str().expect("ns"),
                object["metadata"]["name"].as_str().expect("name")
            );
            let change = if st.pods.contains_key(&key) { "MODIFIED" } else { "ADDED" };
            st.record(Kind::Pod, change, object);
        });
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.with(|st| {
            let object = st.pods.get(&format!("{namespace}/{name}")).cloned().expect("the pod exists");
            st.record(Kind::Pod, "DELETED", object);
        });
    }

    /// Stops serving: new connections are refused, open ones (watches too) are cut.
    pub fn down(&self) {
        // Cut the watches now, so that no change made after this call reaches a client.
        self.with(|st| {
            st.down = true;
            st.watchers.clear();
        });
        self.serving.send_replace(false);
    }

    /// Serves again on the same address.
    pub fn up(&self) {
        self.serving.send_replace(true);
        self.with(|st| st.down = false);
    }

    /// Ends every open watch cleanly (the server's watch timeout).
    pub fn end_watches(&self) {
        self.with(|st| st.watchers.clear());
    }

    /// Compacts the history: open watches get `410 Gone` and end; a watch from any version
    /// seen so far gets the same. Clients must list again.
    pub fn expire(&self) {
        self.with(|st| {
            st.oldest = st.rv + 1;
            st.history.clear();
            let gone = status_object(410, "Expired", "too old resource version");
            for w in st.watchers.drain(..) {
                let _closing_anyway = w.tx.try_send(event_line("ERROR", &gone));
            }
        });
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.with(|st| st.requests.clone())
    }

    /// Open watch streams.
    pub fn open_watches(&self) -> usize {
        self.with(|st| st.watchers.iter().filter(|w| !w.tx.is_closed()).count())
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _a_panicked_server_already_failed_the_test = t.join();
        }
    }
}

// The pod vocabulary the scripted API's users also need, kept where `cargo xtask` (built
// without the scripted peers) finds it too.
pub use crate::pods::{pod_object, sandbox, sandbox_in, CgroupDriver, PodObject};
