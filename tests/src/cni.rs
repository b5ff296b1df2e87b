//! A container runtime's share of a pod's start, as containerd does it: an empty network
//! namespace for the sandbox, `lo` up with the `loopback` plugin, then the node's CNI
//! configuration run against it through libcni (`cnitool`), with the pod named in
//! `CNI_ARGS`. The plugins are the reference ones (`bridge` with `host-local` addresses from
//! the node's pod subnet, on the node's `br0`), built from their Go module; the
//! configuration is the node's primary conflist, into which `ambit node --cni` chains
//! `ambit-cni`. Nothing goes outside the run: host-local's leases and libcni's result cache
//! live in the run directory (the cache through a private bind mount over `/var/lib`).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;

use crate::{bed::Node, exec::run_with_timeout, tools, Bed};

/// The pods' network, as the primary conflist names it.
pub const NETWORK: &str = "podnet";
/// The primary conflist's file name.
pub const PRIMARY: &str = "10-podnet.conflist";

/// One node's CNI directories and runtime state.
pub struct Runtime<'b> {
    bed: &'b Bed,
    node: Node,
    /// The node's CNI configuration directory (`/etc/cni/net.d` on a node).
    pub conf_dir: PathBuf,
    /// The node's CNI plugin directory (`/opt/cni/bin`): the reference plugins, and
    /// `ambit-cni` once installed.
    pub bin_dir: PathBuf,
    /// host-local's leases.
    pub leases: PathBuf,
    loopback_dir: PathBuf,
    var_lib: PathBuf,
}

/// A pod as `CNI_ARGS` names it.
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

/// A plugin chain's failure: libcni's message (the plugin's CNI error), exit status and
/// both outputs.
#[derive(Debug)]
pub struct CniFailure {
    pub message: String,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl<'b> Runtime<'b> {
    /// The node's CNI directories, with the reference plugins and the primary conflist
    /// (dual-stack addresses from the node's pod subnets, gateway the node's `br0`).
    pub fn new(bed: &'b Bed, node: &Node) -> Runtime<'b> {
        let root = bed.dir().join(format!("cni-{}", node.name));
        let rt = Runtime {
            bed,
            node: node.clone(),
            conf_dir: root.join("net.d"),
            bin_dir: root.join("bin"),
            leases: root.join("leases"),
            loopback_dir: root.join("loopback.d"),
            var_lib: root.join("var-lib"),
        };
        (|| -> anyhow::Result<()> {
            for d in [&rt.conf_dir, &rt.bin_dir, &rt.leases, &rt.loopback_dir, &rt.var_lib] {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            let plugins = tools::cni_plugins();
            for p in ["bridge", "host-local", "loopback"] {
                std::fs::copy(plugins.join(p), rt.bin_dir.join(p))
                    .with_context(|| format!("installing {p}"))?;
            }
            std::fs::write(rt.conf_dir.join(PRIMARY), rt.primary_conflist())?;
            std::fs::write(
                rt.loopback_dir.join("99-loopback.conf"),
                r#"{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}"#,
            )?;
            Ok(())
        })()
        .unwrap_or_else(|e| panic!("setting up CNI on {}: {e:#}", node.name));
        rt
    }

    /// The primary CNI's conflist, as it writes it.
    pub fn primary_conflist(&self) -> String {
        let i = self.node.index;
        format!(
            r#"{{
  "cniVersion": "1.0.0",
  "name": "{NETWORK}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "br0",
      "isGateway": false,
      "ipMasq": false,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{}",
        "ranges": [
          [{{"subnet": "10.{i}.0.0/24", "rangeStart": "10.{i}.0.100", "rangeEnd": "10.{i}.0.200", "gateway": "10.{i}.0.1"}}],
          [{{"subnet": "fd00:{i}::/64", "rangeStart": "fd00:{i}::100", "rangeEnd": "fd00:{i}::200", "gateway": "fd00:{i}::1"}}]
        ],
        "routes": [{{"dst": "0.0.0.0/0"}}, {{"dst": "::/0"}}]
      }}
    }}
  ]
}}
"#,
            self.leases.display()
        )
    }

    pub fn primary(&self) -> PathBuf {
        self.conf_dir.join(PRIMARY)
    }

    /// The flags that make `ambit node` install its plugin here and answer it on `socket`.
    pub fn node_flags(&self, socket: &Path) -> Vec<String> {
        [
            "--cni",
            "--cni-conf-dir",
            &self.conf_dir.display().to_string(),
            "--cni-bin-dir",
            &self.bin_dir.display().to_string(),
            "--cni-socket",
            &socket.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A new pod sandbox's network namespace (empty), named after `pod`.
    pub fn sandbox(&self, pod: &str) -> String {
        self.bed.sandbox_netns(&self.node, pod)
    }

    /// Runs `cnitool <command> <network> <netns>` on the node as the runtime would.
    fn cnitool(
        &self,
        command: &str,
        conf_dir: &Path,
        network: &str,
        netns: &str,
        pod: &PodRef<'_>,
    ) -> anyhow::Result<std::process::Output> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.node.netns, "sh", "-c"])
            .arg(r#"mount --bind "$1" /var/lib && shift && exec "$@""#)
            .arg("sh")
            .arg(&self.var_lib)
            .arg(tools::cnitool())
            .args([command, network])
            .arg(format!("/var/run/netns/{netns}"))
            .env("CNI_PATH", &self.bin_dir)
            .env("NETCONFPATH", conf_dir)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox-{};K8S_POD_UID={}",
                    pod.namespace, pod.name, pod.name, pod.uid
                ),
            );
        run_with_timeout(c, Duration::from_secs(60))
    }

    fn check(out: std::process::Output) -> Result<String, CniFailure> {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        Err(CniFailure {
            message: format!("{} {}{}", out.status, stdout, String::from_utf8_lossy(&out.stderr)),
        })
    }

    fn call(
        &self,
        command: &str,
        conf_dir: &Path,
        network: &str,
        netns: &str,
        pod: &PodRef<'_>,
    ) -> Result<String, CniFailure> {
        let out = self
            .cnitool(command, conf_dir, network, netns, pod)
            .map_err(|e| CniFailure { message: format!("{e:#}") })?;
        Self::check(out)
    }

    /// CNI ADD of the sandbox: `lo`, then the node's network. The result on success.
    pub fn add(&self, netns: &str, pod: &PodRef<'_>) -> Result<Value, CniFailure> {
        self.call("add", &self.loopback_dir, "lo", netns, pod)?;
        self.add_with(&self.conf_dir, NETWORK, netns, pod)
    }

    /// CNI ADD of network `network` from the configurations in `conf_dir`.
    pub fn add_with(
        &self,
        conf_dir: &Path,
        network: &str,
        netns: &str,
        pod: &PodRef<'_>,
    ) -> Result<Value, CniFailure> {
        let stdout = self.call("add", conf_dir, network, netns, pod)?;
        serde_json::from_str(&stdout)
            .map_err(|e| CniFailure { message: format!("the result is not JSON ({e}): {stdout}") })
    }

    /// ADD of `ambit-cni` alone, with `prev` (the chain's result) as its `prevResult`: what a
    /// runtime retrying the last step of a chain sends. The reference `bridge` cannot be
    /// re-added to a sandbox that has its interface, so a repeated ADD is tested here.
    pub fn readd_ambit(&self, netns: &str, pod: &PodRef<'_>, prev: &Value) -> Result<Value, CniFailure> {
        let list: Value =
            serde_json::from_str(&std::fs::read_to_string(self.primary()).expect("primary conflist"))
                .expect("the primary conflist is JSON");
        let mut conf = list["plugins"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["type"] == "ambit-cni"))
            .cloned()
            .ok_or_else(|| CniFailure { message: "ambit-cni is not in the primary conflist".into() })?;
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        conf["prevResult"] = prev.clone();
        let netns_path = format!("/var/run/netns/{netns}");
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.uid
        );
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "sandbox-retry"),
            ("CNI_NETNS", netns_path.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args.as_str()),
        ];
        let bin = self.bin_dir.display().to_string();
        let env: Vec<(&str, &str)> = env.into_iter().chain([("CNI_PATH", bin.as_str())]).collect();
        let (ok, stdout) = self.invoke_plugin(&env, &conf.to_string());
        if !ok {
            return Err(CniFailure { message: stdout });
        }
        serde_json::from_str(&stdout).map_err(|e| CniFailure { message: format!("not JSON ({e}): {stdout}") })
    }

    /// CNI DEL of the sandbox (the node's network, then `lo`), as the runtime tears it down.
    pub fn del(&self, netns: &str, pod: &PodRef<'_>) -> Result<(), CniFailure> {
        self.del_with(&self.conf_dir, NETWORK, netns, pod)?;
        self.call("del", &self.loopback_dir, "lo", netns, pod).map(|_| ())
    }

    /// CNI DEL of network `network` from the configurations in `conf_dir`.
    pub fn del_with(
        &self,
        conf_dir: &Path,
        network: &str,
        netns: &str,
        pod: &PodRef<'_>,
    ) -> Result<(), CniFailure> {
        self.call("del", conf_dir, network, netns, pod).map(|_| ())
    }

    /// CNI CHECK of the sandbox.
    pub fn check_pod(&self, netns: &str, pod: &PodRef<'_>) -> Result<(), CniFailure> {
        self.call("check", &self.conf_dir, NETWORK, netns, pod).map(|_| ())
    }

    /// Addresses host-local has leased (its lease files are named by address).
    pub fn leased(&self) -> Vec<String> {
        let mut v: Vec<String> = walk(&self.leases)
            .into_iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .filter(|n| n.parse::<IpAddr>().is_ok())
            .collect();
        v.sort();
        v
    }

    /// Interfaces enslaved to the node's `br0` (one host-side veth per pod).
    pub fn bridge_ports(&self) -> usize {
        crate::bed::sh(&["ip", "-n", &self.node.netns, "-o", "link", "show", "master", "br0"])
            .map(|o| o.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    }

    /// Runs the installed `ambit-cni` directly, as the runtime does: `env` and the
    /// configuration on stdin. Exit status and stdout.
    pub fn invoke_plugin(&self, env: &[(&str, &str)], config: &str) -> (bool, String) {
        use std::io::Write;
        let mut c = Command::new(self.bin_dir.join("ambit-cni"));
        c.env_clear()
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().expect("running ambit-cni");
        child.stdin.take().expect("stdin").write_all(config.as_bytes()).expect("writing the configuration");
        let out = child.wait_with_output().expect("ambit-cni finishes");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The addresses in a CNI result.
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect()
}
