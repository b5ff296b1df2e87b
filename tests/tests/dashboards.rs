//! The queries behind Kiali's graph and Istio's Workload and Service dashboards, run by a real
//! Prometheus server (Debian's) scraping both node proxies in the bed: each returns the edges
//! and values of the bed's traffic, with canonical services and revisions derived from the
//! pods' labels as Istio derives them.
//!
//! The queries are those the projects publish (Kiali's graph for a namespace with its
//! default settings; the TCP panels of Istio's dashboards), with their template variables
//! filled in for this bed.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ambit_testbed::{
    apps::http_server,
    controlplane::ControlPlane,
    exec::node_command,
    mesh::{Mesh, AMBIENT},
    netns, Bed, Node, Proc,
};
use common::*;
use serde_json::Value;

const PROMETHEUS: &str = "127.0.0.1:9090";
/// Long enough for a few scrapes and a rate window.
const SLOW: Duration = Duration::from_secs(30);
const VIP: &str = "10.96.0.20";
const HOST: &str = "web.demo.svc.cluster.local";

fn prometheus_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("target/tools/bin/prometheus");
    assert!(p.exists(), "{} is missing: run `cargo xtask setup` (it extracts it)", p.display());
    p
}

/// `node`'s address on the link it shares with `cp` (`ifname` on the node's side).
fn link_ipv4(node: &Node, ifname: &str) -> String {
    let out = ambit_testbed::bed::sh(&["ip", "-n", &node.netns, "-4", "-o", "addr", "show", "dev", ifname])
        .expect("ip addr");
    let cidr = out.split_whitespace().skip_while(|w| *w != "inet").nth(1).expect("an IPv4 address");
    cidr.split('/').next().expect("address").to_string()
}

/// Prometheus in `cp`'s namespace, scraping `targets` (`pod name`, `address:port`) every
/// second; its data in the run directory.
fn prometheus<'b>(bed: &'b Bed, cp: &Node, targets: &[(&str, String)]) -> Proc<'b> {
    let dir = bed.dir().join("prometheus");
    std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
    let mut config =
        String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n");
    for (pod, addr) in targets {
        // The pod and app labels as Kubernetes service discovery and Istio's scrape
        // configuration attach them.
        config.push_str(&format!(
            "  - job_name: {pod}\n    metrics_path: /stats/prometheus\n    static_configs:\n      - targets: ['{addr}']\n        labels: {{pod: {pod}, app: ambit, namespace: istio-system}}\n"
        ));
    }
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, config).expect("prometheus.yml");
    let bin = prometheus_bin();
    let argv = [
        bin.to_str().expect("utf-8").to_string(),
        format!("--config.file={}", file.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={PROMETHEUS}"),
        "--storage.tsdb.retention.time=1h".into(),
    ];
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut p = Proc::spawn(bed, "prometheus", node_command(cp, &argv));
    p.wait_for_output("Server is ready to receive web requests", T).expect("prometheus starts");
    p
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's result vector.
fn query(cp: &Node, q: &str) -> Vec<Value> {
    let addr: SocketAddr = PROMETHEUS.parse().expect("addr");
    let (status, body) =
        netns::http(&cp.netns_path(), "GET", addr, &format!("/api/v1/query?query={}", encode(q)))
            .unwrap_or_else(|e| panic!("querying {q}: {e}"));
    assert_eq!(status, 200, "{q}: {body}");
    let v: Value = serde_json::from_str(body.split("\r\n\r\n").last().unwrap_or(&body)).expect("JSON");
    assert_eq!(v["status"], "success", "{q}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The value of a result row.
fn value(row: &Value) -> f64 {
    row["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

/// Kiali's group-by for TCP edges (graph/telemetry/istio).
const KIALI_GROUP: &str =
    "app,source_cluster,source_workload_namespace,source_workload,source_canonical_service,\
source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,\
destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,\
destination_canonical_revision,response_flags";

/// The labels without which Kiali skips a TCP series.
const KIALI_REQUIRED: [&str; 12] = [
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "response_flags",
];

#[test]
fn kiali_s_graph_and_istio_s_dashboards_see_the_bed_s_traffic() {
    let bed = Bed::new("dashboards");
    let (n1, n2, cpn) = (bed.node("n1"), bed.node("n2"), bed.node("cp"));
    bed.link(&n1, &n2);
    let (_, n1_side) = bed.link(&cpn, &n1);
    let (_, n2_side) = bed.link(&cpn, &n2);
    let (a, b) = (bed.pod(&n1, "a"), bed.pod(&n2, "b"));
    let mesh_path = bed.dir().join("mesh.yaml");
    // a: canonical service and revision from app/version; b: from Istio's own labels, which
    // win over app.kubernetes.io/name and app.
    let mesh = Mesh::default()
        .namespace("demo", &[AMBIENT])
        .pod_with_sa(&a, "demo", &[("app", "client"), ("version", "v1")], "client")
        .pod_with_sa(
            &b,
            "demo",
            &[
                ("app", "web"),
                ("app.kubernetes.io/name", "web-app"),
                ("service.istio.io/canonical-name", "web-canonical"),
                ("service.istio.io/canonical-revision", "v2"),
            ],
            "server",
        )
        .service("web", "demo", &[VIP], &[(80, 8080)], &[("app", "web")]);
    ambit_testbed::ambit::write_mesh(&mesh_path, &mesh.yaml());
    let cp = ControlPlane::start(&bed, &cpn, &mesh_path, &[&n1, &n2], &[]);
    let p1 = cp.start_node(&n1, &mesh_path, &[]);
    // n2 reports as ztunnel does, for the version panel of ztunnel's dashboard.
    let _p2 = cp.start_node(&n2, &mesh_path, &["--metrics-component", "ztunnel"]);
    let _web = http_server(&bed, &b, "web\n");
    let _prom = prometheus(
        &bed,
        &cpn,
        &[
            ("ambit-n1", format!("{}:15020", link_ipv4(&n1, &n1_side))),
            ("ambit-n2", format!("{}:15020", link_ipv4(&n2, &n2_side))),
        ],
    );
    // Both proxies scraped before there is traffic: a rate needs a series seen growing.
    assert!(eventually(SLOW, || query(&cpn, "up == 1").len() == 2), "targets down: {:?}", query(&cpn, "up"));
    // Traffic: to the pod directly, and through the service (more of it while the queries
    // run: Kiali keeps only edges whose rate is above zero).
    assert_eq!(ok_body(&curl(&a, &format!("http://{}:8080/", b.ipv4))), "web\n");
    let through_service = || assert_eq!(ok_body(&curl(&a, &format!("http://{VIP}/"))), "web\n");
    through_service();

    // Kiali's namespace graph (namespace demo, 1m, defaults: ambient traffic included), its
    // destination- and source-reported queries; with every label it requires.
    let kiali = [
        format!("round(sum(rate(istio_tcp_received_bytes_total{{reporter=~\"waypoint|destination\",destination_workload_namespace=\"demo\"}} [60s])) by ({KIALI_GROUP}) > 0,0.001)"),
        format!("round(sum(rate(istio_tcp_received_bytes_total{{reporter=~\"waypoint|source\",source_workload_namespace=\"demo\"}} [60s])) by ({KIALI_GROUP}) > 0,0.001)"),
        format!("round(sum(rate(istio_tcp_sent_bytes_total{{reporter=~\"waypoint|destination\",destination_workload_namespace=\"demo\"}} [60s])) by ({KIALI_GROUP}) > 0,0.001)"),
    ];
    for q in &kiali {
        let has_service_edge =
            |rows: &[Value]| rows.iter().any(|r| r["metric"]["destination_service"] == HOST);
        let found = eventually(SLOW, || {
            through_service();
            has_service_edge(&query(&cpn, q))
        });
        assert!(found, "no edge to {HOST} for {q}: {:#?}", query(&cpn, q));
        let rows = query(&cpn, q);
        // From a (client v1) to b (web-canonical v2), through the service and directly.
        let service_edge =
            rows.iter().find(|r| r["metric"]["destination_service"] == HOST).expect("the service edge");
        for row in &rows {
            let m = &row["metric"];
            for label in KIALI_REQUIRED {
                let v = m[label].as_str().unwrap_or("");
                assert!(!v.is_empty(), "{label} missing (Kiali would skip the series): {m}");
            }
            assert_eq!(m["source_workload"], "a", "{m}");
            assert_eq!(m["source_canonical_service"], "client", "{m}");
            assert_eq!(m["source_canonical_revision"], "v1", "{m}");
            assert_eq!(m["destination_workload"], "b", "{m}");
            assert_eq!(m["destination_canonical_service"], "web-canonical", "{m}");
            assert_eq!(m["destination_canonical_revision"], "v2", "{m}");
            assert_eq!(m["source_cluster"], "Kubernetes", "{m}");
            assert_eq!(m["response_flags"], "-", "{m}");
            assert!(value(row) > 0.0, "{row}");
        }
        assert_eq!(service_edge["metric"]["destination_service_name"], "web");
        assert_eq!(service_edge["metric"]["destination_service_namespace"], "demo");
    }
    // Both ends name the service: the destination reports it too (from ztunnel's `host=`),
    // and for the direct connection as well (guessed from the port, as ztunnel does).
    let opened = |reporter: &str| {
        let q = format!(
            "sum(istio_tcp_connections_opened_total{{reporter=\"{reporter}\",destination_service=\"{HOST}\"}})"
        );
        query(&cpn, &q).first().map(value).unwrap_or(0.0)
    };
    let sent = || access_lines(&p1, &["direction=outbound", "security=mutual_tls"]) as f64;
    assert!(
        eventually(T, || opened("source") == sent() - 1.0 && opened("destination") == sent()),
        "source {} and destination {} of {} connections (one direct)",
        opened("source"),
        opened("destination"),
        sent()
    );

    // Istio's Workload dashboard (namespace demo, workload b, reporter destination): inbound
    // TCP by source workload, over mTLS.
    let workload = "round(sum(irate(istio_tcp_received_bytes_total{reporter=~\"destination\", connection_security_policy=\"mutual_tls\", destination_workload_namespace=~\"demo\", destination_workload=~\"b\", source_workload=~\"a\", source_workload_namespace=~\"demo\"}[1m])) by (source_workload, source_workload_namespace), 0.001)";
    // Its outbound panel for a, and the Service dashboard's server traffic for web.
    let outbound = format!("round(sum(irate(istio_tcp_received_bytes_total{{connection_security_policy=\"mutual_tls\", reporter=\"source\", source_workload_namespace=~\"demo\", source_workload=~\"a\", destination_service=~\"{HOST}\"}}[1m])) by (destination_service), 0.001)");
    let service = format!("round(sum(irate(istio_tcp_sent_bytes_total{{connection_security_policy=\"mutual_tls\", reporter=\"destination\", destination_service=~\"{HOST}\", destination_workload=~\"b\", destination_workload_namespace=~\"demo\"}}[1m])) by (destination_workload, destination_workload_namespace), 0.001)");
    for (what, q, label, want) in [
        ("workload inbound", workload.to_string(), "source_workload", "a"),
        ("workload outbound", outbound, "destination_service", HOST),
        ("service", service, "destination_workload", "b"),
    ] {
        // irate needs two samples that differ: more traffic while Prometheus scrapes.
        let found = eventually(SLOW, || {
            through_service();
            query(&cpn, &q).iter().any(|r| r["metric"][label] == want && value(r) > 0.0)
        });
        assert!(found, "{what}: nothing for {q}: {:?}", query(&cpn, &q));
    }
    // The ztunnel dashboard's connection panel, by the pod label the scrape attaches.
    let per_pod = query(&cpn, "sum by (pod) (istio_tcp_connections_opened_total)");
    let pods: Vec<&str> = per_pod.iter().filter_map(|r| r["metric"]["pod"].as_str()).collect();
    assert!(pods.contains(&"ambit-n1") && pods.contains(&"ambit-n2"), "{per_pod:?}");
    // Its version panel, on the proxy told to report as ztunnel (and only that one).
    let versions = query(&cpn, "sum(istio_build{component=\"ztunnel\"}) by (tag, pod)");
    let pods: Vec<&str> = versions.iter().filter_map(|r| r["metric"]["pod"].as_str()).collect();
    assert_eq!(pods, ["ambit-n2"], "{versions:?}");
}
