//! Finding the kubelet's cgroup: connections its processes open to enrolled pods (health
//! probes) are the only ones from the node that reach an application uncaptured.
//!
//! The kubelet is found as a process named `kubelet` (or `k3s`/`k0s`, which run the kubelet
//! in their own process) under the host's /proc; its cgroup is checked to really hold it.
//! Inside a container with its own cgroup namespace, /proc shows other processes' cgroups
//! relative to the container's (`/../../system.slice/kubelet.service`): the leading `..` are
//! dropped and the result is checked the same way. Failing that, the usual places of
//! systemd-run kubelets are tried.

use std::path::{Path, PathBuf};

/// Process names that run the kubelet's probes.
const KUBELET_PROCESSES: [&str; 3] = ["kubelet", "k3s", "k0s"];
/// Where systemd-managed kubelets usually run, relative to the cgroup v2 mount.
const WELL_KNOWN: [&str; 3] =
    ["system.slice/kubelet.service", "runtime.slice/kubelet.service", "system.slice/k3s.service"];

/// Where the kubelet's cgroup came from, for the start-up log and the dump.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Found {
    /// `--kubelet-cgroup`.
    Flag,
    /// The cgroup of process `pid`, named `name`.
    Process { pid: u32, name: String },
    /// A usual location that exists and holds a process.
    WellKnown,
    /// No kubelet found: no probe is exempt from capture.
    NotFound,
    /// `--kubelet-cgroup none`.
    Disabled,
}

/// `<mount><path>` for a cgroup path as /proc shows it, with the leading `..` of a cgroup
/// namespace dropped.
fn resolve(mount: &Path, shown: &str) -> PathBuf {
    let rel =
        shown.trim_start_matches('/').split('/').skip_while(|c| *c == "..").collect::<Vec<_>>().join("/");
    mount.join(rel)
}

/// The cgroup v2 path of `pid` as `proc/<pid>/cgroup` shows it (`0::<path>`).
fn cgroup_of(proc: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// Whether the cgroup directory `dir` lists `pid` (through the reader's view of pids: only
/// checked when /proc is the reader's own, where the numbers agree).
fn holds(dir: &Path, pid: Option<u32>) -> bool {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else { return false };
    match pid {
        Some(pid) => procs.lines().any(|l| l.trim() == pid.to_string()),
        None => !procs.trim().is_empty(),
    }
}

/// Looks for the kubelet's cgroup: a kubelet process under `proc`, then the usual places
/// under `mount` (the cgroup v2 mount).
pub fn discover(proc: &Path, mount: &Path) -> (Option<PathBuf>, Found) {
    let own_proc = proc == Path::new("/proc");
    let mut pids: Vec<(u32, String)> = std::fs::read_dir(proc)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let name = comm.trim();
            KUBELET_PROCESSES.contains(&name).then(|| (pid, name.to_string()))
        })
        .collect();
    pids.sort();
    for (pid, name) in pids {
        let Some(shown) = cgroup_of(proc, pid) else { continue };
        let dir = resolve(mount, &shown);
        // Under another /proc (a container's view of the host's) the pid numbers differ from
        // those in cgroup.procs: then the directory only has to hold some process.
        if dir.is_dir() && holds(&dir, own_proc.then_some(pid)) {
            return (Some(dir), Found::Process { pid, name });
        }
    }
    for rel in WELL_KNOWN {
        let dir = mount.join(rel);
        if dir.is_dir() && holds(&dir, None) {
            return (Some(dir), Found::WellKnown);
        }
    }
    (None, Found::NotFound)
}

/// `--kubelet-cgroup`: `none`, an absolute directory, or one relative to the cgroup v2 mount.
pub fn from_flag(value: &str, mount: &Path) -> anyhow::Result<(Option<PathBuf>, Found)> {
    if value == "none" {
        return Ok((None, Found::Disabled));
    }
    let path = if Path::new(value).is_absolute() { PathBuf::from(value) } else { mount.join(value) };
    super::check_cgroup2(&path).map_err(|e| anyhow::anyhow!("--kubelet-cgroup {value}: {e:#}"))?;
    Ok((Some(path), Found::Flag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_namespace_paths_resolve_from_the_mount() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve(m, "/system.slice/kubelet.service"), m.join("system.slice/kubelet.service"));
        assert_eq!(
            resolve(m, "/../../../system.slice/kubelet.service"),
            m.join("system.slice/kubelet.service")
        );
        assert_eq!(resolve(m, "/"), m.join(""));
    }

    #[test]
    fn the_calling_process_is_found_by_its_own_cgroup() {
        // This test process plays the kubelet: its cgroup holds it.
        let mount = crate::config::cgroup2_mount().expect("cgroup v2 is mounted");
        let me = std::process::id();
        let shown = cgroup_of(Path::new("/proc"), me).expect("own cgroup");
        let dir = resolve(&mount, &shown);
        assert!(holds(&dir, Some(me)), "{} holds {me}", dir.display());
        assert!(!holds(&dir, Some(u32::MAX)));
    }

    #[test]
    fn none_disables_and_a_missing_directory_is_refused() {
        let mount = crate::config::cgroup2_mount().expect("cgroup v2 is mounted");
        assert_eq!(from_flag("none", &mount).expect("none").1, Found::Disabled);
        let e = from_flag("no/such/cgroup", &mount).expect_err("refused").to_string();
        assert!(e.contains("--kubelet-cgroup no/such/cgroup"), "{e}");
    }
}
