//! Helpers of the tests against the real istiod and API server.

use std::time::Duration;

use super::{access_lines, eventually, T};

use ambit_testbed::{
    istio::{self, Spec},
    realkube::Kube,
    Ambit, Bed, Node,
};

pub const SLOW: Duration = Duration::from_secs(30);
pub const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
pub const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// Nodes n1 and n2 and the control plane's namespace `cp`, linked; the API server and
/// istiod in `cp`, ambit's manifests applied, Node objects.
pub fn nodes(bed: &Bed) -> (Node, Node, Node) {
    let (n1, n2, cp) = (bed.node("n1"), bed.node("n2"), bed.node("cp"));
    bed.link(&n1, &n2);
    bed.link(&cp, &n1);
    bed.link(&cp, &n2);
    (n1, n2, cp)
}

pub fn setup<'b>(kube: &Kube<'b>, n1: &Node, n2: &Node) {
    istio::apply_manifests(kube).expect("ambit's manifests apply server-side");
    for n in [n1, n2] {
        istio::node_object(kube, n).expect("node object");
    }
}

/// A Ready pod of namespace `demo`.
pub fn spec<'a>(sa: &'a str, labels: &'a [(&'a str, &'a str)]) -> Spec<'a> {
    Spec { namespace: "demo", service_account: sa, labels, ready: true }
}

pub fn enrolled(p: &Ambit) -> Vec<String> {
    let mut names: Vec<String> = p.config_dump()["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

pub fn annotation(kube: &Kube<'_>, pod: &str) -> String {
    kube.get("pod", "demo", pod, "{.metadata.annotations.ambient\\.istio\\.io/redirection}")
        .unwrap_or_default()
}

/// Runs `f` on a thread inside `node`'s network namespace (its sockets are the node's).
pub fn in_netns<R: Send + 'static>(node: &Node, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = node.netns_path();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("the thread in the node's namespace")
}

/// The workload istiod serves for a pod, as the proxy holds it.
pub fn served(p: &Ambit, pod: &str) -> Option<serde_json::Value> {
    p.config_dump()["mesh"]["workloads"].as_array().into_iter().flatten().find(|w| w["name"] == pod).cloned()
}

/// Both proxies logged exactly one mutual-TLS connection from the client's identity to the
/// server's: `from` as outbound, `to` as inbound.
pub fn tunnelled_once(from: &Ambit, to: &Ambit) {
    assert!(
        eventually(T, || access_lines(from, &["direction=outbound", "security=mutual_tls", CLIENT, SERVER])
            == 1),
        "{}",
        from.log()
    );
    assert!(
        eventually(T, || access_lines(to, &["direction=inbound", "security=mutual_tls", CLIENT, SERVER])
            == 1),
        "{}",
        to.log()
    );
}
