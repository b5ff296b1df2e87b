//! Where a pod's forwarded queries go: the nameservers of the pod's own `/etc/resolv.conf`, as
//! its applications' resolver reads it. The file is read through a process in the pod's
//! network namespace (`<proc>/<pid>/root/etc/resolv.conf`, the lowest pid first: the sandbox
//! in Kubernetes), and re-read at most every [`REFRESH`]. When no process of the pod has one
//! with a nameserver, the node's own resolv.conf is used, as ztunnel does.

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::forward::{nameservers, Upstreams};

/// How long a pod's nameservers are kept before the file is read again.
pub const REFRESH: Duration = Duration::from_secs(30);

/// The node's resolver configuration, the fallback.
const NODE_RESOLV_CONF: &str = "/etc/resolv.conf";

/// A source of upstream resolvers for one pod.
pub trait Resolvers: Send + Sync {
    fn upstreams(&self) -> Upstreams;
}

/// Fixed resolvers (tests, and pods whose resolvers are configured rather than read).
impl Resolvers for Upstreams {
    fn upstreams(&self) -> Upstreams {
        self.clone()
    }
}

/// Which file the nameservers came from, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Pod(PathBuf),
    Node,
}

/// The nameservers of the pod whose network namespace is `netns` (its device and inode).
pub struct PodResolvConf {
    proc_dir: PathBuf,
    netns: (u64, u64),
    timeout: Duration,
    cached: Mutex<Option<(Instant, Vec<SocketAddr>)>>,
}

impl PodResolvConf {
    /// `netns_file`: the pod's network namespace (any path or fd path to it).
    pub fn new(proc_dir: &Path, netns_file: &Path, timeout: Duration) -> std::io::Result<PodResolvConf> {
        let meta = std::fs::metadata(netns_file)?;
        Ok(PodResolvConf {
            proc_dir: proc_dir.to_path_buf(),
            netns: (meta.dev(), meta.ino()),
            timeout,
            cached: Mutex::new(None),
        })
    }
}

impl Resolvers for PodResolvConf {
    fn upstreams(&self) -> Upstreams {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let servers = match &*cached {
            Some((at, servers)) if at.elapsed() < REFRESH => servers.clone(),
            _ => {
                let (servers, origin) = read(&self.proc_dir, self.netns);
                tracing::debug!(?servers, ?origin, "a pod's upstream resolvers");
                *cached = Some((Instant::now(), servers.clone()));
                servers
            }
        };
        Upstreams { servers, timeout: self.timeout }
    }
}

/// Reads the pod's nameservers, or the node's.
pub fn read(proc_dir: &Path, netns: (u64, u64)) -> (Vec<SocketAddr>, Origin) {
    for pid in pids_in(proc_dir, netns) {
        let file = proc_dir.join(pid.to_string()).join("root/etc/resolv.conf");
        // A process that exited meanwhile, or one without the file: the next one.
        if let Ok(text) = std::fs::read_to_string(&file) {
            let servers = nameservers(&text);
            if !servers.is_empty() {
                return (servers, Origin::Pod(file));
            }
        }
    }
    let node = std::fs::read_to_string(NODE_RESOLV_CONF).unwrap_or_default();
    (nameservers(&node), Origin::Node)
}

/// The processes in the network namespace, lowest pid first.
fn pids_in(proc_dir: &Path, netns: (u64, u64)) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_dir) else { return Vec::new() };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::metadata(proc_dir.join(pid.to_string()).join("ns/net"))
                .is_ok_and(|m| (m.dev(), m.ino()) == netns)
        })
        .collect();
    pids.sort_unstable();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_s_namespace_finds_this_process() {
        let me = std::fs::metadata("/proc/self/ns/net").expect("own netns");
        let pids = pids_in(Path::new("/proc"), (me.dev(), me.ino()));
        assert!(pids.contains(&std::process::id()), "{pids:?}");
        assert!(pids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_namespace_with_no_process_falls_back_to_the_node() {
        let (_, origin) = read(Path::new("/proc"), (0, 0));
        assert_eq!(origin, Origin::Node);
    }
}
