//! The benchmark's bed (docs/benchmark.md, "Method"): nodes A and B joined by a
//! veth link (MTU 1500), a control plane, and for each configuration its own client pod on A
//! and server pods on B (cross-node) and on A (same node) — so the configurations run side
//! by side, unchanged, and a round only chooses which pods to drive.
//!
//! - `direct`: nothing in the way;
//! - `relay`: a plain userspace relay per node with its listeners in the pods' namespaces,
//!   fed by iptables REDIRECT there;
//! - `splice`: the same relay moving bytes with `splice(2)`, no userspace copy: the floor of
//!   what a proxy that terminates TCP costs (cross-node, no connection rate);
//! - `ambit`: the pods' namespace is enrolled: eBPF capture and HBONE mTLS between proxies.

use std::time::Duration;

use anyhow::{bail, Context};

use ambit_testbed::{
    ambit::write_mesh,
    controlplane::ControlPlane,
    exec::{node_command, workspace_bin},
    mesh::{Mesh, AMBIENT},
    netns, pod_command, Ambit, Bed, Node, Pod, Proc,
};

use super::load::{ECHO_PORT, IPERF_PORT};

const T: Duration = Duration::from_secs(30);
const PROXY_MARK: &str = "0x539";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Config {
    Direct,
    Relay,
    Splice,
    Ambit,
}

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::Relay => "relay",
            Config::Splice => "splice",
            Config::Ambit => "ambit",
        }
    }
}

/// One configuration's pods.
pub struct Pods {
    pub client: Pod,
    /// On node B.
    pub cross: Pod,
    /// On node A, beside the client.
    pub same: Pod,
}

pub struct Topology<'b> {
    pub bed: &'b Bed,
    pub a: Node,
    pub b: Node,
    pub direct: Pods,
    pub relay: Pods,
    pub splice: Pods,
    pub ambit: Pods,
    pub ambit_a: Ambit<'b>,
    pub ambit_b: Ambit<'b>,
    pub relay_a: Proc<'b>,
    pub relay_b: Proc<'b>,
    pub splice_a: Proc<'b>,
    pub splice_b: Proc<'b>,
    _cp: ControlPlane<'b>,
    _servers: Vec<Proc<'b>>,
}

/// Room for 10,000 held connections next to the TIME_WAIT sockets of the connection-rate
/// runs: the full ephemeral range, and TIME_WAIT ports reused for new connects.
fn widen_ports(pod: &Pod) -> anyhow::Result<()> {
    for kv in ["net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", pod.netns.as_str(), "sysctl", "-q", "-w", kv])
            .output()
            .context("running sysctl")?;
        if !out.status.success() {
            bail!("sysctl {kv} in {}: {}", pod.netns, String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

fn pods(bed: &Bed, a: &Node, b: &Node, prefix: &str) -> anyhow::Result<Pods> {
    let p = Pods {
        client: bed.pod(a, &format!("{prefix}c")),
        cross: bed.pod(b, &format!("{prefix}s")),
        same: bed.pod(a, &format!("{prefix}s2")),
    };
    for pod in [&p.client, &p.cross, &p.same] {
        widen_ports(pod)?;
    }
    Ok(p)
}

fn servers<'b>(bed: &'b Bed, p: &Pods) -> anyhow::Result<Vec<Proc<'b>>> {
    let mut out = Vec::new();
    for pod in [&p.cross, &p.same] {
        let port = IPERF_PORT.to_string();
        let mut iperf = Proc::spawn(
            bed,
            &format!("iperf3-{}", pod.name),
            pod_command(pod, &["iperf3", "-s", "-p", &port, "--forceflush"]),
        );
        iperf.wait_for_output("Server listening", T).context("iperf3 server")?;
        out.push(iperf);
        let bin = workspace_bin("bench-tool");
        let addr = format!("0.0.0.0:{ECHO_PORT}");
        let mut echo = Proc::spawn(
            bed,
            &format!("echo-{}", pod.name),
            pod_command(pod, &[bin.to_str().expect("utf-8"), "echo", &addr]),
        );
        echo.wait_for_output("listening", T).context("echo server")?;
        out.push(echo);
    }
    Ok(out)
}

/// REDIRECT capture in a pod's namespace: its outbound TCP (except loopback and the relay's
/// own marked sockets) to 15001, everything arriving to 15006.
fn iptables_capture(pod: &Pod) -> anyhow::Result<()> {
    let ns = pod.netns.as_str();
    for rule in [
        vec![
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-d",
            "127.0.0.0/8",
            "-m",
            "mark",
            "!",
            "--mark",
            PROXY_MARK,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
        vec!["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15006"],
    ] {
        let mut argv = vec!["ip", "netns", "exec", ns, "iptables"];
        argv.extend(rule);
        let out =
            std::process::Command::new(argv[0]).args(&argv[1..]).output().context("running iptables")?;
        if !out.status.success() {
            bail!("iptables in {ns}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

fn relay<'b>(bed: &'b Bed, node: &Node, pods: &[&Pod], splice: bool) -> anyhow::Result<Proc<'b>> {
    let bin = workspace_bin("bench-relay");
    let paths: Vec<String> = pods.iter().map(|p| p.netns_path().display().to_string()).collect();
    let mut argv = vec![bin.to_str().expect("utf-8")];
    if splice {
        argv.push("--splice");
    }
    argv.push(PROXY_MARK);
    argv.extend(paths.iter().map(String::as_str));
    let name = format!("{}-{}", if splice { "splice" } else { "relay" }, node.name);
    let mut p = Proc::spawn(bed, &name, node_command(node, &argv));
    p.wait_for_output("relaying", T).context("bench-relay starts")?;
    Ok(p)
}

impl<'b> Topology<'b> {
    pub fn build(bed: &'b Bed) -> anyhow::Result<Topology<'b>> {
        let (a, b, cp_node) = (bed.node("a"), bed.node("b"), bed.node("cp"));
        bed.link(&a, &b);
        bed.link(&cp_node, &a);
        bed.link(&cp_node, &b);
        let direct = pods(bed, &a, &b, "d")?;
        let relay_pods = pods(bed, &a, &b, "r")?;
        let splice_pods = pods(bed, &a, &b, "p")?;
        let ambit_pods = pods(bed, &a, &b, "m")?;
        let mut srv = Vec::new();
        for p in [&direct, &relay_pods, &splice_pods, &ambit_pods] {
            srv.extend(servers(bed, p)?);
        }
        for p in [&relay_pods, &splice_pods] {
            for pod in [&p.client, &p.cross, &p.same] {
                iptables_capture(pod)?;
            }
        }
        let relay_a = relay(bed, &a, &[&relay_pods.client, &relay_pods.same], false)?;
        let relay_b = relay(bed, &b, &[&relay_pods.cross], false)?;
        let splice_a = relay(bed, &a, &[&splice_pods.client, &splice_pods.same], true)?;
        let splice_b = relay(bed, &b, &[&splice_pods.cross], true)?;
        let mesh = bed.dir().join("mesh.yaml");
        write_mesh(
            &mesh,
            &Mesh::default()
                .namespace("bench", &[AMBIENT])
                .pod_with_sa(&ambit_pods.client, "bench", &[("app", "client")], "client")
                .pod_with_sa(&ambit_pods.cross, "bench", &[("app", "server")], "server")
                .pod_with_sa(&ambit_pods.same, "bench", &[("app", "server")], "server")
                .yaml(),
        );
        let cp = ControlPlane::start(bed, &cp_node, &mesh, &[&a, &b], &[]);
        let start = |node: &Node| {
            let mut args = cp.node_args(node);
            // The access log of every connection would measure the log, not the proxy.
            args.extend(["--log-level".into(), "warn".into()]);
            // Experiments: more `ambit node` flags (e.g. "--worker-threads 1").
            if let Ok(extra) = std::env::var("AMBIT_BENCH_NODE_ARGS") {
                args.extend(extra.split_whitespace().map(String::from));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Ambit::start(bed, node, &mesh, &args)
        };
        let (ambit_a, ambit_b) = (start(&a), start(&b));
        Ok(Topology {
            bed,
            a,
            b,
            direct,
            relay: relay_pods,
            splice: splice_pods,
            ambit: ambit_pods,
            ambit_a,
            ambit_b,
            relay_a,
            relay_b,
            splice_a,
            splice_b,
            _cp: cp,
            _servers: srv,
        })
    }

    pub fn pods(&self, c: Config) -> &Pods {
        match c {
            Config::Direct => &self.direct,
            Config::Relay => &self.relay,
            Config::Splice => &self.splice,
            Config::Ambit => &self.ambit,
        }
    }

    /// The proxy processes a configuration's traffic runs through (none for direct).
    pub fn proxy_pids(&self, c: Config) -> Vec<u32> {
        match c {
            Config::Direct => vec![],
            Config::Relay => vec![self.relay_a.pid(), self.relay_b.pid()],
            Config::Splice => vec![self.splice_a.pid(), self.splice_b.pid()],
            Config::Ambit => vec![self.ambit_a.proc.pid(), self.ambit_b.proc.pid()],
        }
    }

    /// Kernel tracing on or off in both ambit proxies (admin `/tracing`).
    pub fn ambit_tracing(&self, on: bool) -> anyhow::Result<()> {
        for node in [&self.a, &self.b] {
            let path = format!("/tracing?enabled={on}");
            let (status, body) =
                netns::http(&node.netns_path(), "POST", "127.0.0.1:15000".parse().expect("addr"), &path)?;
            if status != 200 {
                bail!("switching tracing on {}: {status} {body}", node.name);
            }
        }
        Ok(())
    }
}
