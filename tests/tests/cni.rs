//! `ambit-cni`, chained after the reference CNI plugins (`bridge`, `host-local`, `loopback`,
//! built from their Go module) and run through libcni (`cnitool`) as a container runtime
//! runs a pod sandbox's network setup, with the pods in the real API server (and, for the
//! first test, the real istiod): pods captured from their first packet, failing closed when
//! the node proxy is away, and leaving nothing behind.

mod common;

use std::path::Path;

use ambit_testbed::{
    ambit::pinned_map_len,
    cni::{result_ips, PodRef, Runtime},
    exec::{in_cgroup_and_netns, workspace_bin},
    istio::{self, workload},
    istiod::Istiod,
    realkube::Kube,
    run_with_timeout, Ambit, Bed, Node,
};
use common::{istio::*, *};

/// The pod's Pod object as the scheduler leaves it (bound to `node`, no status yet).
fn pod_object(kube: &Kube<'_>, namespace: &str, name: &str, sa: &str, node: &Node) -> String {
    kube.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {namespace}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  nodeName: {}\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    image: app\n",
        node.name
    ))
    .expect("pod object");
    kube.get("pod", namespace, name, "{.metadata.uid}").expect("uid")
}

fn socket(bed: &Bed, node: &Node) -> std::path::PathBuf {
    bed.dir().join(format!("ambit-{}", node.name)).join("cni.sock")
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The API server (no istiod), the `demo` namespace labelled for ambient, n1's CNI
/// directories with the primary conflist, and where n1's node proxy puts its socket.
struct Cluster<'b> {
    n1: Node,
    kube: Kube<'b>,
    rt: Runtime<'b>,
    sock: std::path::PathBuf,
}

fn cluster(bed: &Bed) -> Cluster<'_> {
    let (n1, n2, cp) = nodes(bed);
    let kube = Kube::start(bed, &cp);
    setup(&kube, &n1, &n2);
    istio::namespace(&kube, "demo", &[("istio.io/dataplane-mode", "ambient")]).expect("demo");
    let rt = Runtime::new(bed, &n1);
    let sock = socket(bed, &n1);
    Cluster { n1, kube, rt, sock }
}

#[test]
fn the_first_connection_of_a_new_pod_goes_through_the_mesh() {
    let bed = Bed::new("cni-first");
    let (n1, n2, cp) = nodes(&bed);
    let kube = Kube::start(&bed, &cp);
    setup(&kube, &n1, &n2);
    let istiod = Istiod::start(&kube, &istio::trusted_account());
    istio::namespace(&kube, "demo", &[("istio.io/dataplane-mode", "ambient")]).expect("demo");
    // Only mutual TLS reaches b: a connection that escaped capture is refused.
    kube.apply("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: demo\nspec:\n  mtls:\n    mode: STRICT\n")
        .expect("STRICT");
    let b = bed.pod(&n2, "b");
    let _wb = workload(&bed, &kube, &n2, &b, &spec("server", &[("app", "web")])).expect("b");
    let _http = http_server(&bed, &b, "b\n");
    let rt = Runtime::new(&bed, &n1);
    let sock = socket(&bed, &n1);
    let p1 =
        istio::start_ambit(&bed, &kube, &istiod, &n1, &refs(&rt.node_flags(&sock))).expect("ambit on n1");
    let p2 = istio::start_ambit(&bed, &kube, &istiod, &n2, &[]).expect("ambit on n2");
    assert!(eventually(SLOW, || served(&p1, "b").is_some_and(|w| w["tunnel"] == "hbone")));
    let primary = std::fs::read_to_string(rt.primary()).expect("conflist");
    assert!(primary.contains("\"ambit-cni\""), "ambit-cni is not chained:\n{primary}");
    assert!(rt.bin_dir.join("ambit-cni").exists());

    // The scheduler binds the pod; the runtime creates its sandbox and runs the CNI chain.
    let uid = pod_object(&kube, "demo", "a", "client", &n1);
    let netns = rt.sandbox("a");
    let pod = PodRef { namespace: "demo", name: "a", uid: &uid };
    let result = rt.add(&netns, &pod).unwrap_or_else(|e| panic!("ADD: {e}\n{}", p1.log()));
    let ips = result_ips(&result);
    assert!(ips.iter().any(|ip| ip.is_ipv4()) && ips.iter().any(|ip| ip.is_ipv6()), "{result}");
    // The application starts, and its very first act is a connection to b: no status has
    // been written, nothing found under /proc yet.
    let cgroup = bed.cgroup_dir("pod-a");
    let netns_path = Path::new("/var/run/netns").join(&netns);
    let url = format!("http://{}:8080/", b.ipv4);
    let first = run_with_timeout(
        in_cgroup_and_netns(&cgroup, &netns_path, &["curl", "-sS", "--max-time", "10", &url]),
        T,
    )
    .expect("curl runs");
    assert_eq!(ok_body(&first), "b\n", "the first connection did not go through the mesh:\n{}", p1.log());
    tunnelled_once(&p1, &p2);

    // The kubelet reports the addresses; the pod stays enrolled in its sandbox, is
    // annotated for istiod, and CHECK holds.
    kube.set_pod_status("demo", "a", n1.bridge_ipv4(), &ips, true).expect("status");
    assert!(eventually(SLOW, || annotation(&kube, "a") == "enabled"));
    assert_eq!(enrolled(&p1), ["a"]);
    assert_eq!(p1.config_dump()["pods"][0]["netns"], netns_path.display().to_string());
    rt.check_pod(&netns, &pod).unwrap_or_else(|e| panic!("CHECK: {e}"));
    rt.del(&netns, &pod).expect("DEL");
    assert!(eventually(T, || enrolled(&p1).is_empty()));
    assert!(rt.leased().is_empty(), "leases left: {:?}", rt.leased());
}

/// Pinned map entries and tc links of a proxy that may not be running.
fn pinned(p: &Ambit) -> (usize, usize, usize) {
    let pins = p.pin_dir();
    (
        pinned_map_len(&pins.join("AMBIT_ENROLLED")).expect("enrolled map"),
        pinned_map_len(&pins.join("AMBIT_POD_IPS")).expect("pod ips map"),
        std::fs::read_dir(pins.join("tc")).map(|d| d.count()).unwrap_or(0),
    )
}

#[test]
fn with_the_node_proxy_away_an_enrolled_pod_does_not_start_until_it_is_back() {
    let bed = Bed::new("cni-closed");
    let Cluster { n1, kube, rt, sock } = cluster(&bed);
    istio::namespace(&kube, "plain", &[]).expect("plain");
    let mut p1 =
        istio::start_ambit_alone(&bed, &kube, &n1, &refs(&rt.node_flags(&sock))).expect("ambit on n1");
    let before = pinned(&p1);
    let ports = rt.bridge_ports();
    p1.kill();

    let uid = pod_object(&kube, "demo", "a", "client", &n1);
    let pod = PodRef { namespace: "demo", name: "a", uid: &uid };
    let netns = rt.sandbox("a");
    let refused = rt.add(&netns, &pod).expect_err("an enrolled pod started without its node proxy");
    let msg = refused.to_string();
    assert!(
        msg.contains("must be captured before it starts")
            && msg.contains("fail closed")
            && msg.contains("not reachable"),
        "{msg}"
    );
    // The runtime tears the failed sandbox down, as it does after a failed ADD.
    rt.del(&netns, &pod).expect("DEL always succeeds");
    assert!(rt.leased().is_empty(), "address still leased: {:?}", rt.leased());
    assert_eq!(rt.bridge_ports(), ports, "a veth of the pod is left on the bridge");
    let eth0 = ambit_testbed::bed::sh(&["ip", "-n", &netns, "link", "show", "eth0"]);
    assert!(eth0.is_err(), "eth0 left in the sandbox: {eth0:?}");
    assert_eq!(pinned(&p1), before, "capture state was set up for the pod");

    // A pod that is not to be captured starts as it would without ambit.
    let plain_uid = pod_object(&kube, "plain", "c", "default", &n1);
    let plain = PodRef { namespace: "plain", name: "c", uid: &plain_uid };
    let plain_netns = rt.sandbox("c");
    rt.add(&plain_netns, &plain).unwrap_or_else(|e| panic!("a pod outside the mesh was refused: {e}"));
    rt.del(&plain_netns, &plain).expect("DEL");

    // The node proxy is back: the kubelet's retry succeeds, and the pod is captured.
    p1.restart();
    let result = rt.add(&netns, &pod).unwrap_or_else(|e| panic!("retried ADD: {e}\n{}", p1.log()));
    assert!(!result_ips(&result).is_empty());
    assert_eq!(enrolled(&p1), ["a"]);
    assert_eq!(pinned(&p1).0, before.0 + 1);
    rt.del(&netns, &pod).expect("DEL");
    assert!(eventually(T, || enrolled(&p1).is_empty()));
    assert_eq!(pinned(&p1), before);
}

#[test]
fn repeated_add_and_del_leave_nothing_behind_and_hostile_calls_are_refused() {
    let bed = Bed::new("cni-repeat");
    let Cluster { n1, kube, rt, sock } = cluster(&bed);
    let p1 = istio::start_ambit_alone(&bed, &kube, &n1, &refs(&rt.node_flags(&sock))).expect("ambit on n1");
    let uid = pod_object(&kube, "demo", "a", "client", &n1);
    let pod = PodRef { namespace: "demo", name: "a", uid: &uid };
    let baseline = (kernel_state(&p1), rt.bridge_ports(), pin_files(&p1));
    let mut enrolled_state = None;
    for round in 0..3 {
        let netns = rt.sandbox(&format!("a{round}"));
        let result = rt.add(&netns, &pod).unwrap_or_else(|e| panic!("ADD round {round}: {e}\n{}", p1.log()));
        assert_eq!(enrolled(&p1), ["a"]);
        let now = kernel_state(&p1);
        assert_eq!(*enrolled_state.get_or_insert(now), now, "round {round}");
        // A repeated ADD (the runtime retrying ambit-cni's step) is answered the same, and
        // changes nothing.
        let again =
            rt.readd_ambit(&netns, &pod, &result).unwrap_or_else(|e| panic!("re-ADD round {round}: {e}"));
        assert_eq!(result_ips(&again), result_ips(&result));
        assert_eq!(enrolled(&p1), ["a"]);
        assert_eq!(kernel_state(&p1), now, "round {round}");
        for _ in 0..2 {
            rt.del(&netns, &pod).unwrap_or_else(|e| panic!("DEL round {round}: {e}"));
            assert!(enrolled(&p1).is_empty(), "round {round}");
            assert_eq!((kernel_state(&p1), rt.bridge_ports(), pin_files(&p1)), baseline, "round {round}");
        }
        assert!(rt.leased().is_empty(), "round {round}: {:?}", rt.leased());
        assert_eq!(p1.config_dump()["pod_source"]["cni_sandboxes"], serde_json::json!({}));
        bed.delete_netns(&netns);
    }
    let enrolled_state = enrolled_state.expect("enrolled at least once");
    assert_eq!(enrolled_state.0, baseline.0 .0 + 1, "one pod's netns enrolled");

    // The socket is root's: another user cannot hand the node a sandbox.
    let py = format!(
        "import socket\ns=socket.socket(socket.AF_UNIX)\ntry:\n  s.connect({:?})\n  print('connected')\nexcept PermissionError:\n  print('refused')\n",
        sock.display().to_string()
    );
    let out = run_with_timeout(
        {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", &py]);
            c
        },
        T,
    )
    .expect("python runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "refused", "{out:?}");
    // Garbage, and a sandbox that is the node itself, are refused; the node keeps serving.
    let call = |line: &str| -> serde_json::Value {
        in_netns(&n1, {
            let (sock, line) = (sock.clone(), line.to_string());
            move || {
                use std::io::{BufRead, Write};
                let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
                s.write_all(line.as_bytes()).expect("write");
                let mut answer = String::new();
                std::io::BufReader::new(s).read_line(&mut answer).expect("read");
                serde_json::from_str(&answer).expect("a JSON answer")
            }
        })
    };
    let garbage = call("{\"command\": \"ADD\", \"netns\": 7\n");
    assert_eq!(garbage["outcome"], "failed", "{garbage}");
    let node_itself = call(&format!(
        "{{\"command\":\"ADD\",\"namespace\":\"demo\",\"name\":\"a\",\"uid\":\"{uid}\",\"netns\":\"{}\",\"ips\":[\"10.1.0.150\"]}}\n",
        n1.netns_path().display()
    ));
    assert_eq!(node_itself["outcome"], "failed", "{node_itself}");
    assert!(
        node_itself["reason"].as_str().is_some_and(|r| r.contains("the node's own network namespace")),
        "{node_itself}"
    );
    assert_eq!((kernel_state(&p1), rt.bridge_ports(), pin_files(&p1)), baseline);
    let status = call("{\"command\":\"STATUS\"}\n");
    assert_eq!(status["outcome"], "ok", "{status}");
}

/// Files pinned under the proxy's instance.
fn pin_files(p: &Ambit) -> usize {
    fn count(d: &Path) -> usize {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 })
            .sum()
    }
    count(&p.pin_dir())
}

#[test]
fn a_rewritten_conflist_is_repaired_and_uninstall_restores_the_original() {
    let bed = Bed::new("cni-install");
    let Cluster { n1, kube, rt, sock } = cluster(&bed);
    let original = std::fs::read_to_string(rt.primary()).expect("conflist");
    let mut p1 =
        istio::start_ambit_alone(&bed, &kube, &n1, &refs(&rt.node_flags(&sock))).expect("ambit on n1");
    let chained = || std::fs::read_to_string(rt.primary()).is_ok_and(|c| c.contains("\"ambit-cni\""));
    assert!(chained());
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rt.primary()).expect("read")).expect("json");
    let types: Vec<&str> =
        conf["plugins"].as_array().expect("plugins").iter().filter_map(|p| p["type"].as_str()).collect();
    assert_eq!(types, ["bridge", "ambit-cni"], "chained after the primary plugin");
    assert!(
        std::fs::read_to_string(rt.conf_dir.join("ambit-cni.kubeconfig")).is_ok_and(|k| k.contains("token:"))
    );

    // The primary CNI rewrites its file (as Cilium does on restart), without ambit-cni.
    let rewritten = original.replace("\"isGateway\": false,", "\"isGateway\": false,\n      \"mtu\": 1400,");
    assert_ne!(rewritten, original);
    let tmp = rt.conf_dir.join(".rewrite");
    std::fs::write(&tmp, &rewritten).expect("write");
    std::fs::rename(&tmp, rt.primary()).expect("rename");
    assert!(eventually(T, chained), "not repaired:\n{}", p1.log());
    assert!(
        std::fs::read_to_string(rt.primary()).is_ok_and(|c| c.contains("\"mtu\": 1400")),
        "the primary's change was lost"
    );
    assert!(p1.log().contains("chained it again"));
    // The binary removed: put back.
    std::fs::remove_file(rt.bin_dir.join("ambit-cni")).expect("rm");
    assert!(eventually(T, || rt.bin_dir.join("ambit-cni").exists()));
    // It still works after the repair.
    let uid = pod_object(&kube, "demo", "a", "client", &n1);
    let pod = PodRef { namespace: "demo", name: "a", uid: &uid };
    let netns = rt.sandbox("a");
    rt.add(&netns, &pod).unwrap_or_else(|e| panic!("ADD after repair: {e}\n{}", p1.log()));
    assert_eq!(enrolled(&p1), ["a"]);
    rt.del(&netns, &pod).expect("DEL");
    assert!(eventually(T, || enrolled(&p1).is_empty()));

    // A stopped proxy leaves the plugin chained: pods that should be captured wait for it.
    p1.kill();
    assert!(chained());
    // Uninstall: the primary's file exactly as it last wrote it, no binary, no kubeconfig.
    let bin = workspace_bin("ambit");
    let uninstall = || {
        let mut c = std::process::Command::new(&bin);
        c.args(["uninstall", "--bpffs"])
            .arg(bed.bpffs())
            .args(["--instance", &n1.name, "--cni-conf-dir"])
            .arg(&rt.conf_dir)
            .arg("--cni-bin-dir")
            .arg(&rt.bin_dir);
        run_with_timeout(c, T).expect("uninstall runs")
    };
    let out = uninstall();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(rt.primary()).expect("read"), rewritten);
    // Safe to repeat: a second run succeeds and changes nothing.
    let again = uninstall();
    assert!(again.status.success(), "{again:?}");
    assert_eq!(std::fs::read_to_string(rt.primary()).expect("read"), rewritten);
    let left: Vec<String> = std::fs::read_dir(&rt.conf_dir)
        .expect("conf dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [ambit_testbed::cni::PRIMARY], "files left in the CNI conf dir");
    assert!(!rt.bin_dir.join("ambit-cni").exists());
    // Pods start as they would without ambit.
    let netns = rt.sandbox("a2");
    rt.add(&netns, &pod).unwrap_or_else(|e| panic!("ADD after uninstall: {e}"));
    rt.del(&netns, &pod).expect("DEL");
}

/// What is wrong, the environment, the configuration, and the CNI error code and message
/// expected.
type ErrorCase = (&'static str, Vec<(&'static str, String)>, String, u64, &'static str);

#[test]
fn malformed_configurations_and_wrong_versions_get_the_spec_s_errors() {
    let bed = Bed::new("cni-errors");
    let node = bed.node("n1");
    let rt = Runtime::new(&bed, &node);
    std::fs::copy(workspace_bin("ambit"), rt.bin_dir.join("ambit-cni")).expect("install the plugin");
    let netns = rt.sandbox("a");
    let netns_path = format!("/var/run/netns/{netns}");
    let socket = bed.dir().join("no-node.sock").display().to_string();
    let env = |command: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", "c1".into()),
            ("CNI_NETNS", netns_path.clone()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_PATH", rt.bin_dir.display().to_string()),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a;K8S_POD_UID=u".into()),
        ]
    };
    let prev = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.1.0.150/24","interface":0}]}"#;
    let conf = |version: &str| {
        format!(
            r#"{{"cniVersion":"{version}","name":"podnet","type":"ambit-cni","socket":"{socket}","prevResult":{prev}}}"#
        )
    };
    let run = |env: Vec<(&'static str, String)>, config: &str| {
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (ok, stdout) = rt.invoke_plugin(&e, config);
        let v: serde_json::Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"));
        (ok, v)
    };
    let (ok, v) = run(env("VERSION"), "{}");
    assert!(ok);
    assert_eq!(v["supportedVersions"], serde_json::json!(["1.0.0", "1.1.0"]));
    let cases: [ErrorCase; 6] = [
        (
            "malformed JSON",
            env("ADD"),
            "{\"cniVersion\": \"1.0.0\",".into(),
            6,
            "failed to decode the network configuration",
        ),
        ("an old version", env("ADD"), conf("0.4.0"), 1, "incompatible CNI version 0.4.0"),
        (
            "no version",
            env("ADD"),
            r#"{"name":"podnet","type":"ambit-cni"}"#.into(),
            7,
            "invalid network configuration",
        ),
        (
            "not chained",
            env("ADD"),
            conf("1.0.0").replace(&format!(",\"prevResult\":{prev}"), ""),
            7,
            "invalid network configuration",
        ),
        (
            "no netns",
            env("ADD").into_iter().filter(|(k, _)| *k != "CNI_NETNS").collect(),
            conf("1.0.0"),
            4,
            "invalid necessary environment variables",
        ),
        ("no node for STATUS", env("STATUS"), conf("1.1.0"), 50, "the plugin is not available"),
    ];
    for (what, env, config, code, msg) in cases {
        let (ok, v) = run(env, &config);
        assert!(!ok, "{what}: exit 0");
        assert_eq!(v["code"], code, "{what}: {v}");
        assert!(v["msg"].as_str().is_some_and(|m| m.contains(msg)), "{what}: {v}");
        assert!(v["details"].as_str().is_some_and(|d| !d.is_empty()), "{what}: no details: {v}");
    }

    // Through libcni, as the runtime runs it: a conflist in a version ambit-cni does not
    // speak fails its ADD with that reason, and the runtime's DEL cleans up.
    let old = bed.dir().join("old-net.d");
    std::fs::create_dir_all(&old).expect("dir");
    let list = std::fs::read_to_string(rt.primary()).expect("conflist");
    let mut v: serde_json::Value = serde_json::from_str(&list).expect("json");
    v["cniVersion"] = "0.4.0".into();
    v["name"] = "oldnet".into();
    v["plugins"]
        .as_array_mut()
        .expect("plugins")
        .push(serde_json::json!({"type": "ambit-cni", "socket": socket}));
    std::fs::write(old.join("10-old.conflist"), v.to_string()).expect("write");
    let failure = rt.add_with(&old, "oldnet", &netns, &PodRef { namespace: "demo", name: "a", uid: "u" });
    let msg = failure.expect_err("an ADD in 0.4.0 passed").to_string();
    assert!(msg.contains("incompatible CNI version 0.4.0"), "{msg}");
    rt.del_with(&old, "oldnet", &netns, &PodRef { namespace: "demo", name: "a", uid: "u" }).expect("DEL");
    assert!(rt.leased().is_empty());
}
