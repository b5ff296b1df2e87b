//! What a pod or a peer must not get at: the admin endpoints (unauthenticated by design, so
//! loopback only) and key material or tokens in anything ambit prints or serves.

mod common;

use std::{net::SocketAddr, time::Duration};

use ambit_testbed::{controlplane::ControlPlane, netns, run_with_timeout, Ambit, Bed};
use common::*;

#[test]
fn the_admin_port_answers_on_loopback_only_and_a_public_admin_address_is_refused() {
    let bed = Bed::new("hardening-admin");
    let (node, a, _b, mesh) = enrolled_pair(&bed);
    let other = bed.node("n2");
    let (_, other_side) = bed.link(&other, &node);
    let _proxy = Ambit::start(&bed, &node, &mesh, &[]);

    let (status, _) =
        netns::http(&node.netns_path(), "GET", "127.0.0.1:15000".parse().expect("addr"), "/config_dump")
            .expect("admin on loopback");
    assert_eq!(status, 200, "the control: the admin endpoint answers on loopback");

    // A pod, towards its node's address; another node, towards the link address.
    let link_addr: SocketAddr = format!("{}:15000", link_ip(&bed, &node, &other_side)).parse().expect("addr");
    for (who, ns, addr) in [
        ("a pod", a.netns_path(), SocketAddr::new(node.bridge_ipv4(), 15000)),
        ("another node", other.netns_path(), link_addr),
    ] {
        let r = netns::connect_in(&ns, addr, Duration::from_secs(2));
        assert!(r.is_err(), "{who} reached the admin port at {addr}");
    }
    // The metrics port is for scrapers: reachable from the pod network, read-only.
    let (status, body) =
        netns::http(&a.netns_path(), "GET", SocketAddr::new(node.bridge_ipv4(), 15020), "/stats/prometheus")
            .expect("metrics from a pod");
    assert_eq!(status, 200, "{body}");

    // Asking for a public admin address is an error that names the flag.
    let cmd = Ambit::command(&bed, &node, &mesh, &["--admin-addr", "0.0.0.0:15099"]);
    let out = run_with_timeout(cmd, T).expect("ambit runs");
    assert!(!out.status.success(), "ambit node started with a public admin address");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--admin-addr 0.0.0.0:15099: must be a loopback address"), "{err}");
}

/// The address of `ifname` in `node`'s namespace.
fn link_ip(_bed: &Bed, node: &ambit_testbed::Node, ifname: &str) -> String {
    let out = run_with_timeout(
        ambit_testbed::exec::node_command(node, &["ip", "-4", "-o", "addr", "show", "dev", ifname]),
        T,
    )
    .expect("ip runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_else(|| panic!("no IPv4 address on {ifname}: {text}"))
        .to_string()
}

/// Base64 that opens every PKCS#8 P-256 private key (the algorithm identifiers and the key's
/// tag) and every SEC1 EC key: whatever the key, a dumped one starts like this.
const KEY_PREFIXES: [&str; 2] = ["MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg", "MHcCAQEEI"];

#[test]
fn no_key_material_or_token_in_logs_dumps_or_metrics() {
    let bed = Bed::new("hardening-keys");
    let AcrossNodes { n1, n2, cp: cpn, a, b, mesh } = across_nodes(&bed);
    let cp = ControlPlane::start(&bed, &cpn, &mesh, &[&n1, &n2], &["--log-level", "debug"]);
    let debug = ["--log-level", "debug"];
    let (p1, p2) = (cp.start_node(&n1, &mesh, &debug), cp.start_node(&n2, &mesh, &debug));
    let _server = http_server(&bed, &b, "secret-free\n");
    let url = format!("http://{}:8080/", b.ipv4);
    assert_eq!(ok_body(&curl(&a, &url)), "secret-free\n");

    let dumps = [p1.config_dump().to_string(), p2.config_dump().to_string(), cp.config_dump().to_string()];
    // The dumps do show the certificates: the check below looks at real content.
    assert!(
        dumps[0].contains("spiffe://cluster.local/ns/demo/sa/client") && dumps[0].contains("not_after"),
        "the node's dump lists no certificate: {}",
        dumps[0]
    );
    let texts: Vec<(&str, String)> = vec![
        ("node 1 log", p1.log()),
        ("node 2 log", p2.log()),
        ("control plane log", cp.log()),
        ("node 1 config dump", dumps[0].clone()),
        ("node 2 config dump", dumps[1].clone()),
        ("control plane config dump", dumps[2].clone()),
        ("node 1 metrics", p1.metrics()),
        ("node 2 metrics", p2.metrics()),
    ];
    let root_key = std::fs::read_to_string(&cp.root_key).expect("root key");
    let root_key_body: Vec<&str> =
        root_key.lines().filter(|l| !l.starts_with("-----") && l.len() > 20).collect();
    assert!(!root_key_body.is_empty(), "the root key file has no body: {root_key}");
    let tokens: Vec<String> = [&n1, &n2]
        .iter()
        .map(|n| std::fs::read_to_string(cp.token_file(&n.name)).expect("token").trim().to_string())
        .collect();
    for (what, text) in &texts {
        assert!(!text.is_empty(), "{what} is empty");
        assert!(!text.contains("PRIVATE KEY"), "{what} contains a PEM private key");
        for p in KEY_PREFIXES {
            assert!(!text.contains(p), "{what} contains a DER private key ({p}…)");
        }
        for line in &root_key_body {
            assert!(!text.contains(line), "{what} contains the CA key");
        }
        for t in &tokens {
            assert!(!text.contains(t.as_str()), "{what} contains a node's bearer token");
        }
    }
}
