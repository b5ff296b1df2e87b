//! The Kubernetes API as the pod source, as istio-cni is for ztunnel: Namespaces (all) and the
//! Pods of this node (`spec.nodeName`), listed then watched. Every change publishes a new
//! [`Mesh`] of namespaces with their labels and this node's pods; the node proxy enrols those
//! the [`Enrolment`] rules select.
//!
//! - A pod is considered once it has an IP and while it runs: host-network pods, finished
//!   pods and pods with an Istio sidecar are never captured.
//! - A pod the CNI plugin announced ([`sandboxes`]) is enrolled from the runtime's network
//!   namespace and addresses at once, before its first process runs; a pod whose sandbox
//!   the runtime deleted is left out.
//! - Any other enrolled pod's network namespace is found under `/proc` ([`procfs`]): pods
//!   that ran before ambit, or before a restart. Until one of its processes exists it is
//!   left out (with the reason in the status) and looked for again every second.
//! - The API going away, a watch ending, or `410 Gone` are handled by kube's watcher: re-watch
//!   from the last version, or list again from scratch, with jittered exponential backoff
//!   (0.8 s doubling to 30 s). The last complete view stays in force meanwhile.

pub mod annotate;
pub mod lookup;
pub mod procfs;
pub mod sandboxes;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace as KubeNamespace, Pod};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt},
    Api, Client, Config, ResourceExt,
};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    enroll::EnrolledReport,
    meshfile::{Enrolment, Mesh, Namespace, PodSpec},
};
use lookup::NotEnrolled;
use procfs::ProcNetns;
use sandboxes::Sandboxes;

/// How often pods' network namespaces are checked again: pending ones looked for, found
/// ones confirmed (the process found may have ended).
const NETNS_RETRY: Duration = Duration::from_secs(1);

/// Pods with this annotation run an Istio sidecar: istio-cni leaves them alone, so does ambit.
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

#[derive(Clone, Debug, Serialize)]
pub struct KubeSettings {
    /// A kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config`, then the in-cluster
    /// service account (the DaemonSet's case).
    pub kubeconfig: Option<PathBuf>,
    /// The host's `/proc` (where pods' processes are visible).
    pub proc_dir: PathBuf,
    pub node_name: String,
    /// Where sandboxes the CNI plugin announced are kept across restarts (`None`: no CNI
    /// plugin, or in memory only).
    pub sandbox_file: Option<PathBuf>,
}

/// What the pod source has seen (config dump, tests).
#[derive(Clone, Debug, Default, Serialize)]
pub struct KubeStatus {
    /// Both lists complete at least once.
    pub synced: bool,
    pub namespaces: usize,
    pub pods: usize,
    /// Complete lists received, per resource (the first and every relist).
    pub lists: BTreeMap<&'static str, u64>,
    /// Errors from the API (each followed by a retry with backoff).
    pub errors: u64,
    pub last_error: Option<String>,
    /// Enrolled pods left out for now, and why (no network namespace found yet).
    pub pending: BTreeMap<String, String>,
    /// Pods of this node never captured, and why (host network, sidecar, finished, no IP).
    pub skipped: BTreeMap<String, String>,
    /// Pods enrolled from the sandbox the CNI plugin announced: `namespace/name` → netns.
    pub cni_sandboxes: BTreeMap<String, PathBuf>,
}

/// A running pod source.
pub struct KubeSource {
    pub meshes: watch::Receiver<Arc<Mesh>>,
    pub synced: watch::Receiver<bool>,
    pub status: Arc<Mutex<KubeStatus>>,
    /// The node reports here which pods it has enrolled (and which failed), after every
    /// reconcile: their `ambient.istio.io/redirection` annotation follows (see [`annotate`]),
    /// and the CNI plugin's ADD waits for its pod in it.
    pub enrolled: Arc<watch::Sender<Option<EnrolledReport>>>,
    /// Sandboxes the CNI plugin announced.
    pub sandboxes: Arc<Sandboxes>,
    /// For fresh lookups (the CNI plugin's ADD).
    pub client: Client,
}

/// Objects of one kind as the watcher reports them: the current complete view, and the one
/// being listed.
struct Objects<K> {
    current: Option<BTreeMap<String, K>>,
    listing: Option<BTreeMap<String, K>>,
}

impl<K: ResourceExt> Objects<K> {
    fn new() -> Self {
        Objects { current: None, listing: None }
    }

    fn key(o: &K) -> String {
        o.uid().unwrap_or_else(|| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
    }

    /// Applies one event; true when the complete view changed (or became complete).
    fn apply(&mut self, event: watcher::Event<K>) -> bool {
        match event {
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(o) => {
                self.listing.get_or_insert_default().insert(Self::key(&o), o);
                false
            }
            watcher::Event::InitDone => {
                self.current = Some(self.listing.take().unwrap_or_default());
                true
            }
            watcher::Event::Apply(o) => {
                self.current.get_or_insert_default().insert(Self::key(&o), o);
                true
            }
            watcher::Event::Delete(o) => {
                self.current.get_or_insert_default().remove(&Self::key(&o)).is_some()
            }
        }
    }
}

/// A client from a kubeconfig file, or (`None`) `KUBECONFIG`, `~/.kube/config`, then the
/// in-cluster service account.
pub async fn client_from(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => Config::infer()
            .await
            .context("no Kubernetes API configuration (no kubeconfig, not running in a pod)")?,
    };
    tracing::info!(api = %config.cluster_url, "Kubernetes API");
    Client::try_from(config).context("creating the Kubernetes client")
}

/// Starts watching; returns at once. `synced` turns true after the first complete lists.
pub async fn start(
    settings: KubeSettings,
    rules: Enrolment,
    stop: CancellationToken,
) -> anyhow::Result<KubeSource> {
    let has_processes = std::fs::read_dir(&settings.proc_dir)
        .map(|d| d.flatten().any(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok())))
        .unwrap_or(false);
    if !has_processes {
        anyhow::bail!(
            "{}: not a /proc with processes (mount the host's /proc and point --proc-dir at it)",
            settings.proc_dir.display()
        );
    }
    let client = client_from(settings.kubeconfig.as_deref()).await?;
    let (tx, meshes) = watch::channel(Arc::new(Mesh::default()));
    let (synced_tx, synced) = watch::channel(false);
    let status = Arc::new(Mutex::new(KubeStatus::default()));
    let sandboxes = Arc::new(Sandboxes::new(settings.sandbox_file.clone()));
    let builder = Builder {
        rules,
        node: settings.node_name.clone(),
        netns: ProcNetns::new(&settings.proc_dir),
        sandboxes: sandboxes.clone(),
    };
    let (enrolled, enrolled_rx) = watch::channel(None);
    let (annotations_tx, annotations) = watch::channel(annotate::Annotations::new());
    tokio::spawn(annotate::run(client.clone(), enrolled_rx, annotations, stop.clone()));
    let outputs = Outputs { meshes: tx, synced: synced_tx, annotations: annotations_tx };
    tokio::spawn(run(client.clone(), settings.node_name, builder, outputs, status.clone(), stop));
    Ok(KubeSource { meshes, synced, status, enrolled: Arc::new(enrolled), sandboxes, client })
}

/// What the watch loop publishes.
struct Outputs {
    meshes: watch::Sender<Arc<Mesh>>,
    synced: watch::Sender<bool>,
    /// This node's pods' redirection annotations, for the annotator.
    annotations: watch::Sender<annotate::Annotations>,
}

fn note_error(status: &Mutex<KubeStatus>, what: &str, e: &watcher::Error) {
    let msg = format!("{what}: {e}");
    tracing::warn!(error = %msg, "Kubernetes API error; retrying with backoff, the last view stays in force");
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    s.errors += 1;
    s.last_error = Some(msg);
}

async fn run(
    client: Client,
    node: String,
    mut builder: Builder,
    outputs: Outputs,
    status: Arc<Mutex<KubeStatus>>,
    stop: CancellationToken,
) {
    let Outputs { meshes: tx, synced, annotations } = outputs;
    let ns_api: Api<KubeNamespace> = Api::all(client.clone());
    let pod_api: Api<Pod> = Api::all(client);
    let mut ns_events = watcher(ns_api, watcher::Config::default()).default_backoff().boxed();
    let pod_config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut pod_events = watcher(pod_api, pod_config).default_backoff().boxed();
    let (mut namespaces, mut pods) = (Objects::<KubeNamespace>::new(), Objects::<Pod>::new());
    let mut retry = tokio::time::interval(NETNS_RETRY);
    let mut announced = builder.sandboxes.subscribe();
    loop {
        let changed = tokio::select! {
            () = stop.cancelled() => return,
            e = ns_events.next() => match e {
                Some(Ok(ev)) => {
                    let done = matches!(ev, watcher::Event::InitDone);
                    if done {
                        *status.lock().unwrap_or_else(|p| p.into_inner()).lists.entry("namespaces").or_default() += 1;
                    }
                    namespaces.apply(ev)
                }
                Some(Err(e)) => { note_error(&status, "namespaces", &e); false }
                None => { tracing::error!("the namespace watch ended for good"); return; }
            },
            e = pod_events.next() => match e {
                Some(Ok(ev)) => {
                    if matches!(ev, watcher::Event::InitDone) {
                        *status.lock().unwrap_or_else(|p| p.into_inner()).lists.entry("pods").or_default() += 1;
                    }
                    pods.apply(ev)
                }
                Some(Err(e)) => { note_error(&status, "pods", &e); false }
                None => { tracing::error!("the pod watch ended for good"); return; }
            },
            // Pending pods may have started; a pod's process found earlier may have ended
            // (its namespace is then found through another one).
            _ = retry.tick() => true,
            // The CNI plugin added or deleted a sandbox.
            r = announced.changed() => r.is_ok(),
        };
        let (Some(ns), Some(ps)) = (&namespaces.current, &pods.current) else { continue };
        if !changed && *synced.borrow() {
            continue;
        }
        let current: annotate::Annotations =
            ps.values().map(|p| (pod_key(p), p.annotations().get(annotate::REDIRECTION).cloned())).collect();
        annotations.send_if_modified(|a| {
            let differs = *a != current;
            if differs {
                *a = current;
            }
            differs
        });
        builder.sandboxes.expire(|uid, key| ps.contains_key(uid) || ps.values().any(|p| pod_key(p) == key));
        let (mesh, pending, skipped) = builder.build(ns, ps);
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            for (pod, why) in &pending {
                if s.pending.get(pod) != Some(why) {
                    tracing::warn!(pod = %pod, reason = %why, "enrolled pod not captured yet: its network namespace is not found; retrying every second");
                }
            }
            for pod in s.pending.keys().filter(|p| !pending.contains_key(*p)) {
                tracing::info!(pod = %pod, "network namespace found");
            }
            s.synced = true;
            s.namespaces = ns.len();
            s.pods = ps.len();
            s.pending = pending;
            s.skipped = skipped;
            s.cni_sandboxes =
                builder.sandboxes.snapshot().added.values().map(|b| (b.key(), b.netns.clone())).collect();
        }
        tx.send_if_modified(|m| {
            let differs = **m != mesh;
            if differs {
                tracing::debug!(
                    pods = mesh.pods.len(),
                    namespaces = mesh.namespaces.len(),
                    "pods from the Kubernetes API"
                );
                *m = Arc::new(mesh);
            }
            differs
        });
        synced.send_if_modified(|s| !std::mem::replace(s, true));
    }
}

/// Turns the watched objects into a [`Mesh`].
struct Builder {
    rules: Enrolment,
    node: String,
    netns: ProcNetns,
    sandboxes: Arc<Sandboxes>,
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// The pod as the rest of ambit sees it; `netns` is filled in once found.
fn pod_spec(pod: &Pod, node: &str, ips: Vec<IpAddr>) -> PodSpec {
    PodSpec {
        name: pod.name_any(),
        namespace: pod.namespace().unwrap_or_default(),
        labels: pod.labels().clone(),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        ips,
        netns: PathBuf::new(),
        node: Some(node.to_string()),
        interface: "eth0".into(),
        healthy: ready(pod),
    }
}

/// Why a pod of this node is never captured, if it is not.
fn never_captured(pod: &Pod) -> Option<NotEnrolled> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return Some(NotEnrolled::HostNetwork);
    }
    if pod.annotations().contains_key(SIDECAR_STATUS) {
        return Some(NotEnrolled::Sidecar);
    }
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded" | "Failed") => Some(NotEnrolled::Finished),
        _ => None,
    }
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else { return Vec::new() };
    let mut ips: Vec<IpAddr> = status.pod_ips.iter().flatten().filter_map(|p| p.ip.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    ips
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

type Reasons = BTreeMap<String, String>;

impl Builder {
    fn build(
        &mut self,
        namespaces: &BTreeMap<String, KubeNamespace>,
        pods: &BTreeMap<String, Pod>,
    ) -> (Mesh, Reasons, Reasons) {
        let mut mesh = Mesh::default();
        for ns in namespaces.values() {
            let name = ns.name_any();
            let labels = ns.labels().clone();
            mesh.namespaces.insert(name.clone(), Namespace { name, labels });
        }
        let (mut pending, mut skipped) = (Reasons::new(), Reasons::new());
        let announced = self.sandboxes.snapshot();
        // A pod announced by the CNI plugin may not have reached the watch yet.
        let early: BTreeMap<&String, &Pod> = announced
            .added
            .iter()
            .filter(|(uid, _)| !pods.contains_key(*uid))
            .filter_map(|(uid, s)| s.pod.as_ref().map(|p| (uid, p)))
            .collect();
        let mut candidates: Vec<(String, PodSpec)> = Vec::new();
        for (uid, pod) in pods.iter().chain(early) {
            let key = pod_key(pod);
            if announced.is_deleted(uid, &key) {
                skipped.insert(key, "sandbox deleted (CNI DEL)".into());
                continue;
            }
            if let Some(why) = never_captured(pod) {
                skipped.insert(key, why.to_string());
                continue;
            }
            let ips = match announced.sandbox(uid) {
                Some(s) if !s.ips.is_empty() => s.ips.clone(),
                _ => pod_ips(pod),
            };
            if ips.is_empty() {
                skipped.insert(key, "no IP yet".into());
                continue;
            }
            candidates.push((uid.clone(), pod_spec(pod, &self.node, ips)));
        }
        let enrolled: Vec<&str> = candidates
            .iter()
            .filter(|(uid, p)| announced.sandbox(uid).is_none() && self.rules.is_enrolled(&mesh, p))
            .map(|(u, _)| u.as_str())
            .collect();
        let mut found = self.netns.resolve(&enrolled);
        self.netns.retain(|uid| pods.contains_key(uid));
        for (uid, mut spec) in candidates {
            if let Some(s) = announced.sandbox(&uid) {
                spec.netns = s.netns.clone();
                mesh.pods.push(spec);
                continue;
            }
            match found.remove(&uid) {
                None => mesh.pods.push(spec),
                Some(Ok(path)) => {
                    spec.netns = path;
                    mesh.pods.push(spec);
                }
                Some(Err(e @ procfs::NetnsError::HostNetwork { .. })) => {
                    skipped.insert(spec.key(), e.to_string());
                }
                Some(Err(e)) => {
                    pending.insert(spec.key(), e.to_string());
                }
            }
        }
        // Two objects with one name (a pod replaced under the same name): the one whose
        // sandbox the runtime announced wins, else the first.
        let from_cni: BTreeSet<&PathBuf> = announced.added.values().map(|s| &s.netns).collect();
        mesh.pods.sort_by_key(|p| (p.key(), !from_cni.contains(&p.netns)));
        mesh.pods.dedup_by(|a, b| a.key() == b.key());
        (mesh, pending, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, extra: serde_json::Value) -> (String, Pod) {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": "demo", "uid": format!("uid-{name}"), "labels": {}},
            "spec": {"nodeName": "n1", "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.1.0.2"}, {"ip": "fd00:1::2"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        });
        merge(&mut v, extra);
        (format!("uid-{name}"), serde_json::from_value(v).expect("a pod"))
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn pods_become_the_mesh_the_node_enrols_from() {
        let ns: KubeNamespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}})).expect("ns");
        let namespaces = BTreeMap::from([("demo".to_string(), ns)]);
        let pods = BTreeMap::from([
            pod("plain", serde_json::json!({"spec": {"serviceAccountName": "web"}})),
            pod(
                "opted-out",
                serde_json::json!({"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}}),
            ),
            pod("hostnet", serde_json::json!({"spec": {"hostNetwork": true}})),
            pod(
                "sidecar",
                serde_json::json!({"metadata": {"annotations": {"sidecar.istio.io/status": "{}"}}}),
            ),
            pod("done", serde_json::json!({"status": {"phase": "Succeeded"}})),
            pod("noip", serde_json::json!({"status": {"podIPs": []}})),
            pod(
                "unready",
                serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
        ]);
        let proc = std::env::temp_dir().join(format!("ambit-kube-proc-{}", std::process::id()));
        std::fs::create_dir_all(&proc).expect("empty proc");
        let mut b = Builder {
            rules: Enrolment::default(),
            node: "n1".into(),
            netns: ProcNetns::new(&proc),
            sandboxes: Arc::new(Sandboxes::new(None)),
        };
        let (mesh, pending, skipped) = b.build(&namespaces, &pods);
        let names: Vec<&str> = mesh.pods.iter().map(|p| p.name.as_str()).collect();
        // The opted-out pod is listed (not enrolled, so no namespace needed); the enrolled
        // ones wait for a process.
        assert_eq!(names, ["opted-out"]);
        assert_eq!(pending.keys().collect::<Vec<_>>(), ["demo/plain", "demo/unready"]);
        assert!(pending["demo/plain"].contains("no process under"), "{pending:?}");
        let why = |p: &str| skipped.get(p).map(String::as_str);
        assert_eq!(why("demo/hostnet"), Some("host network"));
        assert_eq!(why("demo/sidecar"), Some("runs an Istio sidecar"));
        assert_eq!(why("demo/done"), Some("finished"));
        assert_eq!(why("demo/noip"), Some("no IP yet"));
        let opted = &mesh.pods[0];
        assert_eq!((opted.service_account.as_str(), opted.ips.len(), opted.healthy), ("default", 2, true));
        // With a process for them, the enrolled pods join with their namespace path.
        for (pid, uid) in [(7, "uid-plain"), (8, "uid-unready")] {
            let d = proc.join(pid.to_string());
            std::fs::create_dir_all(d.join("ns")).expect("dir");
            std::fs::write(d.join("cgroup"), format!("0::/kubepods/pod{uid}/c\n")).expect("cgroup");
            std::fs::write(d.join("ns/net"), "").expect("netns stand-in");
        }
        let (mesh, pending, _) = b.build(&namespaces, &pods);
        assert!(pending.is_empty(), "{pending:?}");
        let plain = mesh.pods.iter().find(|p| p.name == "plain").expect("plain");
        assert_eq!((plain.service_account.as_str(), plain.netns.clone()), ("web", proc.join("7/ns/net")));
        assert!(!mesh.pods.iter().find(|p| p.name == "unready").expect("unready").healthy);

        // Announced by the CNI plugin: enrolled from the sandbox before the watch has the pod
        // (and before its status has IPs); a deleted sandbox leaves its pod out.
        let (_, early) = pod("early", serde_json::json!({"status": {"phase": "Pending", "podIPs": []}}));
        let sandbox = |name: &str, pod: Option<Pod>| sandboxes::Sandbox {
            namespace: "demo".into(),
            name: name.into(),
            container_id: "c".into(),
            netns: PathBuf::from(format!("/var/run/netns/{name}")),
            ips: vec!["10.1.0.9".parse().expect("ip")],
            pod,
            seen: 0,
        };
        b.sandboxes.add("uid-early", sandbox("early", Some(early)));
        b.sandboxes.delete("uid-plain", "demo/plain");
        let (mesh, _, skipped) = b.build(&namespaces, &pods);
        let e = mesh.pods.iter().find(|p| p.name == "early").expect("the announced pod");
        assert_eq!(e.netns, PathBuf::from("/var/run/netns/early"));
        assert_eq!(e.ips, vec!["10.1.0.9".parse::<IpAddr>().expect("ip")]);
        assert!(mesh.pods.iter().all(|p| p.name != "plain"));
        assert_eq!(skipped.get("demo/plain").map(String::as_str), Some("sandbox deleted (CNI DEL)"));
        std::fs::remove_dir_all(&proc).expect("cleanup");
    }
}
