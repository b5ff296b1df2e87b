//! Applications see the client's own address, as with Istio ambient: over HBONE across
//! nodes and on one node, in plaintext from outside the mesh, and (untouched) from kubelet
//! probes; the proxy's replies still flow, a closed port is still refused at once, and a pod
//! that leaves the mesh is left without the settings that made it possible.

mod common;

use ambit_testbed::{
    ambit::write_mesh,
    apps::http_server,
    bed::sh,
    controlplane::ControlPlane,
    exec::kubelet_command,
    mesh::{Mesh, AMBIENT, OPT_OUT},
    pod_command, run_with_timeout, Bed,
};
use common::*;

/// The source address the application logged for its last request.
fn last_client(server: &ambit_testbed::Proc<'_>) -> String {
    let log = server.output();
    let line = log.lines().rev().find(|l| l.contains("\"GET /")).unwrap_or_default().to_string();
    line.split(' ').next().unwrap_or_default().to_string()
}

fn curl_exit(pod: &ambit_testbed::Pod, url: &str) -> i32 {
    let cmd = pod_command(pod, &["curl", "-sS", "-g", "--connect-timeout", "3", "--max-time", "5", url]);
    run_with_timeout(cmd, T).expect("curl runs").status.code().unwrap_or(-1)
}

#[test]
fn applications_see_the_client_s_address_and_replies_still_flow() {
    let bed = Bed::new("original-source");
    let t = across_nodes(&bed);
    let x = bed.pod(&t.n1, "x");
    let c = bed.pod(&t.n2, "c");
    let mesh = |b_labels: &[(&str, &str)]| {
        Mesh::default()
            .namespace("demo", &[AMBIENT])
            .namespace("plain", &[])
            .pod_with_sa(&t.a, "demo", &[], "client")
            .pod_with_sa(&c, "demo", &[], "client")
            .pod(&x, "plain", &[])
            .pod_with_sa(&t.b, "demo", b_labels, "server")
            .yaml()
    };
    write_mesh(&t.mesh, &mesh(&[]));
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let _p1 = cp.start_node(&t.n1, &t.mesh, &[]);
    let p2 = cp.start_node(&t.n2, &t.mesh, &[]);
    let server = http_server(&bed, &t.b, "b\n");
    let (b4, b6) = (format!("http://{}:8080/", t.b.ipv4), format!("http://[{}]:8080/", t.b.ipv6));

    // Across nodes through HBONE, both families; on the same node; in plaintext from outside
    // the mesh. The answer comes back each time: the replies find the proxy.
    for (who, url, want) in [
        (&t.a, &b4, format!("::ffff:{}", t.a.ipv4)),
        (&t.a, &b6, t.a.ipv6.to_string()),
        (&c, &b4, format!("::ffff:{}", c.ipv4)),
        (&x, &b4, format!("::ffff:{}", x.ipv4)),
        (&x, &b6, x.ipv6.to_string()),
    ] {
        assert_eq!(ok_body(&curl(who, url)), "b\n", "{} -> {url}", who.name);
        assert_eq!(last_client(&server), want, "{} -> {url}: the application saw another source", who.name);
    }
    assert!(access_lines(&p2, &["direction=inbound", "security=mutual_tls"]) >= 3, "{}", p2.log());
    // Kubelet probes are not proxied: the node's own address, as before.
    let probe = kubelet_command(&t.n2, &["curl", "-sS", "--max-time", "5", &b4]);
    assert!(run_with_timeout(probe, T).expect("curl").status.success());
    assert_eq!(last_client(&server), format!("::ffff:{}", t.n2.bridge_ipv4()));

    // A closed port is refused at once, not after a connect timeout: the kernel's reset to
    // the proxy's transparent socket comes back to it inside the pod.
    for (who, url) in [(&t.a, format!("http://{}:9/", t.b.ipv4)), (&x, format!("http://{}:9/", t.b.ipv4))] {
        let code = curl_exit(who, &url);
        assert!(
            code != 0 && code != 28,
            "{} -> {url}: curl exit {code} (28: it hung until the timeout)",
            who.name
        );
    }

    // What makes it possible, inside b only: one rule and one table per family, two sysctls.
    let rules = |family: &str| sh(&["ip", "-n", &t.b.netns, family, "rule", "show"]).expect("ip rule");
    let sysctl = |key: &str| {
        sh(&["ip", "netns", "exec", &t.b.netns, "sysctl", "-n", key]).expect("sysctl").trim().to_string()
    };
    for family in ["-4", "-6"] {
        assert!(rules(family).contains("fwmark 0x53a lookup 1338"), "{family}: {}", rules(family));
        let table =
            sh(&["ip", "-n", &t.b.netns, family, "route", "show", "table", "1338"]).expect("ip route");
        assert!(table.contains("local default dev lo"), "{family}: {table}");
    }
    assert_eq!(
        (sysctl("net.ipv4.tcp_fwmark_accept"), sysctl("net.ipv4.fwmark_reflect")),
        ("1".into(), "1".into())
    );

    // b leaves the mesh: once its delivered connections are gone, so are the settings.
    write_mesh(&t.mesh, &mesh(&[OPT_OUT]));
    assert!(
        eventually(T, || !rules("-4").contains("0x53a") && !rules("-6").contains("0x53a")),
        "rules left behind: {} {}",
        rules("-4"),
        rules("-6")
    );
    let table = sh(&["ip", "-n", &t.b.netns, "route", "show", "table", "1338"]).unwrap_or_default();
    assert_eq!(table.trim(), "", "the table's route is left behind");
    assert_eq!(sysctl("net.ipv4.tcp_fwmark_accept"), "0");
    assert_eq!(sysctl("net.ipv6.fwmark_reflect"), "0");
    // Unenrolled, b is reached directly, from x's own address.
    assert!(eventually(T, || curl(&x, &b4).status.success()));
    assert_eq!(last_client(&server), format!("::ffff:{}", x.ipv4));
}
