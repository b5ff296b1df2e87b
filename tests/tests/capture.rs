//! In-pod eBPF capture, end to end: real pods (network namespaces), real clients and servers
//! (curl, python's http.server, netprobe), the real `ambit node` binary and its eBPF programs
//! in this machine's kernel.

use std::time::Duration;

mod common;

use ambit_testbed::{
    ambit::write_mesh,
    bed::sh,
    eventually,
    exec::kubelet_command,
    mesh::{Mesh, AMBIENT},
    pod_command, run_with_timeout, Ambit, Bed,
};
use common::*;

#[test]
fn curl_between_enrolled_pods_over_ipv4_and_ipv6() {
    let bed = Bed::new("curl");
    let (node, a, b, mesh) = enrolled_pair(&bed);
    let ambit = Ambit::start(&bed, &node, &mesh, &[]);
    let _server = http_server(&bed, &b, "hello from b\n");

    for url in [format!("http://{}:8080/index.html", b.ipv4), format!("http://[{}]:8080/index.html", b.ipv6)]
    {
        assert_eq!(ok_body(&curl(&a, &url)), "hello from b\n", "{url}");
    }

    // Both legs went through the proxy: outbound from a, inbound to b, with the original
    // destination in the access log. A line is written when the proxy has closed both
    // sides, which can be just after curl is done.
    for ip in [b.ipv4.to_string(), format!("[{}]", b.ipv6)] {
        let dst = format!("dst={ip}:8080");
        for leg in [["direction=outbound", "pod=a"], ["direction=inbound", "pod=b"]] {
            let one_line = || access_lines(&ambit, &[leg[0], leg[1], &dst]) == 1;
            assert!(eventually(T, one_line), "{dst} {leg:?}\n{}", ambit.log());
        }
    }
    assert_eq!(counter(&ambit, "ambit_proxy_connections_opened_total", "outbound", "demo", "a"), 2);
    assert_eq!(counter(&ambit, "ambit_proxy_connections_opened_total", "inbound", "demo", "b"), 2);
    assert!(eventually(T, || counter(
        &ambit,
        "ambit_proxy_connections_closed_total",
        "outbound",
        "demo",
        "a"
    ) == 2));
    assert!(
        counter(&ambit, "ambit_proxy_received_bytes_total", "outbound", "demo", "a")
            >= 2 * "hello from b\n".len() as u64
    );
    assert_eq!(kernel(&ambit, "connect_captured"), 2);
    assert_eq!(kernel(&ambit, "sockops_recorded"), 2);
    // The proxy runs under the same cgroup as the pods: its four upstream connects (two
    // outbound legs, two inbound legs) went through the hook and were let through by the mark.
    assert_eq!(kernel(&ambit, "connect_proxy_mark"), 4);
    assert_eq!(kernel(&ambit, "inbound_assigned"), 2);
    // The config dump lists both pods with their netns cookies and attachments.
    let dump = ambit.config_dump();
    let pods = dump["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 2, "{dump}");
    assert!(pods.iter().all(|p| p["netns_cookie"].as_u64().unwrap_or(0) != 0), "{dump}");
    // Kernel-side logging is off unless asked for.
    assert!(!ambit.log().contains(" ebpf: "), "{}", ambit.log());
}

#[test]
fn kernel_logs_are_forwarded_when_asked_for() {
    let bed = Bed::new("kernel-logs");
    let (node, a, b, mesh) = enrolled_pair(&bed);
    let mut ambit = Ambit::start(&bed, &node, &mesh, &["--ebpf-log-level", "debug"]);
    let _server = http_server(&bed, &b, "b\n");
    assert_eq!(ok_body(&curl(&a, &format!("http://{}:8080/", b.ipv4))), "b\n");
    let cookie = ambit.config_dump()["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "a"))
        .and_then(|p| p["netns_cookie"].as_u64())
        .expect("a's netns cookie");
    ambit
        .wait_log(&format!("connect captured: netns {cookie} port 8080"), T)
        .expect("the connect hook's debug record reaches the proxy's log");
}

#[test]
fn kubelet_probes_from_the_node_are_not_captured() {
    let bed = Bed::new("kubelet");
    let node = bed.node("n1");
    let b = bed.pod(&node, "b");
    let mesh = bed.dir().join("mesh.yaml");
    write_mesh(&mesh, &Mesh::default().namespace("demo", &[AMBIENT]).pod(&b, "demo", &[]).yaml());
    let ambit = Ambit::start(&bed, &node, &mesh, &[]);
    let server = http_server(&bed, &b, "probe ok\n");

    for url in [format!("http://{}:8080/", b.ipv4), format!("http://[{}]:8080/", b.ipv6)] {
        let cmd = kubelet_command(&node, &["curl", "-sS", "--max-time", "5", &url]);
        let out = run_with_timeout(cmd, T).expect("curl runs");
        assert_eq!(ok_body(&out), "probe ok\n", "{url}");
    }
    // Straight to the application: the proxy saw nothing, the kernel recorded and let
    // through two probes, and the server saw the node's own addresses as the source.
    assert_eq!(counter(&ambit, "ambit_proxy_connections_opened_total", "inbound", "demo", "b"), 0);
    assert_eq!(kernel(&ambit, "kubelet_probe_recorded"), 2);
    assert_eq!(kernel(&ambit, "inbound_kubelet_probe"), 2);
    assert_eq!(kernel(&ambit, "inbound_assigned"), 0);
    let log = server.output();
    assert!(log.contains(&format!("::ffff:{} ", node.bridge_ipv4())), "{log}");
    assert!(log.contains(&format!("{} ", node.bridge_ipv6())), "{log}");
}

/// Rules of every table in one namespace, as `iptables-save`, `ip6tables-save` and
/// `nft list ruleset` print them, without comments and counters.
fn firewall_rules(netns: Option<&str>) -> String {
    let mut out = String::new();
    for tool in [&["iptables-save"][..], &["ip6tables-save"], &["nft", "list", "ruleset"]] {
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = netns {
            argv.extend(["nsenter".to_string(), format!("--net=/var/run/netns/{ns}"), "--".into()]);
        }
        argv.extend(tool.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let text = sh(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            // Counters change with traffic; they are not rules.
            out.push_str(&line.split(" [").next().unwrap_or(line).replace(|c: char| c.is_ascii_digit(), ""));
            out.push('\n');
        }
    }
    out
}

#[test]
fn ambit_creates_no_iptables_or_nftables_rules_in_any_namespace() {
    let bed = Bed::new("no-iptables");
    let root_before = firewall_rules(None);
    let (node, a, b, mesh) = enrolled_pair(&bed);
    let ambit = Ambit::start(&bed, &node, &mesh, &[]);
    let _server = http_server(&bed, &b, "x");
    assert_eq!(ok_body(&curl(&a, &format!("http://{}:8080/", b.ipv4))), "x");
    assert_eq!(kernel(&ambit, "connect_captured"), 1, "the check is only meaningful with capture active");

    for ns in [&node.netns, &a.netns, &b.netns] {
        let rules = firewall_rules(Some(ns));
        assert!(
            rules.lines().all(|l| !l.starts_with("-A") && !l.contains("rule") && !l.contains("redirect")),
            "rules found in {ns}:\n{rules}"
        );
    }
    assert_eq!(firewall_rules(None), root_before, "the root namespace's rules changed");
}

#[test]
fn one_gibibyte_through_the_capture_path_arrives_byte_exact() {
    const GIB: u64 = 1 << 30;
    let bed = Bed::new("gibibyte");
    let (node, a, b, mesh) = enrolled_pair(&bed);
    let ambit = Ambit::start(&bed, &node, &mesh, &[]);
    let mut sink = netprobe(&bed, &b, "sink", "[::]:9000");
    sink.wait_for_output("listening", T).expect("sink listens");

    let bin = ambit_testbed::exec::workspace_bin("netprobe");
    let send = pod_command(
        &a,
        &[bin.to_str().expect("utf-8"), "send", &format!("{}:9000", b.ipv4), &GIB.to_string()],
    );
    let out = run_with_timeout(send, Duration::from_secs(300)).expect("netprobe send runs");
    let text = ok_body(&out);
    let sent = text.lines().find_map(|l| l.strip_prefix("sent ")).expect("sender's hash");
    let received = text.lines().find_map(|l| l.strip_prefix("received ")).expect("sink's hash");
    assert_eq!(sent, received, "hash at the sender vs at the receiver");
    assert!(sent.starts_with(&format!("{GIB} ")), "{sent}");
    // And it was captured, both ways, not sent around the proxy.
    assert!(
        eventually(T, || access_lines(&ambit, &["pod=a", &format!("bytes_sent={GIB}")]) == 1),
        "{}",
        ambit.log()
    );
    let inbound = || access_lines(&ambit, &["direction=inbound", "pod=b", &format!("bytes_sent={GIB}")]) == 1;
    assert!(eventually(T, inbound), "{}", ambit.log());
}
