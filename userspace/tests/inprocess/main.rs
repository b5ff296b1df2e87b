//! The in-process tier: the node proxy's data path in one process, without root, eBPF or
//! network namespaces, in seconds. Pods are loopback addresses of the test's namespace;
//! original destinations come from `MockOrigDst`, sockets from `LocalSockets`, certificates
//! from a CA in the process. What the kernel does (capture, marks, namespaces) is the root
//! suite's (`tests/`); what the proxy decides and carries is tested here: routing, the HBONE
//! client and server with mTLS, the pool, authorization, renewal.

mod support;

use std::{net::SocketAddr, time::Duration};

use ambit::proxy::UnknownDestination;
use support::*;

/// The bed's mesh in `10.<net>.0.0/16`: each test has its own `net`, as tests run at once.
fn mesh(net: u8, policies: &str) -> String {
    let text = format!(
        "\
namespaces:
  - name: demo
    labels: {{istio.io/dataplane-mode: ambient}}
pods:
  - {{name: a, namespace: demo, serviceAccount: client, ips: [10.77.0.2], netns: /x, labels: {{app: a}}}}
  - {{name: b, namespace: demo, serviceAccount: server, ips: [10.77.0.3], netns: /x, labels: {{app: b}}}}
  - {{name: c, namespace: demo, serviceAccount: server, ips: [10.77.0.4], netns: /x, labels: {{app: b}}}}
services:
  - {{name: web, namespace: demo, addresses: [10.77.9.1], selector: {{app: b}}, ports: [{{port: 80, targetPort: 8080}}]}}
policies:
{policies}"
    );
    text.replace("10.77.", &format!("10.{net}."))
}

/// `10.77.x.y` of the template in test `net`.
fn at(net: u8, mesh_ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(&on(net, mesh_ip)), port)
}

fn on(net: u8, mesh_ip: &str) -> String {
    mesh_ip.replace("10.77.", &format!("10.{net}."))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_is_reached_through_an_mtls_tunnel_and_connections_share_it() {
    const NET: u8 = 70;
    let ca = LocalCa::new("tunnel");
    let state = state(&mesh(NET, ""));
    let node = Node::new(&ca, &state, UnknownDestination::Refuse, Duration::from_secs(3600));
    let a = node.pod("demo", "a", "client", &on(NET, "10.77.0.2")).await;
    let _b = node.pod("demo", "b", "server", &on(NET, "10.77.0.3")).await;
    echo(at(NET, "10.77.0.3", 8080), "b:").await;
    for i in 0..3 {
        let mut s = a.connect(&node, at(NET, "10.77.0.3", 8080)).await;
        let msg = format!("hello {i}");
        let got = exchange(&mut s, msg.as_bytes(), 2 + msg.len()).await;
        assert_eq!(String::from_utf8_lossy(&got), format!("b:{msg}"));
    }
    // Three connections, one pooled tunnel between the two identities.
    let pools = node.proxy.hbone_pools();
    assert_eq!(pools.len(), 1, "{pools:?}");
    // Both sides report the connection as mTLS with the client's identity.
    let m = node.metrics.render();
    let opened = metric(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "connection_security_policy=\"mutual_tls\"",
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        ],
    );
    assert_eq!(opened, Some(3.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_address_goes_to_a_healthy_endpoint_on_the_target_port() {
    const NET: u8 = 71;
    let ca = LocalCa::new("service");
    let state = state(&mesh(NET, ""));
    let node = Node::new(&ca, &state, UnknownDestination::Refuse, Duration::from_secs(3600));
    let a = node.pod("demo", "a", "client", &on(NET, "10.77.0.2")).await;
    let _b = node.pod("demo", "b", "server", &on(NET, "10.77.0.3")).await;
    let _c = node.pod("demo", "c", "server", &on(NET, "10.77.0.4")).await;
    echo(at(NET, "10.77.0.3", 8080), "b:").await;
    echo(at(NET, "10.77.0.4", 8080), "c:").await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let mut s = a.connect(&node, at(NET, "10.77.9.1", 80)).await;
        let got = exchange(&mut s, b"x", 3).await;
        seen.insert(String::from_utf8_lossy(&got[..2.min(got.len())]).into_owned());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["b:", "c:"], "round robin over both endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denying_policy_refuses_at_the_destination_and_says_why() {
    const NET: u8 = 72;
    let ca = LocalCa::new("deny");
    let policy = "  - kind: AuthorizationPolicy
    metadata: {name: no-client, namespace: demo}
    spec: {selector: {matchLabels: {app: b}}, action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]}
";
    let state = state(&mesh(NET, policy));
    let node = Node::new(&ca, &state, UnknownDestination::Refuse, Duration::from_secs(3600));
    let a = node.pod("demo", "a", "client", &on(NET, "10.77.0.2")).await;
    let _b = node.pod("demo", "b", "server", &on(NET, "10.77.0.3")).await;
    echo(at(NET, "10.77.0.3", 8080), "b:").await;
    match a.try_connect(&node, at(NET, "10.77.0.3", 8080)).await {
        Ok(mut s) => {
            let got = exchange(&mut s, b"let me in", 11).await;
            assert!(
                got.is_empty(),
                "denied, yet the application answered: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    let m = node.metrics.render();
    let denied = metric(&m, "ambit_proxy_connections_failed_total", &["reason=\"authorization_denied\""]);
    assert_eq!(denied, Some(1.0), "{m}");
    let flagged = metric(&m, "istio_tcp_connections_failed_total", &["response_flags=\"DENY\""]);
    assert!(flagged.is_some_and(|n| n >= 1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_outside_the_mesh_is_passed_through_or_refused_as_configured() {
    const NET: u8 = 73;
    let ca = LocalCa::new("unknown");
    let state = state(&mesh(NET, ""));
    let outside = echo(at(NET, "10.77.5.5", 0), "out:").await;
    for (unknown, want) in [(UnknownDestination::Passthrough, "out:hi"), (UnknownDestination::Refuse, "")] {
        let node = Node::new(&ca, &state, unknown, Duration::from_secs(3600));
        let a = node.pod("demo", "a", "client", &on(NET, "10.77.0.2")).await;
        let got = match a.try_connect(&node, outside).await {
            Ok(mut s) => exchange(&mut s, b"hi", want.len().max(1)).await,
            Err(e) if unknown == UnknownDestination::Refuse => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                Vec::new()
            }
            Err(e) => panic!("connect: {e}"),
        };
        assert_eq!(String::from_utf8_lossy(&got), want, "{unknown:?}");
        if unknown == UnknownDestination::Refuse {
            let m = node.metrics.render();
            let n = metric(&m, "ambit_proxy_connections_failed_total", &["reason=\"unknown_destination\""]);
            assert_eq!(n, Some(1.0), "{m}");
        }
        drop(node);
        // The next node binds the same pod's listeners.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_before_it_expires_and_tunnels_keep_working() {
    const NET: u8 = 74;
    let ca = LocalCa::new("renew");
    let state = state(&mesh(NET, ""));
    // Renewal at half-life: a 4 s certificate is replaced after about 2 s.
    let node = Node::new(&ca, &state, UnknownDestination::Refuse, Duration::from_secs(4));
    let a = node.pod("demo", "a", "client", &on(NET, "10.77.0.2")).await;
    let _b = node.pod("demo", "b", "server", &on(NET, "10.77.0.3")).await;
    echo(at(NET, "10.77.0.3", 8080), "b:").await;
    let first = node.identities.current(&a.identity).expect("issued").serial.clone();
    let deadline = tokio::time::Instant::now() + T;
    let renewed = loop {
        let now = node.identities.current(&a.identity).expect("kept").serial.clone();
        if now != first {
            break now;
        }
        assert!(tokio::time::Instant::now() < deadline, "not renewed within {T:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(renewed, first);
    // After the first certificate's end, a new connection still gets through.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut s = a.connect(&node, at(NET, "10.77.0.3", 8080)).await;
    assert_eq!(exchange(&mut s, b"still", 7).await, b"b:still");
}
