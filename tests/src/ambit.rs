//! Running `ambit node` in a node namespace of the bed, and reading what it exposes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{
    bed::{Bed, Node},
    exec::{node_command, workspace_bin, Proc},
    netns,
};

const READY: &str = "127.0.0.1:15021";
const STATS: &str = "127.0.0.1:15020";
const ADMIN: &str = "127.0.0.1:15000";

/// Writes `yaml` to `path` atomically (a watcher never sees half a file).
pub fn write_mesh(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// A running node proxy.
pub struct Ambit<'b> {
    pub proc: Proc<'b>,
    pub node: Node,
    pub mesh: PathBuf,
    pub args: Vec<String>,
    /// Environment variables set for it (a DaemonSet's downward API: POD_NAME, ...).
    pub env: Vec<(String, String)>,
    bed: &'b Bed,
    starts: u32,
}

impl<'b> Ambit<'b> {
    /// The arguments of `ambit node` for `node` in this bed: the mesh file at `mesh`, the
    /// bed's cgroup and private bpffs, the node's name as instance.
    pub fn args(bed: &Bed, node: &Node, mesh: &Path, extra: &[&str]) -> Vec<String> {
        let mut with_mesh = vec!["--mesh-file", mesh.to_str().expect("utf-8 path")];
        with_mesh.extend_from_slice(extra);
        Self::base_args(bed, node, &with_mesh)
    }

    /// The arguments of `ambit node` for `node` with pods from the Kubernetes API described by
    /// `kubeconfig` (the bed's mock API).
    pub fn kube_args(bed: &Bed, node: &Node, kubeconfig: &Path, extra: &[&str]) -> Vec<String> {
        let mut kube =
            vec!["--pod-source", "kubernetes", "--kubeconfig", kubeconfig.to_str().expect("utf-8 path")];
        kube.extend_from_slice(extra);
        Self::base_args(bed, node, &kube)
    }

    fn base_args(bed: &Bed, node: &Node, extra: &[&str]) -> Vec<String> {
        [
            "node",
            "--node-name",
            &node.name,
            "--cgroup",
            &bed.cgroup().display().to_string(),
            "--kubelet-cgroup",
            &node.kubelet_cgroup.display().to_string(),
            "--bpffs",
            &bed.bpffs().display().to_string(),
            "--instance",
            &node.name,
            "--drain-timeout",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
    }

    /// `ambit node` for `node` as a command (for runs expected to fail at start).
    pub fn command(bed: &Bed, node: &Node, mesh: &Path, extra: &[&str]) -> std::process::Command {
        command(node, &Self::args(bed, node, mesh, extra))
    }

    /// Starts `ambit node` for `node` (see [`Ambit::args`]) and waits until it is ready.
    pub fn start(bed: &'b Bed, node: &Node, mesh: &Path, extra: &[&str]) -> Ambit<'b> {
        let args = Self::args(bed, node, mesh, extra);
        Self::start_with(bed, node, mesh, args)
    }

    /// Starts `ambit node` for `node` with exactly `args` (see [`Ambit::kube_args`]) and waits
    /// until it is ready. `mesh`: the mesh file it reads, if any (empty otherwise).
    pub fn start_with(bed: &'b Bed, node: &Node, mesh: &Path, args: Vec<String>) -> Ambit<'b> {
        Self::start_with_env(bed, node, mesh, args, Vec::new())
    }

    /// [`Ambit::start_with`] with environment variables.
    pub fn start_with_env(
        bed: &'b Bed,
        node: &Node,
        mesh: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Ambit<'b> {
        let mut a = Ambit {
            proc: spawn(bed, node, &args, &env, 1),
            node: node.clone(),
            mesh: mesh.to_path_buf(),
            args,
            env,
            bed,
            starts: 1,
        };
        a.wait_ready(Duration::from_secs(30));
        a
    }

    /// Starts a successor with `--takeover` (and `extra`) alongside this proxy, as an upgrade
    /// would, and waits until an endpoint answers ready (either process may answer).
    pub fn start_successor(&self, extra: &[&str]) -> Ambit<'b> {
        let mut args = self.args.clone();
        args.push("--takeover".into());
        args.extend(extra.iter().map(|s| s.to_string()));
        let starts = self.starts + 1;
        let mut a = Ambit {
            proc: spawn(self.bed, &self.node, &args, &self.env, starts),
            node: self.node.clone(),
            mesh: self.mesh.clone(),
            args,
            env: self.env.clone(),
            bed: self.bed,
            starts,
        };
        a.wait_ready(Duration::from_secs(30));
        a
    }

    /// Starts `ambit node` without waiting for readiness (to watch it become ready).
    pub fn spawn(bed: &'b Bed, node: &Node, mesh: &Path, extra: &[&str]) -> Ambit<'b> {
        let args = Self::args(bed, node, mesh, extra);
        Ambit {
            proc: spawn(bed, node, &args, &[], 1),
            node: node.clone(),
            mesh: mesh.to_path_buf(),
            args,
            env: Vec::new(),
            bed,
            starts: 1,
        }
    }

    /// The readiness endpoint's answer: status and body (the reason when not ready).
    pub fn readiness(&self) -> anyhow::Result<(u16, String)> {
        netns::http(&self.node.netns_path(), "GET", READY.parse().expect("addr"), "/healthz/ready")
    }

    /// Kills the proxy with SIGKILL (pinned capture state stays).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the proxy again with the same arguments (after a kill) and waits for ready.
    pub fn restart(&mut self) {
        self.proc.kill();
        self.starts += 1;
        self.proc = spawn(self.bed, &self.node, &self.args, &self.env, self.starts);
        self.wait_ready(Duration::from_secs(30));
    }

    /// Polls the readiness endpoint; panics with the proxy's output if it exits or times out.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.proc.exited() {
                panic!("ambit on {} exited ({status}) before ready:\n{}", self.node.name, self.proc.output());
            }
            if let Ok((200, _)) =
                netns::http(&self.node.netns_path(), "GET", READY.parse().expect("addr"), "/healthz/ready")
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("ambit on {} not ready within {timeout:?}:\n{}", self.node.name, self.proc.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, addr: &str, path: &str) -> anyhow::Result<String> {
        let addr: SocketAddr = addr.parse().expect("addr");
        let (status, body) = netns::http(&self.node.netns_path(), "GET", addr, path)?;
        if status != 200 {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// The Prometheus scrape.
    pub fn metrics(&self) -> String {
        self.get(STATS, "/stats/prometheus").expect("scraping metrics")
    }

    /// Value of one sample, e.g. `metric(r#"ambit_capture_events_total{event="connect_captured"}"#)`;
    /// 0 when absent (a counter never incremented is not exported).
    pub fn metric(&self, sample: &str) -> u64 {
        sample_value(&self.metrics(), sample)
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let body = self.get(ADMIN, "/config_dump").expect("reading /config_dump");
        serde_json::from_str(&body).expect("config dump is JSON")
    }

    pub fn log(&self) -> String {
        self.proc.output()
    }

    /// Waits until the log contains `needle` (counted from the start of this process).
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        self.proc.wait_for_output(needle, timeout)
    }

    /// The pin directory of this proxy's instance.
    pub fn pin_dir(&self) -> PathBuf {
        self.bed.bpffs().join("ambit").join(&self.node.name)
    }
}

fn command(node: &Node, args: &[String]) -> std::process::Command {
    let bin = workspace_bin("ambit");
    let mut argv: Vec<&str> = vec![bin.to_str().expect("utf-8 path")];
    argv.extend(args.iter().map(String::as_str));
    let mut cmd = node_command(node, &argv);
    cmd.env("RUST_BACKTRACE", "0").env("NO_COLOR", "1");
    cmd
}

fn spawn<'b>(bed: &'b Bed, node: &Node, args: &[String], env: &[(String, String)], n: u32) -> Proc<'b> {
    let mut cmd = command(node, args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(bed, &format!("ambit-{}-{n}", node.name), cmd)
}

/// Sums the samples whose text starts with `sample` (name plus any label prefix).
pub fn sample_value(scrape: &str, sample: &str) -> u64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(sample))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Waits until `cond` holds, polling; returns whether it did within `timeout`.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Reads the link and program IDs of everything pinned under `dir` with bpftool, to check
/// that a restart re-adopted rather than duplicated.
pub fn pinned_ids(dir: &Path) -> anyhow::Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
            let kind = if name.starts_with("prog_") {
                "prog"
            } else if name.starts_with("link_") || name.starts_with("tc/") {
                "link"
            } else {
                "map"
            };
            let json = crate::bed::sh(&["bpftool", "-j", kind, "show", "pinned", &p.display().to_string()])?;
            let v: serde_json::Value =
                serde_json::from_str(&json).with_context(|| format!("bpftool output {json:?}"))?;
            let id = v["id"].as_u64().with_context(|| format!("no id for {name}: {json}"))? as u32;
            out.push((name, id));
        }
    }
    out.sort();
    Ok(out)
}

/// Every bpf link in the system that runs one of `prog_ids`.
pub fn links_of_programs(prog_ids: &[u32]) -> anyhow::Result<Vec<u32>> {
    // bpftool walks the links by ID and fails when one goes away under it, which a test
    // running alongside may cause at any moment: asked again, a few times.
    let mut attempt = 0;
    let json = loop {
        match crate::bed::sh(&["bpftool", "-j", "link", "show"]) {
            Ok(json) => break json,
            Err(_) if attempt < 4 => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    };
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let mut out: Vec<u32> = v
        .as_array()
        .context("bpftool link show: not a list")?
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| prog_ids.contains(&(p as u32))))
        .filter_map(|l| l["id"].as_u64().map(|i| i as u32))
        .collect();
    out.sort();
    Ok(out)
}

/// Number of entries in a pinned map (bpftool), e.g. to check that nothing leaked.
pub fn pinned_map_len(path: &Path) -> anyhow::Result<usize> {
    let json = crate::bed::sh(&["bpftool", "-j", "map", "dump", "pinned", &path.display().to_string()])?;
    let v: serde_json::Value =
        serde_json::from_str(&json).with_context(|| format!("bpftool output {json:?}"))?;
    Ok(v.as_array().context("map dump is not a list")?.len())
}
