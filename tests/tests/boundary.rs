//! The mesh boundary against a hostile client: each test attacks one way past STRICT mTLS
//! or authorization that was found on a live mesh, the way it was found, and checks that it
//! no longer gets through (and that the client itself worked, so a failure is the mesh's
//! doing).
//!
//! Under STRICT, no plaintext reaches an enrolled pod's application unless it is a kubelet
//! probe, and no address a client merely asserts is trusted.

mod common;

use ambit_testbed::{
    ambit::write_mesh,
    apps::http_server,
    attack,
    bed::sh,
    certs,
    controlplane::ControlPlane,
    exec::{kubelet_command, node_command, pod_command, workspace_bin},
    mesh::{Mesh, AMBIENT},
    run_with_timeout, Ambit, Bed, Pod,
};
use common::*;

/// The namespace's PeerAuthentication, STRICT.
const STRICT: &str = "  - apiVersion: security.istio.io/v1\n    kind: PeerAuthentication\n    metadata: {name: default, namespace: demo}\n    spec:\n      mtls:\n        mode: STRICT\n";

/// Requests the application saw (lines of its log).
fn requests(server: &ambit_testbed::Proc<'_>) -> usize {
    server.output().matches("\"GET /").count()
}

/// curl from a command; whether it got an answer.
fn answered(cmd: std::process::Command) -> bool {
    run_with_timeout(cmd, T).expect("curl runs").status.success()
}

fn curl_argv(url: &str) -> Vec<&str> {
    vec!["curl", "-sS", "-g", "--connect-timeout", "3", "--max-time", "5", url]
}

/// One node: `b` enrolled under STRICT (offline: its policy in the node's mesh file), serving
/// HTTP; `x`, a pod outside the mesh on the same bridge.
struct Strict<'b> {
    node: ambit_testbed::Node,
    b: Pod,
    x: Pod,
    ambit: Ambit<'b>,
    server: ambit_testbed::Proc<'b>,
}

fn strict_node(bed: &Bed) -> Strict<'_> {
    let node = bed.node("n1");
    let b = bed.pod(&node, "b");
    let x = bed.pod(&node, "x");
    let mesh = bed.dir().join("mesh.yaml");
    write_mesh(
        &mesh,
        &Mesh::default()
            .namespace("demo", &[AMBIENT])
            .namespace("plain", &[])
            .pod(&b, "demo", &[])
            .pod(&x, "plain", &[])
            .policies(STRICT)
            .yaml(),
    );
    let ambit = Ambit::start(bed, &node, &mesh, &[]);
    let server = http_server(bed, &b, "b\n");
    Strict { node, b, x, ambit, server }
}

#[test]
fn a_forged_forwarded_header_neither_passes_nor_escapes_ip_blocks() {
    let bed = Bed::new("boundary-forwarded");
    let t = across_nodes(&bed);
    let x = bed.pod(&t.n1, "x");
    let with = |policies: &str| {
        Mesh::default()
            .namespace("demo", &[AMBIENT])
            .namespace("plain", &[])
            .pod_with_sa(&t.a, "demo", &[], "client")
            .pod_with_sa(&t.b, "demo", &[("app", "web")], "server")
            .pod(&x, "plain", &[])
            .policies(policies)
            .yaml()
    };
    let policy = |action: &str, ip: std::net::IpAddr| {
        format!("  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {{name: by-address, namespace: demo}}\n    spec:\n      selector: {{matchLabels: {{app: web}}}}\n      action: {action}\n      rules:\n        - from: [{{source: {{ipBlocks: [\"{ip}/32\"]}}}}]\n")
    };
    write_mesh(&t.mesh, &with(&policy("ALLOW", t.a.ipv4)));
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let _p1 = cp.start_node(&t.n1, &t.mesh, &[]);
    let p2 = cp.start_node(&t.n2, &t.mesh, &[]);
    let _http = http_server(&bed, &t.b, "b\n");
    let mut echo = netprobe(&bed, &t.b, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    // The attacker holds a valid mesh certificate and talks HBONE itself from a pod outside
    // the mesh, claiming a's address.
    let id = "spiffe://cluster.local/ns/demo/sa/client";
    let (cert, key) = certs::workload(bed.dir(), "forger", id, &cp.root_cert, &cp.root_key);
    let bin = workspace_bin("hbone-probe");
    let forge = |claim: &str| {
        let (hbone, target) = (format!("{}:15008", t.b.ipv4), format!("{}:7000", t.b.ipv4));
        let argv = [
            bin.to_str().expect("utf-8"),
            &hbone,
            &target,
            "--cert",
            cert.to_str().expect("utf-8"),
            "--key",
            key.to_str().expect("utf-8"),
            "--forwarded",
            claim,
        ];
        let out = run_with_timeout(pod_command(&x, &argv), T).expect("hbone-probe runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let claim_a = format!("for={}", t.a.ipv4);
    let url = format!("http://{}:8080/", t.b.ipv4);

    // ALLOW a's address: a gets in, the forger claiming to be a does not.
    assert!(eventually(T, || curl(&t.a, &url).status.success()), "a is allowed by address");
    assert_eq!(forge(&claim_a), "status 401", "a claimed address passed ipBlocks ALLOW");
    // The denial names the connection's real peer, not the claim.
    let real = format!("src={}:", x.ipv4);
    assert!(
        eventually(T, || access_lines(&p2, &["connection denied", &real, id]) >= 1),
        "the denial does not name the real client:\n{}",
        p2.log()
    );
    assert_eq!(access_lines(&p2, &["connection denied", &format!("src={}:", t.a.ipv4)]), 0, "{}", p2.log());

    // DENY the forger's own address: claiming another one does not escape it.
    write_mesh(&t.mesh, &with(&policy("DENY", x.ipv4)));
    assert!(
        eventually(T, || forge(&claim_a) == "status 401"),
        "a claimed address escaped an ipBlocks DENY: {}",
        forge(&claim_a)
    );
    // And without the DENY the same client is served: the 401 was the policy's.
    write_mesh(&t.mesh, &with(""));
    assert!(eventually(T, || forge(&claim_a).starts_with("status 200")), "{}", forge(&claim_a));
}

#[test]
fn an_ipv6_syn_behind_extension_headers_is_captured_under_strict() {
    let bed = Bed::new("boundary-ipv6-ext");
    let s = strict_node(&bed);
    let outside = bed.pod(&s.node, "o");
    let _plain = http_server(&bed, &outside, "o\n");
    for ext in ["hop", "dst", "none"] {
        // The client works: a plain server outside the mesh answers it.
        let got = attack::get_with_ipv6_ext_header(&s.x, outside.ipv6, 8080, ext);
        assert!(got.starts_with("answer HTTP/1.0 200"), "{ext}: the attack client does not work: {got}");
        // Against the enrolled pod, the SYN is captured and STRICT refuses it.
        let before = requests(&s.server);
        let assigned = kernel(&s.ambit, "inbound_assigned");
        let got = attack::get_with_ipv6_ext_header(&s.x, s.b.ipv6, 8080, ext);
        assert!(!got.starts_with("answer HTTP"), "{ext}: plaintext reached b under STRICT: {got}");
        assert_eq!(requests(&s.server), before, "{ext}: b's application saw the request");
        assert!(kernel(&s.ambit, "inbound_assigned") > assigned, "{ext}: the SYN was not captured");
    }
    assert!(
        eventually(T, || access_lines(
            &s.ambit,
            &["peer_authentication_strict", &format!("src=[{}]", s.x.ipv6)]
        ) >= 3),
        "{}",
        s.ambit.log()
    );
}

#[test]
fn a_tcp_syn_in_ipv4_fragments_is_dropped() {
    let bed = Bed::new("boundary-fragments");
    let s = strict_node(&bed);
    let outside = bed.pod(&s.node, "o");
    let _plain = http_server(&bed, &outside, "o\n");
    // The sender and its sniffer work: a pod outside the mesh answers both forms.
    assert!(attack::syn_acks(&s.x, outside.ipv4, 8080, "whole") >= 1, "no SYN-ACK from a plain pod");
    assert!(attack::syn_acks(&s.x, outside.ipv4, 8080, "fragments") >= 1, "the fragments do not reassemble");
    // The enrolled pod: a whole SYN is captured (the proxy's listener answers it, then STRICT
    // refuses the connection); the fragments never reach anything.
    let before = kernel(&s.ambit, "inbound_drop_fragment");
    assert_eq!(attack::syn_acks(&s.x, s.b.ipv4, 8080, "fragments"), 0, "a fragmented SYN reached b");
    assert_eq!(kernel(&s.ambit, "inbound_drop_fragment") - before, 2, "both fragments dropped");
    assert_eq!(requests(&s.server), 0);
}

#[test]
fn only_the_kubelet_s_probes_pass_from_the_node() {
    let bed = Bed::new("boundary-node");
    let s = strict_node(&bed);
    let ext = bed.node("ext");
    let (n1_side, _) = bed.link(&s.node, &ext);
    let url4 = format!("http://{}:8080/", s.b.ipv4);
    let url6 = format!("http://[{}]:8080/", s.b.ipv6);

    // The kubelet's probes reach the application, over both families.
    for url in [&url4, &url6] {
        assert!(answered(kubelet_command(&s.node, &curl_argv(url))), "kubelet probe {url} refused");
    }
    assert_eq!(requests(&s.server), 2);

    // Any other process on the node (a host-network pod) is a plaintext client like any other.
    for url in [&url4, &url6] {
        assert!(!answered(node_command(&s.node, &curl_argv(url))), "host-network process got {url}");
    }
    // NodePort traffic masqueraded to the node's address, as kube-proxy does it.
    let ip = |a: &str| {
        let out = sh(&["ip", "-n", &s.node.netns, "-4", "-o", "addr", "show", "dev", a]).expect("ip addr");
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .expect("an address")
            .split('/')
            .next()
            .expect("ip")
            .to_string()
    };
    let node_ip = ip(&n1_side);
    let rules = format!(
        "table ip nodeport {{\n chain pre {{\n  type nat hook prerouting priority -100;\n  tcp dport 30080 dnat to {}:8080\n }}\n chain post {{\n  type nat hook postrouting priority 100;\n  ip daddr {} tcp dport 8080 masquerade\n }}\n}}\n",
        s.b.ipv4, s.b.ipv4
    );
    let mut nft = node_command(&s.node, &["nft", "-f", "-"]);
    nft.stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().expect("nft");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), rules.as_bytes()).expect("rules");
    assert!(child.wait().expect("nft").success(), "nft rules");
    let nodeport = format!("http://{node_ip}:30080/");
    assert!(
        !answered(node_command(&ext, &curl_argv(&nodeport))),
        "NodePort traffic SNATed to the node got in"
    );
    assert_eq!(requests(&s.server), 2, "only the kubelet's two probes reached b");
    assert_eq!(kernel(&s.ambit, "inbound_kubelet_probe"), 2);
    // Each was refused by the proxy as plaintext from the node's address.
    let from_node = format!("src={}:", s.node.bridge_ipv4());
    let from_node6 = format!("src=[{}]:", s.node.bridge_ipv6());
    assert!(
        eventually(T, || access_lines(&s.ambit, &["peer_authentication_strict", &from_node]) == 2
            && access_lines(&s.ambit, &["peer_authentication_strict", &from_node6]) == 1),
        "{}",
        s.ambit.log()
    );
}

#[test]
fn a_pod_s_link_local_address_is_no_way_around_capture() {
    let bed = Bed::new("boundary-link-local");
    let s = strict_node(&bed);
    // b's link-local address, once duplicate address detection has finished.
    let mut ll = String::new();
    assert!(
        eventually(T, || {
            let out =
                sh(&["ip", "-n", &s.b.netns, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"])
                    .unwrap_or_default();
            ll = out
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .unwrap_or("")
                .split('/')
                .next()
                .unwrap_or("")
                .to_string();
            !ll.is_empty() && !out.contains("tentative")
        }),
        "b has no link-local address"
    );
    let url = format!("http://[{ll}%eth0]:8080/");
    let before = kernel(&s.ambit, "inbound_drop_uncovered");
    assert!(!answered(pod_command(&s.x, &curl_argv(&url))), "plaintext reached b on its link-local address");
    assert_eq!(requests(&s.server), 0);
    assert!(kernel(&s.ambit, "inbound_drop_uncovered") > before, "the SYN was not refused as uncovered");
    // The same neighbour on b's mesh address is captured (and refused by STRICT).
    assert!(!answered(pod_command(&s.x, &curl_argv(&format!("http://[{}]:8080/", s.b.ipv6)))));
    assert!(kernel(&s.ambit, "inbound_assigned") >= 1);
}
