//! Istio's own tools and ztunnel's conventions on an ambit node proxy: the real
//! `istioctl ztunnel-config` (built from the pinned Istio module) reads ambit's
//! `/config_dump` (workloads, services, policies, certificates), and the access log can carry
//! ztunnel's field names for log pipelines written for ztunnel.

mod common;

use std::process::Command;

use ambit_testbed::{
    apps::http_server,
    controlplane::ControlPlane,
    mesh::{Mesh, AMBIENT},
    run_with_timeout, tools, Bed,
};
use common::*;

const VIP: &str = "10.96.0.30";
const HOST: &str = "web.demo.svc.cluster.local";

/// `istioctl ztunnel-config <what> --file <dump>` and its output.
fn istioctl(what: &str, dump: &std::path::Path, extra: &[&str]) -> String {
    let mut c = Command::new(tools::istioctl());
    c.args(["ztunnel-config", what, "--file"]).arg(dump).args(extra);
    // No cluster is needed with --file; an empty kubeconfig keeps it from looking for one.
    c.env("KUBECONFIG", "/dev/null");
    let out = run_with_timeout(c, T).expect("istioctl runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "istioctl ztunnel-config {what}: {text}");
    text
}

/// The row of a table whose first columns are `cells`.
fn row<'t>(table: &'t str, cells: &[&str]) -> Option<&'t str> {
    table.lines().find(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() >= cells.len() && cols.iter().zip(cells).all(|(c, w)| c == w)
    })
}

#[test]
fn istioctl_ztunnel_config_reads_ambit_s_dump() {
    let bed = Bed::new("istioctl-dump");
    let (n1, n2, cpn) = (bed.node("n1"), bed.node("n2"), bed.node("cp"));
    bed.link(&n1, &n2);
    bed.link(&cpn, &n1);
    bed.link(&cpn, &n2);
    let (a, b) = (bed.pod(&n1, "a"), bed.pod(&n2, "b"));
    let outside = bed.pod(&n1, "outside");
    let mesh_path = bed.dir().join("mesh.yaml");
    let policy = "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata:\n      name: web-from-client\n      namespace: demo\n    spec:\n      selector:\n        matchLabels:\n          app: web\n      action: ALLOW\n      rules:\n        - from:\n            - source:\n                principals: [cluster.local/ns/demo/sa/client]\n          to:\n            - operation:\n                ports: [\"8080\"]\n";
    let mesh = Mesh::default()
        .namespace("demo", &[AMBIENT])
        .namespace("plain", &[])
        .pod_with_sa(&a, "demo", &[("app", "client")], "client")
        .pod_with_sa(&b, "demo", &[("app", "web")], "server")
        .pod(&outside, "plain", &[])
        .service("web", "demo", &[VIP], &[(80, 8080)], &[("app", "web")])
        .policies(policy);
    ambit_testbed::ambit::write_mesh(&mesh_path, &mesh.yaml());
    let cp = ControlPlane::start(&bed, &cpn, &mesh_path, &[&n1, &n2], &[]);
    let p1 = cp.start_node(&n1, &mesh_path, &["--access-log-format", "ztunnel"]);
    let _p2 = cp.start_node(&n2, &mesh_path, &[]);
    let _web = http_server(&bed, &b, "web\n");

    let dump = bed.dir().join("n1-config-dump.json");
    std::fs::write(&dump, p1.config_dump().to_string()).expect("dump");

    let workloads = istioctl("workloads", &dump, &[]);
    let a_row = row(&workloads, &["demo", "a", &format!("{},{}", a.ipv4, a.ipv6)])
        .unwrap_or_else(|| panic!("{workloads}"));
    assert!(a_row.contains("n1") && a_row.contains("HBONE"), "{a_row}");
    let b_row = row(&workloads, &["demo", "b", &format!("{},{}", b.ipv4, b.ipv6)])
        .unwrap_or_else(|| panic!("{workloads}"));
    assert!(b_row.contains("n2") && b_row.contains("HBONE"), "{b_row}");
    let o_row = row(&workloads, &["plain", "outside"]).unwrap_or_else(|| panic!("{workloads}"));
    assert!(o_row.contains("TCP"), "a pod outside the mesh is reached in plaintext: {o_row}");

    let services = istioctl("services", &dump, &[]);
    let web = row(&services, &["demo", "web"]).unwrap_or_else(|| panic!("{services}"));
    assert!(web.contains(VIP) && web.contains("1/1"), "one healthy endpoint of one: {web}");

    let policies = istioctl("policies", &dump, &[]);
    let p = row(&policies, &["demo", "web-from-client"]).unwrap_or_else(|| panic!("{policies}"));
    assert!(p.contains("Allow") && p.contains("WorkloadSelector"), "{p}");
    // The JSON istioctl re-marshals from its own types: the rule's principal and port survive.
    let json = istioctl("policies", &dump, &["-o", "json"]);
    assert!(
        json.contains("\"Exact\": \"cluster.local/ns/demo/sa/client\"") && json.contains("8080"),
        "{json}"
    );

    let certs = istioctl("certificates", &dump, &[]);
    let leaf = row(&certs, &["spiffe://cluster.local/ns/demo/sa/client", "Leaf"])
        .unwrap_or_else(|| panic!("{certs}"));
    assert!(leaf.contains("true"), "a valid leaf: {leaf}");
    let serial =
        p1.config_dump()["certificates"][0]["certificate"]["serial"].as_str().unwrap_or("").to_lowercase();
    let serial = serial.replace(':', "").trim_start_matches('0').to_string();
    assert!(
        !serial.is_empty() && leaf.to_lowercase().contains(&serial),
        "istioctl's serial (hex) is ambit's {serial}: {leaf}"
    );
    assert!(row(&certs, &["spiffe://cluster.local/ns/demo/sa/client", "Root"]).is_some(), "{certs}");

    // ztunnel's access-log fields (what log pipelines written for ztunnel parse).
    assert_eq!(ok_body(&curl(&a, &format!("http://{VIP}/"))), "web\n");
    assert!(eventually(T, || p1.log().contains("connection complete")), "{}", p1.log());
    let line = p1.log().lines().find(|l| l.contains("connection complete")).expect("a line").to_string();
    for field in [
        format!("src.addr={}:", a.ipv4),
        "src.workload=\"a\"".into(),
        "src.namespace=\"demo\"".into(),
        "src.identity=\"spiffe://cluster.local/ns/demo/sa/client\"".into(),
        format!("dst.addr={}:15008", b.ipv4),
        format!("dst.hbone_addr={}:8080", b.ipv4),
        format!("dst.service=\"{HOST}\""),
        "dst.workload=\"b\"".into(),
        "dst.identity=\"spiffe://cluster.local/ns/demo/sa/server\"".into(),
        "direction=\"outbound\"".into(),
        "bytes_sent=".into(),
        "bytes_recv=".into(),
        "duration=\"".into(),
    ] {
        assert!(line.contains(&field), "{field} missing from {line}");
    }
    assert!(
        !line.contains("src_workload=") && !line.contains("bytes_received="),
        "ambit's names too: {line}"
    );
}

/// A raw `GET` in `netns`: status and body bytes.
fn get_bytes(netns: &std::path::Path, addr: &str, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().expect("addr");
    let mut s =
        ambit_testbed::netns::connect_in(netns, addr, std::time::Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status");
    (status, raw[head_end..].to_vec())
}

#[test]
fn cpu_and_heap_profiles_are_served_as_ztunnel_serves_them() {
    let bed = Bed::new("pprof");
    let n1 = bed.node("n1");
    let a = bed.pod(&n1, "a");
    let mesh_path = bed.dir().join("mesh.yaml");
    ambit_testbed::ambit::write_mesh(
        &mesh_path,
        &Mesh::default().namespace("demo", &[AMBIENT]).pod(&a, "demo", &[]).yaml(),
    );
    // One sample per 4 KiB allocated: the idle proxy's own live allocations are in the heap
    // profile for certain (at the default 512 KiB an idle proxy has a handful).
    let p = ambit_testbed::Ambit::start(&bed, &n1, &mesh_path, &["--heap-sample-bytes", "4096"]);
    let ns = n1.netns_path();
    // Two at once: the second is told to wait, and says why.
    let first = {
        let ns = ns.clone();
        std::thread::spawn(move || get_bytes(&ns, "127.0.0.1:15000", "/debug/pprof/profile?seconds=2"))
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (status, body) = get_bytes(&ns, "127.0.0.1:15000", "/debug/pprof/profile?seconds=1");
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    let (status, profile) = first.join().expect("the first request");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&profile));
    // Go's own pprof reads it.
    let file = bed.dir().join("cpu.pb");
    std::fs::write(&file, &profile).expect("write");
    let mut c = Command::new("go");
    c.args(["tool", "pprof", "-raw"]).arg(&file).env("GOTOOLCHAIN", "local");
    let out = run_with_timeout(c, T).expect("go tool pprof runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // A CPU profile of the two seconds asked for (an idle proxy may have few samples).
    assert!(text.contains("PeriodType: cpu nanoseconds") && text.contains("Duration: 2.00"), "{text}");
    // Bad requests are refused, naming what is expected.
    for bad in [
        "/debug/pprof/profile?seconds=0",
        "/debug/pprof/profile?seconds=61",
        "/debug/pprof/profile?seconds=x",
    ] {
        let (status, body) = get_bytes(&ns, "127.0.0.1:15000", bad);
        assert_eq!(status, 400, "{bad}");
        assert!(String::from_utf8_lossy(&body).contains("from 1 to 60"), "{bad}");
    }
    // The heap profile: the sampled live allocations, read by Go's pprof, with the
    // proxy's own functions in the stacks and the sampler's frames left out.
    let (status, heap) = get_bytes(&ns, "127.0.0.1:15000", "/debug/pprof/heap");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&heap));
    let file = bed.dir().join("heap.pb");
    std::fs::write(&file, &heap).expect("write");
    let mut c = Command::new("go");
    c.args(["tool", "pprof", "-raw"]).arg(&file).env("GOTOOLCHAIN", "local");
    let out = run_with_timeout(c, T).expect("go tool pprof runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("PeriodType: space bytes") && text.contains("Period: 4096"), "{text}");
    assert!(text.contains("inuse_objects/count inuse_space/bytes"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("userspace/src/") && !l.contains("userspace/src/profiling/")),
        "no frame of the proxy's own code:\n{text}"
    );
    assert!(!text.contains("profiling/heap.rs"), "the sampler's frames are in the stacks:\n{text}");
    drop(p);
}
