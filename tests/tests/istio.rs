//! ambit as ztunnel's drop-in under the real istiod and the real Kubernetes API server (both
//! built from their Go modules): every control-plane conversation in these tests is with the
//! real servers — pods enrolled by namespace label, certificates from istiod's CA through its
//! node authorizer, workloads, services and policies over istiod's xDS.

mod common;

use std::time::Duration;

use ambit::identity::{
    caclient::{CaClient, CaSettings},
    Identity,
};
use ambit_testbed::{
    apps::http_server,
    istio::{self, workload, Spec},
    istiod::{Istiod, SERVING_NAME},
    realkube::Kube,
    Ambit, Bed, Node,
};
use common::*;

const SLOW: Duration = Duration::from_secs(30);
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// Nodes n1 and n2 and the control plane's namespace `cp`, linked; the API server and
/// istiod in `cp`, ambit's manifests applied, Node objects.
fn nodes(bed: &Bed) -> (Node, Node, Node) {
    let (n1, n2, cp) = (bed.node("n1"), bed.node("n2"), bed.node("cp"));
    bed.link(&n1, &n2);
    bed.link(&cp, &n1);
    bed.link(&cp, &n2);
    (n1, n2, cp)
}

fn setup<'b>(kube: &Kube<'b>, n1: &Node, n2: &Node) {
    istio::apply_manifests(kube).expect("ambit's manifests apply server-side");
    for n in [n1, n2] {
        istio::node_object(kube, n).expect("node object");
    }
}

/// A Ready pod of namespace `demo`.
fn spec<'a>(sa: &'a str, labels: &'a [(&'a str, &'a str)]) -> Spec<'a> {
    Spec { namespace: "demo", service_account: sa, labels, ready: true }
}

fn enrolled(p: &Ambit) -> Vec<String> {
    let mut names: Vec<String> = p.config_dump()["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

fn annotation(kube: &Kube<'_>, pod: &str) -> String {
    kube.get("pod", "demo", pod, "{.metadata.annotations.ambient\\.istio\\.io/redirection}")
        .unwrap_or_default()
}

/// Runs `f` on a thread inside `node`'s network namespace (its sockets are the node's).
fn in_netns<R: Send + 'static>(node: &Node, f: impl FnOnce() -> R + Send + 'static) -> R {
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
fn served(p: &Ambit, pod: &str) -> Option<serde_json::Value> {
    p.config_dump()["mesh"]["workloads"].as_array().into_iter().flatten().find(|w| w["name"] == pod).cloned()
}

#[test]
fn a_labelled_namespace_is_enrolled_annotated_and_tunnelled_with_istiod_s_identities() {
    let bed = Bed::new("istio-enrol");
    let (n1, n2, cp) = nodes(&bed);
    let kube = Kube::start(&bed, &cp);
    setup(&kube, &n1, &n2);
    let istiod = Istiod::start(&kube, &istio::trusted_account());
    istio::namespace(&kube, "demo", &[]).expect("namespace");
    let (a, b) = (bed.pod(&n1, "a"), bed.pod(&n2, "b"));
    let _wa = workload(&bed, &kube, &n1, &a, &spec("client", &[("app", "client")])).expect("a");
    let _wb = workload(&bed, &kube, &n2, &b, &spec("server", &[("app", "web")])).expect("b");
    let _http = http_server(&bed, &b, "b\n");
    let p1 = istio::start_ambit(&bed, &kube, &istiod, &n1, &[]).expect("ambit on n1");
    let p2 = istio::start_ambit(&bed, &kube, &istiod, &n2, &[]).expect("ambit on n2");
    let url = format!("http://{}:8080/", b.ipv4);

    // Not labelled: nothing enrolled, no annotation, plaintext straight through.
    assert!(enrolled(&p1).is_empty() && enrolled(&p2).is_empty());
    assert_eq!(ok_body(&curl(&a, &url)), "b\n");
    assert_eq!(annotation(&kube, "a"), "");

    kube.kubectl(&["label", "namespace", "demo", "istio.io/dataplane-mode=ambient"]).expect("label");
    assert!(eventually(SLOW, || enrolled(&p1) == ["a"] && enrolled(&p2) == ["b"]), "{}", p1.log());
    // ambit writes the annotation istio-cni writes; istiod then serves the pods with HBONE.
    assert!(eventually(SLOW, || annotation(&kube, "a") == "enabled" && annotation(&kube, "b") == "enabled"));
    assert!(
        eventually(SLOW, || served(&p1, "b").is_some_and(|w| w["tunnel"] == "hbone")),
        "istiod never served b with HBONE: {:?}",
        served(&p1, "b")
    );
    assert_eq!(ok_body(&curl(&a, &url)), "b\n");
    assert!(
        eventually(T, || access_lines(&p1, &["direction=outbound", "security=mutual_tls", CLIENT, SERVER])
            == 1),
        "{}",
        p1.log()
    );
    assert!(eventually(T, || access_lines(
        &p2,
        &["direction=inbound", "security=mutual_tls", CLIENT, SERVER]
    ) == 1));

    // istiod's node authorizer: n1's token gets a's identity, not b's (b runs on n2). Asked
    // from n1's namespace, as its proxy asks.
    let settings = CaSettings {
        address: istiod.address.clone(),
        server_name: SERVING_NAME.into(),
        root_cert: istiod.root_cert.clone(),
        token_file: bed.dir().join("ambit-n1/istio-token"),
        timeout: Duration::from_secs(10),
        cluster_id: "Kubernetes".into(),
    };
    let (own, other) = in_netns(&n1, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let ca = CaClient::new(&settings).expect("CA client");
            let id = |sa: &str| Identity::new("cluster.local", "demo", sa);
            let own = ca.sign(&id("client"), Duration::from_secs(3600)).await.map(|_| ());
            let other = ca.sign(&id("server"), Duration::from_secs(3600)).await.map(|_| ());
            (own.map_err(|e| e.to_string()), other.map_err(|e| e.to_string()))
        })
    });
    own.expect("n1 may have a's identity");
    let refused = other.expect_err("istiod signed b's identity for n1");
    assert!(refused.contains("PermissionDenied") || refused.contains("Unauthenticated"), "{refused}");

    // Unlabelled: unenrolled, the annotation removed.
    kube.kubectl(&["label", "namespace", "demo", "istio.io/dataplane-mode-"]).expect("unlabel");
    assert!(eventually(SLOW, || enrolled(&p1).is_empty() && enrolled(&p2).is_empty()));
    assert!(eventually(SLOW, || annotation(&kube, "a").is_empty() && annotation(&kube, "b").is_empty()));
    assert!(eventually(SLOW, || curl(&a, &url).status.success()));
}
