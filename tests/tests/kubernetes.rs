//! `ambit node --pod-source kubernetes` against the real Kubernetes API server (built from
//! k8s.io/kubernetes), with real pod network namespaces found from `/proc` by pod UID, real
//! capture and real HBONE tunnels; and, for the faults a real server cannot produce on
//! demand (a watch the server ends, `410 Gone`), against the bed's scripted API (`kubeapi`).

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ambit_testbed::{
    ambit::write_mesh,
    controlplane::ControlPlane,
    istio,
    kubeapi::{pod_object, sandbox, sandbox_in, CgroupDriver, KubeApi, PodObject},
    mesh::{Mesh, AMBIENT, OPT_OUT},
    realkube::Kube,
    Ambit, Bed, Node, Pod,
};
use common::{istio::enrolled, *};

const API_PORT: u16 = 6443;
/// Long enough for the watcher's backoff (0.8 s doubling) after an outage of a few seconds.
const RECOVERY: Duration = Duration::from_secs(15);

/// A pod's UID, shaped like a real one and unique to the bed (run id and pod name), so no
/// other run's cgroups match it.
fn uid(bed: &Bed, pod: &str) -> String {
    let h = |s: &str| s.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)));
    format!("{:08x}-0000-4000-8000-{:012x}", h(bed.id()) & 0xffff_ffff, h(pod) & 0xffff_ffff_ffff)
}

fn object(
    bed: &Bed,
    pod: &Pod,
    namespace: &str,
    sa: &str,
    labels: Vec<(&'static str, &'static str)>,
) -> serde_json::Value {
    pod_object(&PodObject {
        name: &pod.name,
        namespace,
        uid: &uid(bed, &pod.name),
        node: &pod.node,
        service_account: sa,
        ips: vec![pod.ipv4.to_string(), pod.ipv6.to_string()],
        labels,
        host_network: false,
        ready: true,
    })
}

fn pod_source(p: &Ambit) -> serde_json::Value {
    p.config_dump()["pod_source"].clone()
}

fn start_node<'b>(bed: &'b Bed, node: &Node, kubeconfig: &Path, extra: &[String]) -> Ambit<'b> {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Ambit::start_with(bed, node, &PathBuf::new(), Ambit::kube_args(bed, node, kubeconfig, &extra))
}

/// A pod object in the real API server (`h`: host network), Ready, with its status set as
/// a kubelet would; returns its UID (the server's).
fn real_pod(
    kube: &Kube<'_>,
    node: &Node,
    pod: &Pod,
    sa: &str,
    labels: &[(&str, &str)],
    host: bool,
) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: demo\n  labels:\n    bed: \"yes\"\n",
        pod.name
    );
    for (k, v) in labels {
        yaml.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    yaml.push_str(&format!(
        "spec:\n  nodeName: {}\n  serviceAccountName: {sa}\n  hostNetwork: {host}\n  containers:\n  - name: app\n    image: app\n",
        node.name
    ));
    kube.apply(&yaml).expect("pod object");
    let ips = if host { vec![node.bridge_ipv4()] } else { vec![pod.ipv4, pod.ipv6] };
    kube.set_pod_status("demo", &pod.name, node.bridge_ipv4(), &ips, true).expect("pod status");
    kube.get("pod", "demo", &pod.name, "{.metadata.uid}").expect("uid")
}

fn label_pod(kube: &Kube<'_>, pod: &str, label: &str) {
    kube.kubectl(&["label", "--overwrite", "pod", pod, "-n", "demo", label]).expect("label");
}

fn delete_pod(kube: &Kube<'_>, pod: &str) {
    kube.kubectl(&["delete", "pod", pod, "-n", "demo", "--grace-period=0", "--force"]).expect("delete");
}

/// Against the real API server (built from k8s.io/kubernetes): pods are its objects, with
/// the UIDs it assigns, found under /proc in both cgroup spellings.
#[test]
fn namespace_labels_in_the_api_enrol_pods_and_a_restart_reconciles_without_leaks() {
    let bed = Bed::new("kube-enrol");
    let (n1, n2, cp) = (bed.node("n1"), bed.node("n2"), bed.node("cp"));
    bed.link(&n1, &n2);
    bed.link(&cp, &n1);
    bed.link(&cp, &n2);
    let (a, o, late) = (bed.pod(&n1, "a"), bed.pod(&n1, "o"), bed.pod(&n1, "late"));
    let b = bed.pod(&n2, "b");
    let _http = http_server(&bed, &b, "b\n");

    // The cluster: the API server's objects, and what the control plane (istiod's role)
    // knows.
    let kube = Kube::start(&bed, &cp);
    let kubeconfig = kube.admin.clone();
    istio::namespace(&kube, "demo", &[]).expect("demo");
    istio::namespace(&kube, "kube-system", &[]).expect("kube-system");
    let ua = real_pod(&kube, &n1, &a, "client", &[("app", "client")], false);
    let uo = real_pod(&kube, &n1, &o, "other", &[], false);
    let ub = real_pod(&kube, &n2, &b, "server", &[("app", "web")], false);
    // A host-network pod: its process lives in the node's own namespace.
    let h = ambit_testbed::Pod { name: "h".into(), ..a.clone() };
    let uh = real_pod(&kube, &n1, &h, "default", &[], true);
    let _sandboxes = [
        sandbox(&bed, &a, &ua, CgroupDriver::Cgroupfs),
        sandbox(&bed, &o, &uo, CgroupDriver::Systemd),
        sandbox(&bed, &b, &ub, CgroupDriver::Systemd),
        sandbox_in(&bed, "h", &n1.netns_path(), &uh, CgroupDriver::Cgroupfs),
    ];
    let mesh_path = bed.dir().join("mesh.yaml");
    let cluster = |labels: &[(&str, &str)]| {
        Mesh::default()
            .namespace("demo", labels)
            .pod_with_sa(&a, "demo", &[], "client")
            .pod_with_sa(&o, "demo", &[], "other")
            .pod_with_sa(&late, "demo", &[], "late")
            .pod_with_sa(&b, "demo", &[], "server")
    };
    write_mesh(&mesh_path, &cluster(&[]).yaml());
    let cp = ControlPlane::start(&bed, &cp, &mesh_path, &[&n1, &n2], &[]);
    let p1 = start_node(&bed, &n1, &kubeconfig, &cp.node_args(&n1));
    let p2 = start_node(&bed, &n2, &kubeconfig, &cp.node_args(&n2));
    let url_b = format!("http://{}:8080/", b.ipv4);

    // Not labelled: nothing enrolled, a reaches b directly.
    assert_eq!(ok_body(&curl(&a, &url_b)), "b\n");
    assert!(enrolled(&p1).is_empty() && enrolled(&p2).is_empty());
    let src = pod_source(&p1);
    assert_eq!(src["synced"], true, "{src}");
    assert_eq!(src["skipped"]["demo/h"], "host network", "{src}");

    // Label the namespace: a and o on n1, b on n2; traffic a → b is captured and tunnelled.
    write_mesh(&mesh_path, &cluster(&[AMBIENT]).yaml());
    istio::namespace(&kube, "demo", &[AMBIENT]).expect("label");
    assert!(eventually(T, || enrolled(&p1) == ["a", "o"] && enrolled(&p2) == ["b"]), "{}", p1.log());
    assert!(eventually(T, || p1.readiness().is_ok_and(|(s, _)| s == 200)), "n1 ready again");
    // Ready says n1's own pods have certificates; that b is in the mesh reaches n1 from the
    // control plane (its mesh file was rewritten above), on its own time.
    let b_in_mesh = |p: &Ambit| {
        p.config_dump()["mesh"]["workloads"]
            .as_array()
            .is_some_and(|ws| ws.iter().any(|w| w["name"] == "b" && w["tunnel"] == "hbone"))
    };
    assert!(eventually(T, || b_in_mesh(&p1)), "{}", p1.log());
    assert_eq!(ok_body(&curl(&a, &url_b)), "b\n");
    let tunnelled = [
        "direction=outbound",
        "security=mutual_tls",
        "dst_identity=spiffe://cluster.local/ns/demo/sa/server",
    ];
    assert!(eventually(T, || access_lines(&p1, &tunnelled) >= 1), "{}", p1.log());
    let inbound =
        ["direction=inbound", "security=mutual_tls", "src_identity=spiffe://cluster.local/ns/demo/sa/client"];
    assert!(eventually(T, || access_lines(&p2, &inbound) >= 1), "{}", p2.log());
    // The host-network pod in the labelled namespace is still never captured.
    assert!(!enrolled(&p1).contains(&"h".to_string()));

    // A pod whose containers have not started: left out with the reason, enrolled once
    // a process of it exists.
    let ul = real_pod(&kube, &n1, &late, "late", &[], false);
    assert!(
        eventually(T, || pod_source(&p1)["pending"]["demo/late"]
            .as_str()
            .is_some_and(|r| r.contains("no process"))),
        "{}",
        pod_source(&p1)
    );
    let _late_sandbox = sandbox(&bed, &late, &ul, CgroupDriver::Cgroupfs);
    assert!(eventually(T, || enrolled(&p1) == ["a", "late", "o"]), "{}", p1.log());

    // The opt-out label on a pod.
    label_pod(&kube, "o", "istio.io/dataplane-mode=none");
    assert!(eventually(T, || enrolled(&p1) == ["a", "late"]), "{}", p1.log());

    // Deleting a pod removes its map entries and listeners.
    let before = kernel_state(&p1);
    let per_pod = before.3 / 2;
    assert_eq!(
        (before.0, before.1, before.2),
        (2, 4, 2),
        "two pods: 2 netns cookies, 4 addresses, 2 tc links"
    );
    assert!(per_pod >= 4 && before.3 == 2 * per_pod, "{before:?}");
    let one_pod = (1, 2, 1, per_pod);
    delete_pod(&kube, "late");
    assert!(eventually(T, || enrolled(&p1) == ["a"]), "{}", p1.log());
    assert!(eventually(T, || kernel_state(&p1) == one_pod), "{:?}", kernel_state(&p1));

    // Restart with changes while no proxy ran: o opts back in, a is deleted. The new proxy
    // reconciles with the complete list before anything else: a's state goes, o's comes.
    let mut p1 = p1;
    p1.kill();
    label_pod(&kube, "o", "istio.io/dataplane-mode-");
    delete_pod(&kube, "a");
    p1.restart();
    assert_eq!(enrolled(&p1), ["o"]);
    assert_eq!(kernel_state(&p1), one_pod, "nothing of a is left, o is complete");
    // And a restart without changes re-adopts exactly the same state.
    p1.restart();
    assert_eq!(enrolled(&p1), ["o"]);
    assert_eq!(kernel_state(&p1), one_pod);

    // Removing the label unenrols b on n2.
    istio::namespace(&kube, "demo", &[]).expect("unlabel");
    assert!(eventually(T, || enrolled(&p2).is_empty()), "{}", p2.log());
    assert_eq!(kernel_state(&p2), (0, 0, 0, 0));
}

/// The faults the real API server cannot produce on demand stay with the scripted one
/// (`kubeapi`): a watch that the server ends, and `410 Gone` after compacted history.
#[test]
fn the_api_going_away_and_coming_back_is_handled_with_relist_and_backoff() {
    let bed = Bed::new("kube-faults");
    let (n1, api_node) = (bed.node("n1"), bed.node("api"));
    bed.link(&api_node, &n1);
    let (a, b) = (bed.pod(&n1, "a"), bed.pod(&n1, "b"));
    let _sandboxes = [
        sandbox(&bed, &a, &uid(&bed, "a"), CgroupDriver::Systemd),
        sandbox(&bed, &b, &uid(&bed, "b"), CgroupDriver::Cgroupfs),
    ];
    let _http = http_server(&bed, &b, "b\n");
    let api = KubeApi::start(
        &api_node.netns_path(),
        format!("{}:{API_PORT}", api_node.bridge_ipv4()).parse().expect("addr"),
    )
    .expect("the mock API starts");
    api.namespace("demo", &[AMBIENT]);
    api.pod(object(&bed, &a, "demo", "default", vec![]));
    api.pod(object(&bed, &b, "demo", "default", vec![]));
    let p = start_node(&bed, &n1, &api.kubeconfig(bed.dir()), &[]);
    assert_eq!(enrolled(&p), ["a", "b"]);
    let lists = |what: &str| pod_source(&p)["lists"][what].as_u64().unwrap_or(0);
    let list_requests = |what: &str| api.requests().iter().filter(|r| r.resource == what && !r.watch).count();
    let watch_requests = |what: &str| api.requests().iter().filter(|r| r.resource == what && r.watch).count();
    assert_eq!((lists("pods"), lists("namespaces")), (1, 1));
    let url_b = format!("http://{}:8080/", b.ipv4);
    let captured = || counter(&p, "ambit_proxy_connections_opened_total", "outbound", "demo", "a");

    // A watch that ends: watched again from the last version, no relist, nothing missed.
    let (pod_lists, pod_watches) = (list_requests("pods"), watch_requests("pods"));
    api.end_watches();
    api.pod(object(&bed, &b, "demo", "default", vec![OPT_OUT]));
    assert!(eventually(RECOVERY, || enrolled(&p) == ["a"]), "{}", p.log());
    assert!(watch_requests("pods") > pod_watches, "the pod watch was not restarted");
    assert_eq!(list_requests("pods"), pod_lists, "an ended watch must not cost a relist");

    // 410 Gone: the history is compacted, the client must list again.
    api.expire();
    api.pod(object(&bed, &b, "demo", "default", vec![]));
    assert!(eventually(RECOVERY, || enrolled(&p) == ["a", "b"]), "{}", p.log());
    assert!(eventually(T, || lists("pods") == 2 && lists("namespaces") == 2), "{}", pod_source(&p));
    assert!(list_requests("pods") > pod_lists, "410 must cause a relist");

    // The API goes away: the proxy keeps its last view and keeps capturing, retries with
    // growing pauses, and applies what changed meanwhile when the API returns.
    let errors_before = pod_source(&p)["errors"].as_u64().unwrap_or(0);
    api.down();
    let down_at = Instant::now();
    api.pod(object(&bed, &b, "demo", "default", vec![OPT_OUT]));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(enrolled(&p), ["a", "b"], "the last view stays in force while the API is away");
    assert_eq!(p.readiness().expect("readiness").0, 200);
    let n = captured();
    assert_eq!(ok_body(&curl(&a, &url_b)), "b\n");
    assert_eq!(captured(), n + 1, "capture keeps working without the API");
    let errors = pod_source(&p)["errors"].as_u64().unwrap_or(0) - errors_before;
    // Two watchers; with 0.8 s doubling (±jitter) about 3 attempts each in 5 s. A client
    // retrying without backoff would make hundreds.
    assert!((2..=16).contains(&errors), "{errors} API errors in 5 s of outage:\n{}", p.log());
    assert!(p.log().contains("Kubernetes API error; retrying with backoff"), "{}", p.log());
    api.up();
    assert!(
        eventually(RECOVERY, || enrolled(&p) == ["a"]),
        "change made during the outage not applied:\n{}",
        p.log()
    );
    println!(
        "API outage of {:?}: change applied {:?} after the API returned",
        Duration::from_secs(5),
        down_at.elapsed() - Duration::from_secs(5)
    );
    // Still one pod source, synced, and watching again.
    assert!(eventually(T, || api.open_watches() == 2), "{} watches open", api.open_watches());
}
