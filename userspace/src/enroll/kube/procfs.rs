//! A Kubernetes pod's network namespace, found from `/proc`: the kubelet puts every process of
//! a pod in a cgroup whose path carries the pod's UID — `pod<uid>` with the cgroupfs driver,
//! `pod<uid with '_' for '-'>` with the systemd driver — so any such process's
//! `/proc/<pid>/ns/net` is the pod's network namespace.
//!
//! Scans are batched (one pass over `/proc` for every pod still unknown) and results are
//! cached while the process lives, so the path of a pod's namespace stays the same for as
//! long as the pod does.

use std::{
    collections::{BTreeMap, HashMap},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Why a pod's network namespace is not known (yet).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetnsError {
    #[error("no process under {proc} has a cgroup containing the pod's uid {uid} (its containers may not have started yet)")]
    NoProcess { proc: PathBuf, uid: String },
    #[error(
        "process {pid} of the pod shares the node's network namespace: a host-network pod is never captured"
    )]
    HostNetwork { pid: u32 },
    #[error("reading {path}: {error}")]
    Io { path: PathBuf, error: String },
}

/// Finds pods' network namespaces under a `/proc` (the host's: `/host/proc` in a container).
pub struct ProcNetns {
    proc: PathBuf,
    /// Pod uid → the pid found for it.
    cache: HashMap<String, u32>,
}

/// Both spellings of a uid in cgroup paths.
fn needles(uid: &str) -> [String; 2] {
    [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))]
}

fn contains_uid(cgroup: &str, uid: &str) -> bool {
    needles(uid).iter().any(|n| cgroup.contains(n.as_str()))
}

impl ProcNetns {
    pub fn new(proc: impl Into<PathBuf>) -> ProcNetns {
        ProcNetns { proc: proc.into(), cache: HashMap::new() }
    }

    fn cgroup_of(&self, pid: u32) -> Option<String> {
        std::fs::read_to_string(self.proc.join(pid.to_string()).join("cgroup")).ok()
    }

    fn netns_path(&self, pid: u32) -> PathBuf {
        self.proc.join(pid.to_string()).join("ns/net")
    }

    /// Inodes of the node's network namespace: the proxy's own (it runs with the host
    /// network) and, when readable, that of pid 1 of this `/proc`.
    fn host_netns_inodes(&self) -> Result<Vec<u64>, NetnsError> {
        let own = Path::new("/proc/self/ns/net");
        let mut inodes = vec![std::fs::metadata(own)
            .map(|m| m.ino())
            .map_err(|e| NetnsError::Io { path: own.to_path_buf(), error: e.to_string() })?];
        inodes.extend(std::fs::metadata(self.netns_path(1)).ok().map(|m| m.ino()));
        Ok(inodes)
    }

    /// Resolves the network namespace of every pod in `uids`: a path `<proc>/<pid>/ns/net`
    /// or why there is none. One pass over `/proc` serves all the uids not cached.
    pub fn resolve(&mut self, uids: &[&str]) -> BTreeMap<String, Result<PathBuf, NetnsError>> {
        // Forget processes that ended or moved (a pid reused by another process).
        let stale: Vec<String> = self
            .cache
            .iter()
            .filter(|(uid, pid)| !self.cgroup_of(**pid).is_some_and(|cg| contains_uid(&cg, uid)))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in stale {
            self.cache.remove(&uid);
        }
        let missing: Vec<&str> = uids.iter().copied().filter(|u| !self.cache.contains_key(*u)).collect();
        if !missing.is_empty() {
            self.scan(&missing);
        }
        let host = self.host_netns_inodes();
        uids.iter()
            .map(|uid| {
                let r = match (self.cache.get(*uid), &host) {
                    (None, _) => Err(NetnsError::NoProcess { proc: self.proc.clone(), uid: uid.to_string() }),
                    (Some(_), Err(e)) => Err(e.clone()),
                    (Some(pid), Ok(host)) => {
                        let path = self.netns_path(*pid);
                        match std::fs::metadata(&path) {
                            Ok(m) if host.contains(&m.ino()) => Err(NetnsError::HostNetwork { pid: *pid }),
                            Ok(_) => Ok(path),
                            Err(e) => Err(NetnsError::Io { path, error: e.to_string() }),
                        }
                    }
                };
                (uid.to_string(), r)
            })
            .collect()
    }

    /// One pass over `/proc`: the lowest pid of each pod (its sandbox, usually) wins.
    fn scan(&mut self, uids: &[&str]) {
        let Ok(entries) = std::fs::read_dir(&self.proc) else { return };
        let mut pids: Vec<u32> =
            entries.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok())).collect();
        pids.sort_unstable();
        let mut left: Vec<&str> = uids.to_vec();
        for pid in pids {
            if left.is_empty() {
                break;
            }
            let Some(cg) = self.cgroup_of(pid) else { continue };
            left.retain(|uid| {
                if contains_uid(&cg, uid) {
                    self.cache.insert(uid.to_string(), pid);
                    false
                } else {
                    true
                }
            });
        }
    }

    /// Forgets pods that are gone.
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.cache.retain(|uid, _| live(uid));
    }

    pub fn proc_dir(&self) -> &Path {
        &self.proc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_cgroup_drivers_spell_the_uid() {
        let uid = "6f1b1f4e-2c1d-4b8a-9d35-0a1b2c3d4e5f";
        let cgroupfs = "0::/kubepods/besteffort/pod6f1b1f4e-2c1d-4b8a-9d35-0a1b2c3d4e5f/abc123\n";
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1b1f4e_2c1d_4b8a_9d35_0a1b2c3d4e5f.slice/cri-containerd-abc.scope\n";
        assert!(contains_uid(cgroupfs, uid));
        assert!(contains_uid(systemd, uid));
        assert!(!contains_uid("0::/kubepods/besteffort/pod11111111-2c1d-4b8a-9d35-0a1b2c3d4e5f/x\n", uid));
    }

    #[test]
    fn a_fake_proc_resolves_and_refuses_the_host_netns() {
        let dir = std::env::temp_dir().join(format!("ambit-procfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mk = |pid: u32, cgroup: &str, netns_from: &str| {
            let p = dir.join(pid.to_string());
            std::fs::create_dir_all(p.join("ns")).expect("dir");
            std::fs::write(p.join("cgroup"), cgroup).expect("cgroup");
            // A file standing for the netns: its inode is what is compared.
            let target = dir.join(netns_from);
            if !target.exists() {
                std::fs::write(&target, "").expect("netns stand-in");
            }
            std::fs::hard_link(&target, p.join("ns/net")).expect("link");
        };
        mk(1, "0::/init.scope\n", "host-ns");
        mk(40, "0::/kubepods/podaaaa-1/sandbox\n", "ns-a");
        mk(41, "0::/kubepods/podaaaa-1/app\n", "ns-a");
        mk(50, "0::/kubepods.slice/kubepods-podhost_1.slice/x\n", "host-ns");
        let mut p = ProcNetns::new(&dir);
        let r = p.resolve(&["aaaa-1", "host-1", "missing-1"]);
        assert_eq!(r["aaaa-1"], Ok(dir.join("40/ns/net")), "the lowest pid wins");
        assert_eq!(r["host-1"], Err(NetnsError::HostNetwork { pid: 50 }));
        assert!(matches!(r["missing-1"], Err(NetnsError::NoProcess { .. })));
        // The sandbox ends: the pod's other process takes over.
        std::fs::remove_dir_all(dir.join("40")).expect("rm");
        assert_eq!(p.resolve(&["aaaa-1"])["aaaa-1"], Ok(dir.join("41/ns/net")));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
