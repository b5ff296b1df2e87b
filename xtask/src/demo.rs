//! `cargo xtask demo`: one node, three pods, the embedded eBPF capture, real traffic, and
//! what the proxy saw. Everything lives in network namespaces and is torn down at the end
//! (or at Ctrl-C with `--keep`).

use std::{process::Command, time::Duration};

use anyhow::bail;

use ambit_testbed::{
    ambit::{sample_value, write_mesh},
    exec::{node_command, run_with_timeout},
    mesh::{Mesh, AMBIENT},
    pod_command, Ambit, Bed, Pod,
};

const T: Duration = Duration::from_secs(20);

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}/6] {text}\x1b[0m");
}

fn curl(cmd: Command, label: &str) -> anyhow::Result<String> {
    let out = run_with_timeout(cmd, T)?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        bail!("{label}: curl failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    println!("  {label:<44} -> {body:?}");
    Ok(body)
}

fn pod_curl(pod: &Pod, url: &str, label: &str) -> anyhow::Result<String> {
    curl(pod_command(pod, &["curl", "-sS", "--max-time", "5", url]), label)
}

/// The proxy's access-log lines, trimmed to the interesting fields.
fn access_log(ambit: &Ambit, skip: usize) -> usize {
    let log = ambit.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" access: ")).collect();
    for l in lines.iter().skip(skip) {
        let fields: Vec<&str> = l
            .split_whitespace()
            .filter(|f| {
                ["direction=", "namespace=", "pod=", "src=", "dst=", "bytes_"]
                    .iter()
                    .any(|p| f.starts_with(p))
            })
            .collect();
        println!("  access: {}", fields.join(" "));
    }
    lines.len()
}

fn kernel_counters(ambit: &Ambit) {
    let m = ambit.metrics();
    let line: Vec<String> =
        ["connect_captured", "connect_not_enrolled", "inbound_assigned", "inbound_node_bypass"]
            .iter()
            .map(|e| {
                format!("{e}={}", sample_value(&m, &format!("ambit_capture_events_total{{event=\"{e}\"}}")))
            })
            .collect();
    println!("  eBPF counters: {}", line.join(" "));
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    println!("\x1b[1mambit demo\x1b[0m: in-pod eBPF capture into the node proxy — no iptables, no sidecars");
    let bed = Bed::new("demo");
    let node = bed.node("n1");
    let client = bed.pod(&node, "client");
    let server = bed.pod(&node, "server");
    let outsider = bed.pod(&node, "outsider");
    step(1, "a node and three pods (network namespaces on this machine)");
    for (p, ns, enrolled) in [(&client, "demo", true), (&server, "demo", true), (&outsider, "plain", false)] {
        println!(
            "  {:<9} ns={ns:<6} {:<10} {:<15} netns {}",
            p.name,
            if enrolled { "enrolled" } else { "-" },
            p.ipv4,
            p.netns
        );
    }
    let mesh_path = bed.dir().join("mesh.yaml");
    let mesh = Mesh::default()
        .namespace("demo", &[AMBIENT])
        .namespace("plain", &[])
        .pod(&client, "demo", &[])
        .pod(&server, "demo", &[])
        .pod(&outsider, "plain", &[]);
    write_mesh(&mesh_path, &mesh.yaml());

    step(2, "ambit node starts in the node's namespace and attaches its eBPF programs");
    let ambit = Ambit::start(&bed, &node, &mesh_path, &[]);
    let dump = ambit.config_dump();
    println!("  ready; pinned state in {}", dump["capture"]["pin_dir"].as_str().unwrap_or("?"));
    for p in dump["pods"].as_array().into_iter().flatten() {
        println!(
            "  enrolled {}/{}: netns cookie {}, listeners {}",
            p["namespace"].as_str().unwrap_or(""),
            p["name"].as_str().unwrap_or(""),
            p["netns_cookie"],
            p["listeners"]
        );
    }
    let http = ambit_testbed::apps::http_server(&bed, &server, "hello from the server pod\n");

    step(3, "client -> server, IPv4 and IPv6: captured on both ends");
    pod_curl(&client, &format!("http://{}:8080/", server.ipv4), "client -> server (IPv4)")?;
    pod_curl(&client, &format!("http://[{}]:8080/", server.ipv6), "client -> server (IPv6)")?;
    std::thread::sleep(Duration::from_millis(200));
    let mut seen = access_log(&ambit, 0);
    kernel_counters(&ambit);

    step(4, "kubelet-style probe from the node, and a client that is not enrolled");
    curl(
        node_command(&node, &["curl", "-sS", "--max-time", "5", &format!("http://{}:8080/", server.ipv4)]),
        "node (kubelet) -> server: not captured",
    )?;
    pod_curl(&outsider, &format!("http://{}:8080/", server.ipv4), "outsider -> server: inbound captured")?;
    std::thread::sleep(Duration::from_millis(200));
    seen = access_log(&ambit, seen);
    kernel_counters(&ambit);

    step(5, "unenrolling namespace demo by editing the mesh file (no restart)");
    write_mesh(&mesh_path, &mesh.clone().relabel_namespace("demo", &[]).yaml());
    let gone =
        ambit_testbed::eventually(T, || ambit.config_dump()["pods"].as_array().is_some_and(Vec::is_empty));
    if !gone {
        bail!("the pods were not unenrolled");
    }
    pod_curl(&client, &format!("http://{}:8080/", server.ipv4), "client -> server: direct now")?;
    std::thread::sleep(Duration::from_millis(200));
    let after = access_log(&ambit, seen);
    if after != seen {
        bail!("a connection was captured after unenrolment");
    }
    println!("  (no new access-log line: the connection went direct)");
    kernel_counters(&ambit);
    write_mesh(&mesh_path, &mesh.yaml());
    ambit_testbed::eventually(T, || ambit.config_dump()["pods"].as_array().map(Vec::len) == Some(2));

    step(6, if keep { "the mesh stays up: explore, then Ctrl-C" } else { "tearing down" });
    if keep {
        println!("  mesh file (edit it live):  {}", mesh_path.display());
        println!("  proxy log:                 {}", ambit.proc.log.display());
        println!(
            "  a shell in the client pod: sh -c 'echo $$ > {}/cgroup.procs; exec nsenter --net={} bash'",
            client.cgroup.display(),
            client.netns_path().display()
        );
        println!("  then e.g.:                 curl http://{}:8080/", server.ipv4);
        let ns = node.netns_path().display().to_string();
        println!("  metrics:                   nsenter --net={ns} curl -s localhost:15020/stats/prometheus");
        println!("  config dump:               nsenter --net={ns} curl -s localhost:15000/config_dump");
        println!("  Ctrl-C tears everything down.");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    drop(http);
    drop(ambit);
    drop(bed);
    println!("  done: namespaces, cgroups and pins removed");
    Ok(())
}
