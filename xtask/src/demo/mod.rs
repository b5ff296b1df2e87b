//! `cargo xtask demo`: two nodes and a control plane (xDS and the mesh CA) in network
//! namespaces, four pods and a service, eBPF capture, mTLS HBONE tunnels with workload
//! identities, and what each proxy saw.
//! Everything is torn down at the end (or at Ctrl-C with `--keep`).
//!
//! `--istiod` tells the same story with the real Kubernetes API server and istiod (`istiod`).

pub mod istiod;

use std::{process::Command, time::Duration};

use anyhow::bail;

use ambit_testbed::{
    ambit::{sample_value, write_mesh},
    apps::http_server,
    controlplane::ControlPlane,
    exec::{kubelet_command, node_command, run_with_timeout, workspace_bin},
    mesh::{Mesh, AMBIENT},
    pod_command, Ambit, Bed, Node, Pod, Proc,
};

const T: Duration = Duration::from_secs(20);
const STEPS: u32 = 11;
const VIP: &str = "10.96.0.10";

fn step(n: u32, text: &str) {
    step_of(n, STEPS, text);
}

pub(crate) fn step_of(n: u32, of: u32, text: &str) {
    println!("\n\x1b[1m[{n}/{of}] {text}\x1b[0m");
}

pub(crate) fn curl(cmd: Command, label: &str) -> anyhow::Result<String> {
    let out = run_with_timeout(cmd, T)?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        bail!("{label}: curl failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    println!("  {label:<48} -> {body:?}");
    Ok(body)
}

pub(crate) fn pod_curl(pod: &Pod, url: &str, label: &str) -> anyhow::Result<String> {
    curl(pod_command(pod, &["curl", "-sS", "--max-time", "5", url]), label)
}

/// Prints a proxy's access-log lines after the first `skip`, trimmed to what matters;
/// returns how many there are.
pub(crate) fn access_log(node: &str, ambit: &Ambit, skip: usize) -> usize {
    let log = ambit.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" access: ")).collect();
    for l in lines.iter().skip(skip) {
        let keep = [
            "direction=",
            "pod=",
            "src=",
            "dst=",
            "src_identity=",
            "dst_identity=",
            "dst_service=",
            "security=",
            "policy=",
        ];
        let fields: Vec<String> = l
            .split_whitespace()
            .filter(|f| keep.iter().any(|p| f.starts_with(p)) && *f != "dst_service=-")
            .map(|f| f.replace("spiffe://cluster.local/", ""))
            .collect();
        let what = if l.contains("connection denied") { "DENIED" } else { "access" };
        println!("  {node} {what}: {}", fields.join(" "));
    }
    lines.len()
}

fn kernel_counters(node: &str, ambit: &Ambit) {
    let m = ambit.metrics();
    let line: Vec<String> =
        ["connect_captured", "connect_not_enrolled", "inbound_assigned", "inbound_kubelet_probe"]
            .iter()
            .map(|e| {
                format!("{e}={}", sample_value(&m, &format!("ambit_capture_events_total{{event=\"{e}\"}}")))
            })
            .collect();
    println!("  {node} eBPF counters: {}", line.join(" "));
}

/// A few `istio_tcp_*` series of a proxy's scrape, with the labels that tell the story.
fn metrics_excerpt(node: &str, ambit: &Ambit) {
    let scrape = ambit.metrics();
    let keep = [
        "reporter",
        "source_workload",
        "destination_workload",
        "destination_service",
        "response_flags",
        "connection_security_policy",
    ];
    let mut shown = 0;
    for line in scrape.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total{")
            || l.starts_with("istio_tcp_connections_failed_total{")
    }) {
        let Some((name, rest)) = line.split_once('{') else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let labels: Vec<&str> =
            labels.split(',').filter(|kv| keep.iter().any(|k| kv.starts_with(&format!("{k}=")))).collect();
        println!("  {node} {name}{{{}}} {value}", labels.join(","));
        shown += 1;
        if shown == 6 {
            break;
        }
    }
    println!("  (all of it: nsenter --net=<node netns> curl -s localhost:15020/stats/prometheus)");
}

/// `ambit trace` on `node` while `client` calls `server`: the first lines of what it streams.
fn trace_excerpt(bed: &Bed, node: &Node, client: &Pod, server: &Pod) -> anyhow::Result<()> {
    let bin = workspace_bin("ambit");
    let argv = [
        bin.to_str().unwrap_or("ambit"),
        "trace",
        "--timeout",
        "20s",
        "--output",
        "text",
        "--workload",
        "demo/client",
    ];
    let mut trace = Proc::spawn(bed, "demo-trace", node_command(node, &argv));
    trace.wait_for_output("streaming kernel events", T)?;
    pod_curl(client, &format!("http://{}:8080/", server.ipv4), "client -> server, traced")?;
    std::thread::sleep(Duration::from_secs(1));
    let out = trace.output();
    for line in out.lines().filter(|l| !l.trim().is_empty() && !l.contains("streaming kernel events")).take(8)
    {
        println!("  {line}");
    }
    Ok(())
}

pub(crate) fn settle() {
    std::thread::sleep(Duration::from_millis(200));
}

fn start<'b>(bed: &'b Bed, cp: &ControlPlane<'b>, node: &Node, mesh: &std::path::Path) -> Ambit<'b> {
    let args = cp.node_args(node);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ambit::start(bed, node, mesh, &args)
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    println!(
        "\x1b[1mambit demo\x1b[0m: in-pod eBPF capture, mTLS HBONE between node proxies, workload identities — \
         no iptables, no sidecars"
    );
    let bed = Bed::new("demo");
    let (n1, n2, cpn) = (bed.node("n1"), bed.node("n2"), bed.node("cp"));
    bed.link(&n1, &n2);
    bed.link(&cpn, &n1);
    bed.link(&cpn, &n2);
    let client = bed.pod(&n1, "client");
    let neighbour = bed.pod(&n1, "neighbour");
    let outsider = bed.pod(&n1, "outsider");
    let server = bed.pod(&n2, "server");
    step(1, "two nodes, a control plane, four pods (network namespaces on this machine)");
    for (p, ns, sa) in [
        (&client, "demo", "client"),
        (&neighbour, "demo", "neighbour"),
        (&outsider, "plain", "default"),
        (&server, "demo", "server"),
    ] {
        let enrolled = if ns == "demo" { "enrolled" } else { "-" };
        println!("  {:<10} node={} ns={ns:<6} sa={sa:<10} {enrolled:<9} {}", p.name, p.node, p.ipv4);
    }
    let mesh_path = bed.dir().join("mesh.yaml");
    let mesh = Mesh::default()
        .namespace("demo", &[AMBIENT])
        .namespace("plain", &[])
        .pod_with_sa(&client, "demo", &[], "client")
        .pod_with_sa(&neighbour, "demo", &[("app", "hello")], "neighbour")
        .pod(&outsider, "plain", &[])
        .pod_with_sa(&server, "demo", &[("app", "hello")], "server")
        .service("hello", "demo", &[VIP], &[(80, 8080)], &[("app", "hello")]);
    write_mesh(&mesh_path, &mesh.yaml());

    println!("  service hello.demo at {VIP}:80 -> pods labelled app=hello (neighbour, server), port 8080");

    step(2, "the control plane serves the mesh over xDS and signs each node proxy's pod identities");
    let cp = ControlPlane::start(&bed, &cpn, &mesh_path, &[&n1, &n2], &[]);
    println!("  CA at {} (root in {})", cp.address, cp.root_cert.display());
    let p1 = start(&bed, &cp, &n1, &mesh_path);
    let p2 = start(&bed, &cp, &n2, &mesh_path);
    for (name, p) in [("n1", &p1), ("n2", &p2)] {
        for c in p.config_dump()["certificates"].as_array().into_iter().flatten() {
            println!(
                "  {name}: {} serial {} valid until {}",
                c["identity"].as_str().unwrap_or(""),
                c["certificate"]["serial"].as_str().unwrap_or("-"),
                c["certificate"]["not_after"].as_str().unwrap_or("-")
            );
        }
    }
    let _http_server = http_server(&bed, &server, "hello from the server pod on n2\n");
    let _http_neighbour = http_server(&bed, &neighbour, "hello from the neighbour on n1\n");

    step(3, "client (n1) -> server (n2): an mTLS tunnel between the node proxies, identities on both ends");
    pod_curl(&client, &format!("http://{}:8080/", server.ipv4), "client -> server (IPv4)")?;
    pod_curl(&client, &format!("http://[{}]:8080/", server.ipv6), "client -> server (IPv6)")?;
    settle();
    let (mut s1, mut s2) = (access_log("n1", &p1, 0), access_log("n2", &p2, 0));

    step(4, "client -> neighbour on the same node: tunnelled too, with identity");
    pod_curl(&client, &format!("http://{}:8080/", neighbour.ipv4), "client -> neighbour")?;
    settle();
    s1 = access_log("n1", &p1, s1);

    step(5, "client -> the service VIP: spread over both endpoints, on both nodes");
    for i in 1..=4 {
        pod_curl(&client, &format!("http://{VIP}/"), &format!("client -> hello.demo ({VIP}), request {i}"))?;
    }
    settle();
    s1 = access_log("n1", &p1, s1);
    s2 = access_log("n2", &p2, s2);

    step(6, "a pod outside the mesh, and the kubelet's probe from the node");
    pod_curl(
        &outsider,
        &format!("http://{}:8080/", server.ipv4),
        "outsider -> server: plaintext, captured inbound",
    )?;
    curl(
        kubelet_command(&n2, &["curl", "-sS", "--max-time", "5", &format!("http://{}:8080/", server.ipv4)]),
        "node n2's kubelet -> server: a health probe, not captured",
    )?;
    settle();
    s1 = access_log("n1", &p1, s1);
    s2 = access_log("n2", &p2, s2);
    kernel_counters("n1", &p1);
    kernel_counters("n2", &p2);
    for (name, p) in [("n1", &p1), ("n2", &p2)] {
        for pool in p.config_dump()["hbone_pools"].as_array().into_iter().flatten() {
            let conns = pool["connections"].as_array().map(Vec::len).unwrap_or(0);
            println!(
                "  {name} HBONE pool {} -> {}: {conns} connection(s)",
                pool["src_ip"].as_str().unwrap_or(""),
                pool["dst_ip"].as_str().unwrap_or("")
            );
        }
    }

    step(7, "a policy: only the client's identity may call hello (AuthorizationPolicy in the mesh file)");
    let allow_client = "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata:\n      \
        name: hello-from-client\n      namespace: demo\n    spec:\n      selector:\n        matchLabels:\n          \
        app: hello\n      action: ALLOW\n      rules:\n        - from:\n            - source:\n                \
        principals: [cluster.local/ns/demo/sa/client]\n";
    let policed = mesh.clone().policies(allow_client);
    write_mesh(&mesh_path, &policed.yaml());
    // Served to the destination's proxy, which enforces it.
    let served = ambit_testbed::eventually(T, || {
        p2.config_dump()["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "hello-from-client"))
    });
    if !served {
        bail!("the policy did not reach n2");
    }
    let out = run_with_timeout(
        pod_command(
            &neighbour,
            &["curl", "-sS", "--max-time", "3", &format!("http://{}:8080/", server.ipv4)],
        ),
        T,
    )?;
    if out.status.success() {
        bail!("the policy did not deny the neighbour");
    }
    println!("  {:<48} -> refused (connection reset)", "neighbour -> server");
    pod_curl(&client, &format!("http://{}:8080/", server.ipv4), "client -> server: still allowed")?;
    settle();
    s1 = access_log("n1", &p1, s1);
    s2 = access_log("n2", &p2, s2);

    step(8, "Istio's metrics, as Prometheus, Kiali and Istio's dashboards read them (n2, excerpt)");
    metrics_excerpt("n2", &p2);

    step(9, "ambit trace: the kernel's view of a connection, tied to the workloads (n1)");
    trace_excerpt(&bed, &n1, &client, &server)?;
    s1 = access_log("n1", &p1, s1);
    s2 = access_log("n2", &p2, s2);
    write_mesh(&mesh_path, &mesh.yaml());

    step(10, "unenrolling namespace demo by editing the mesh file (no restart)");
    write_mesh(&mesh_path, &mesh.clone().relabel_namespace("demo", &[]).yaml());
    let gone = ambit_testbed::eventually(T, || {
        [&p1, &p2].iter().all(|p| p.config_dump()["pods"].as_array().is_some_and(Vec::is_empty))
    });
    if !gone {
        bail!("the pods were not unenrolled");
    }
    pod_curl(&client, &format!("http://{}:8080/", server.ipv4), "client -> server: direct now")?;
    settle();
    if access_log("n1", &p1, s1) != s1 || access_log("n2", &p2, s2) != s2 {
        bail!("a connection was captured after unenrolment");
    }
    println!("  (no new access-log line: the connection went direct, and n1 dropped its certificates)");
    write_mesh(&mesh_path, &mesh.yaml());
    ambit_testbed::eventually(T, || p1.config_dump()["pods"].as_array().map(Vec::len) == Some(2));

    step(STEPS, if keep { "the mesh stays up: explore, then Ctrl-C" } else { "tearing down" });
    if keep {
        println!("  mesh file (edit it live):  {}", mesh_path.display());
        println!("  proxy logs:                {} {}", p1.proc.log.display(), p2.proc.log.display());
        println!(
            "  a shell in the client pod: sh -c 'echo $$ > {}/cgroup.procs; exec nsenter --net={} bash'",
            client.cgroup.display(),
            client.netns_path().display()
        );
        println!("  then e.g.:                 curl http://{}:8080/", server.ipv4);
        let ns = n1.netns_path().display().to_string();
        println!("  metrics:                   nsenter --net={ns} curl -s localhost:15020/stats/prometheus");
        println!("  config dump:               nsenter --net={ns} curl -s localhost:15000/config_dump");
        println!("  Ctrl-C tears everything down.");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    drop((p1, p2, cp, _http_server, _http_neighbour));
    drop(bed);
    println!("  done: namespaces, cgroups and pins removed");
    Ok(())
}
