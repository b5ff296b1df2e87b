//! Nodes and pods as network namespaces, joined by veths; nothing is created in the root
//! namespace except the run's own cgroup, directory and private bpffs mount.
//!
//! Addressing (inside the run's namespaces only): node `n` (1-based) has a bridge `br0` with
//! 10.n.0.1/24 and fd00:n::1/64; its pods get 10.n.0.k and fd00:n::k (k from 2) on `eth0`,
//! default routes via the bridge. Nodes joined with [`Bed::link`] reach each other's pod
//! subnets over a veth pair (10.255.i.0/30, fd00:ff:i::/64).

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{atomic::AtomicU32, atomic::Ordering, Arc, Mutex},
};

use anyhow::{bail, Context};

use crate::cleanup::{self, RunState, PREFIX, RUN_ROOT};

/// Fails the calling test when not root: the bed needs namespaces, cgroups and bpffs.
/// Never a skip: a test that cannot run must not look like one that passed.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "the ambit test bed needs root (network namespaces, cgroups, eBPF): \
             run the suite as root, e.g. `sudo -E cargo xtask test`"
        );
    }
}

/// Runs a command to completion; fails with its stderr if it fails.
pub fn sh(cmd: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One test run's namespaces, cgroups and files. Dropping it tears everything down.
pub struct Bed {
    state: Arc<Mutex<RunState>>,
    id: String,
    dir: PathBuf,
    cgroup: PathBuf,
    bpffs: PathBuf,
    nodes: Mutex<u32>,
    links: Mutex<u32>,
}

/// A node: a network namespace with a bridge its pods hang off.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub index: u32,
    pub netns: String,
    /// cgroup of the node's own processes (the proxy, host-network clients): a child of the
    /// run's cgroup, so the capture programs see them as they see everything on a real node.
    pub cgroup: PathBuf,
    /// The kubelet's cgroup (a child of `cgroup`): its connections to enrolled pods are
    /// health probes, the only ones from the node that reach an application uncaptured.
    pub kubelet_cgroup: PathBuf,
    pods: Arc<Mutex<u32>>,
}

/// A pod: a network namespace with `eth0` on its node's bridge, and a cgroup its processes
/// run in (a child of the run's cgroup, where the proxy attaches its programs).
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ipv4: IpAddr,
    pub ipv6: IpAddr,
    pub cgroup: PathBuf,
    /// The pod's own `/etc/resolv.conf`, as Kubernetes gives each pod one: its processes see
    /// it in place of the host's (`exec::pod_command`). `None`: the host's.
    pub resolv_conf: Option<PathBuf>,
}

impl Node {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.netns))
    }

    /// The node's own address on its pods' bridge (kubelet's source address).
    pub fn bridge_ipv4(&self) -> IpAddr {
        format!("10.{}.0.1", self.index).parse().expect("valid")
    }

    pub fn bridge_ipv6(&self) -> IpAddr {
        format!("fd00:{}::1", self.index).parse().expect("valid")
    }
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.netns))
    }

    /// Gives the pod its own resolv.conf (in the run directory `dir`) naming `nameserver`,
    /// with Kubernetes' search path for `namespace`: the pod's processes resolve through it.
    pub fn with_resolver(mut self, dir: &Path, namespace: &str, nameserver: IpAddr) -> Pod {
        let path = dir.join(format!("resolv-{}.conf", self.netns));
        let text = format!(
            "search {namespace}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {nameserver}\noptions ndots:5 timeout:2 attempts:1\n"
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        self.resolv_conf = Some(path);
        self
    }
}

static SEQ: AtomicU32 = AtomicU32::new(1);

/// Processes of the bed inherit this: 10,000 relayed connections are 20,000 descriptors in
/// one relay, more than the hard limit many machines start with. Root may raise it.
const OPEN_FILES: u64 = 262_144;

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let want = OPEN_FILES.max(hard);
    // Without CAP_SYS_RESOURCE (some containers) the hard limit is as far as it goes; the
    // bench then holds fewer relayed connections and says so.
    if soft < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() && soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            eprintln!("test bed: cannot raise the open files limit from {soft} to {hard}: {e}");
        }
    }
}

impl Bed {
    /// Creates a run: its id, directory, cgroup and private bpffs. `label` only names logs.
    pub fn new(label: &str) -> Bed {
        require_root();
        // Leftovers of killed runs (SIGKILL skips every teardown) would only accumulate.
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| {
            for what in cleanup::sweep_dead_runs() {
                eprintln!("test bed: removed a leftover of a killed run: {what}");
            }
            raise_fd_limit();
        });
        let id = format!("t{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let state = Arc::new(Mutex::new(RunState { id: id.clone(), ..Default::default() }));
        cleanup::register(state.clone());
        let bed = Bed {
            state,
            id: id.clone(),
            dir: Path::new(RUN_ROOT).join(&id),
            cgroup: PathBuf::new(),
            bpffs: PathBuf::new(),
            nodes: Mutex::new(0),
            links: Mutex::new(0),
        };
        bed.setup(label).unwrap_or_else(|e| panic!("setting up test bed {id}: {e:#}"))
    }

    fn setup(mut self, label: &str) -> anyhow::Result<Bed> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        self.state().dir = Some(self.dir.clone());
        fs::write(self.dir.join("label"), label)?;
        let cg = cleanup::cgroup2_root()?.join(format!("ambit-{}", self.id));
        fs::create_dir(&cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
        self.state().cgroups.push(cg.clone());
        self.cgroup = cg;
        let bpffs = self.dir.join("bpffs");
        fs::create_dir(&bpffs)?;
        nix::mount::mount(Some("bpf"), &bpffs, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .with_context(|| format!("mounting a private bpffs on {}", bpffs.display()))?;
        self.state().mounts.push(bpffs.clone());
        self.bpffs = bpffs;
        Ok(self)
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The run's directory: mesh files, logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run's cgroup; pods' cgroups are its children, the proxy attaches here.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The run's private bpffs mount (gone, with every pin in it, at teardown).
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Creates a cgroup `name` under the run's, removed at teardown.
    pub fn cgroup_dir(&self, name: &str) -> PathBuf {
        let cg = self.cgroup.join(name);
        fs::create_dir(&cg).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", cg.display()));
        self.state().cgroups.push(cg.clone());
        cg
    }

    /// Keeps the run directory (logs, mesh files) after teardown, for debugging.
    pub fn keep_logs(&self) {
        self.state().keep_dir = true;
    }

    pub(crate) fn track_pid(&self, pid: u32) {
        self.state().pids.push(pid);
    }

    pub(crate) fn untrack_pid(&self, pid: u32) {
        self.state().pids.retain(|p| *p != pid);
    }

    fn add_netns(&self, name: &str) -> anyhow::Result<()> {
        sh(&["ip", "netns", "add", name])?;
        self.state().netns.push(name.to_string());
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Creates a node namespace with its pod bridge and forwarding on.
    pub fn node(&self, name: &str) -> Node {
        let index = {
            let mut n = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        let netns = format!("{PREFIX}{}-{name}", &self.id[1..]);
        let cgroup = self.cgroup.join(format!("node-{name}"));
        let kubelet_cgroup = cgroup.join("kubelet");
        let r = (|| -> anyhow::Result<()> {
            self.add_netns(&netns)?;
            let ip = |args: &[&str]| -> anyhow::Result<String> {
                let mut v = vec!["ip", "-n", netns.as_str()];
                v.extend_from_slice(args);
                sh(&v)
            };
            ip(&["link", "add", "br0", "type", "bridge"])?;
            ip(&["link", "set", "br0", "up"])?;
            ip(&["addr", "add", &format!("10.{index}.0.1/24"), "dev", "br0"])?;
            ip(&["addr", "add", &format!("fd00:{index}::1/64"), "dev", "br0", "nodad"])?;
            sysctl(&netns, "net.ipv4.ip_forward", "1")?;
            fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
            self.state().cgroups.push(cgroup.clone());
            fs::create_dir(&kubelet_cgroup)
                .with_context(|| format!("creating cgroup {}", kubelet_cgroup.display()))?;
            self.state().cgroups.push(kubelet_cgroup.clone());
            sysctl(&netns, "net.ipv6.conf.all.forwarding", "1")?;
            Ok(())
        })();
        r.unwrap_or_else(|e| panic!("creating node {name}: {e:#}"));
        Node { name: name.to_string(), index, netns, cgroup, kubelet_cgroup, pods: Arc::new(Mutex::new(1)) }
    }

    /// Creates a pod on `node`: netns, veth to the bridge, dual-stack addresses, routes, and
    /// a cgroup under the run's.
    pub fn pod(&self, node: &Node, name: &str) -> Pod {
        let k = {
            let mut n = node.pods.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        let netns = format!("{}-{name}", node.netns);
        let host_if = format!("p{k}");
        let ipv4: IpAddr = format!("10.{}.0.{k}", node.index).parse().expect("valid");
        let ipv6: IpAddr = format!("fd00:{}::{k}", node.index).parse().expect("valid");
        let cgroup = self.cgroup.join(format!("pod-{}-{name}", node.name));
        let r = (|| -> anyhow::Result<()> {
            self.add_netns(&netns)?;
            sh(&[
                "ip",
                "-n",
                &node.netns,
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns,
            ])?;
            sh(&["ip", "-n", &node.netns, "link", "set", &host_if, "master", "br0", "up"])?;
            let ip = |args: &[&str]| -> anyhow::Result<String> {
                let mut v = vec!["ip", "-n", netns.as_str()];
                v.extend_from_slice(args);
                sh(&v)
            };
            ip(&["link", "set", "eth0", "up"])?;
            ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
            ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"])?;
            ip(&["route", "add", "default", "via", &node.bridge_ipv4().to_string()])?;
            ip(&["-6", "route", "add", "default", "via", &node.bridge_ipv6().to_string()])?;
            fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
            self.state().cgroups.push(cgroup.clone());
            Ok(())
        })();
        r.unwrap_or_else(|e| panic!("creating pod {name} on {}: {e:#}", node.name));
        Pod { name: name.to_string(), node: node.name.clone(), netns, ipv4, ipv6, cgroup, resolv_conf: None }
    }

    /// Joins two nodes with a veth pair and routes each one's pod subnet via the other.
    /// Returns the interface names on `a`'s and on `b`'s side.
    pub fn link(&self, a: &Node, b: &Node) -> (String, String) {
        let i = {
            let mut n = self.links.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        let (ia, ib) = (format!("l{i}{}", b.index), format!("l{i}{}", a.index));
        let r = (|| -> anyhow::Result<()> {
            sh(&[
                "ip", "-n", &a.netns, "link", "add", &ia, "type", "veth", "peer", "name", &ib, "netns",
                &b.netns,
            ])?;
            for (node, ifname, host, peer, subnet_idx) in [(a, &ia, 1, 2, b.index), (b, &ib, 2, 1, a.index)] {
                let ip = |args: &[&str]| -> anyhow::Result<String> {
                    let mut v = vec!["ip", "-n", node.netns.as_str()];
                    v.extend_from_slice(args);
                    sh(&v)
                };
                ip(&["link", "set", ifname, "up"])?;
                ip(&["addr", "add", &format!("10.255.{i}.{host}/30"), "dev", ifname])?;
                ip(&["addr", "add", &format!("fd00:ff:{i}::{host}/64"), "dev", ifname, "nodad"])?;
                ip(&[
                    "route",
                    "add",
                    &format!("10.{subnet_idx}.0.0/24"),
                    "via",
                    &format!("10.255.{i}.{peer}"),
                ])?;
                ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:{subnet_idx}::/64"),
                    "via",
                    &format!("fd00:ff:{i}::{peer}"),
                ])?;
            }
            Ok(())
        })();
        r.unwrap_or_else(|e| panic!("linking {} and {}: {e:#}", a.name, b.name));
        (ia, ib)
    }

    /// Deletes a pod's namespace before teardown (a pod that went away).
    pub fn delete_pod(&self, pod: &Pod) {
        self.delete_netns(&pod.netns);
    }

    /// An empty network namespace on `node` (not even `lo` up), as a container runtime
    /// creates for a pod sandbox before running the CNI plugins. Returns its name.
    pub fn sandbox_netns(&self, node: &Node, name: &str) -> String {
        let netns = format!("{}-{name}", node.netns);
        sh(&["ip", "netns", "add", &netns]).unwrap_or_else(|e| panic!("creating netns {netns}: {e:#}"));
        self.state().netns.push(netns.clone());
        netns
    }

    /// Deletes a network namespace of the bed before teardown.
    pub fn delete_netns(&self, name: &str) {
        cleanup::delete_netns(name);
        self.state().netns.retain(|n| n != name);
    }
}

fn sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    // `ip netns exec` is fine for sysctls: /proc/sys/net follows the netns.
    sh(&["ip", "netns", "exec", netns, "sysctl", "-q", "-w", &format!("{key}={value}")])?;
    Ok(())
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.state().keep_dir = std::env::var_os("AMBIT_KEEP_FAILED").is_some();
            // Show what the processes said: the run directory holds their logs.
            for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "log") {
                    let text = fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(60).collect();
                    eprintln!("---- {} (last {} lines) ----", p.display(), tail.len());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        cleanup::teardown(&self.state);
        cleanup::unregister(&self.state);
    }
}
