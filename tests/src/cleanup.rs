//! Teardown of everything a run created — on drop, on panic (unwinding drops the bed), on
//! SIGINT/SIGTERM/SIGHUP (a handler thread tears every live run down, then exits) — and a
//! sweeper for runs whose process died without any of that (SIGKILL).
//!
//! Names carry the owning process's pid (`ambit-t<pid>x<seq>-...`), so the sweeper only ever
//! touches leftovers of test processes that no longer exist.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, Once, OnceLock},
    thread,
    time::Duration,
};

use nix::{
    mount::{umount2, MntFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// Prefix of every netns, cgroup and run directory the bed creates.
pub const PREFIX: &str = "ambit-t";
/// Parent of the run directories (mesh files, logs, the private bpffs mount).
pub const RUN_ROOT: &str = "/run/ambit-test";

/// What one run created, in creation order.
#[derive(Debug, Default)]
pub struct RunState {
    pub id: String,
    pub pids: Vec<u32>,
    pub netns: Vec<String>,
    /// Created parents first; removed in reverse.
    pub cgroups: Vec<PathBuf>,
    pub mounts: Vec<PathBuf>,
    pub dir: Option<PathBuf>,
    /// Keep the run directory (logs) after teardown.
    pub keep_dir: bool,
}

type Shared = Arc<Mutex<RunState>>;

fn registry() -> &'static Mutex<Vec<Shared>> {
    static R: OnceLock<Mutex<Vec<Shared>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Vec::new()))
}

/// Registers a run for teardown on signals; installs the handler once per process.
pub fn register(state: Shared) {
    static HANDLER: Once = Once::new();
    HANDLER.call_once(|| {
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
            .expect("installing the test bed's signal handler");
        thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("ambit test bed: signal {sig}: tearing down every live run");
                let runs: Vec<Shared> = registry().lock().unwrap_or_else(|p| p.into_inner()).clone();
                for run in runs {
                    teardown(&run);
                }
                std::process::exit(128 + sig);
            }
        });
    });
    registry().lock().unwrap_or_else(|p| p.into_inner()).push(state);
}

pub fn unregister(state: &Shared) {
    registry().lock().unwrap_or_else(|p| p.into_inner()).retain(|s| !Arc::ptr_eq(s, state));
}

/// Removes everything a run created; safe to call twice. Errors are reported, not fatal: a
/// teardown should remove as much as it can.
pub fn teardown(state: &Shared) {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    for pid in s.pids.drain(..) {
        kill_and_reap(pid);
    }
    // Anything still in the run's cgroups was started by the run (a grandchild, say).
    for cg in s.cgroups.iter().rev() {
        for pid in cgroup_pids(cg) {
            kill_and_reap(pid);
        }
    }
    for m in s.mounts.drain(..).rev() {
        if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                eprintln!("teardown: umount {}: {e}", m.display());
            }
        }
    }
    for ns in s.netns.drain(..).rev() {
        delete_netns(&ns);
    }
    for cg in s.cgroups.drain(..).rev() {
        remove_cgroup(&cg);
    }
    if let Some(dir) = s.dir.take() {
        if s.keep_dir {
            eprintln!("test bed: kept {}", dir.display());
        } else if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("teardown: removing {}: {e}", dir.display());
            }
        }
    }
}

fn kill_and_reap(pid: u32) {
    let p = Pid::from_raw(pid as i32);
    if kill(p, Signal::SIGKILL).is_ok() {
        // Our own children are reaped by their Child handles or here; others (grandchildren)
        // are reaped by init. Wait until the pid is gone either way.
        for _ in 0..200 {
            let _reaped = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

fn cgroup_pids(cg: &Path) -> Vec<u32> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

pub fn delete_netns(name: &str) {
    let out = Command::new("ip").args(["netns", "delete", name]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            if !err.contains("No such file") {
                eprintln!("teardown: ip netns delete {name}: {}", err.trim());
            }
        }
        Err(e) => eprintln!("teardown: ip netns delete {name}: {e}"),
    }
}

/// Removes a cgroup and every cgroup below it (a node's kubelet cgroup sits in the node's),
/// deepest first, killing what still runs in them.
fn remove_cgroup_tree(cg: &Path) {
    if let Ok(rd) = fs::read_dir(cg) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for pid in cgroup_pids(cg) {
        kill_and_reap(pid);
    }
    remove_cgroup(cg);
}

fn remove_cgroup(cg: &Path) {
    // rmdir fails while the last processes are still exiting; retry briefly.
    for attempt in 0..100 {
        match fs::remove_dir(cg) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if attempt == 99 => eprintln!("teardown: rmdir {}: {e}", cg.display()),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The cgroup v2 mount point (read from /proc/self/mounts, never assumed).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| anyhow::anyhow!("no cgroup2 filesystem is mounted"))
}

/// The pid encoded in a run id (`t<pid>x<seq>`).
fn owner_pid(run_id: &str) -> Option<u32> {
    run_id.strip_prefix('t')?.split('x').next()?.parse().ok()
}

/// The run id in a name made by the bed (`ambit-t<pid>x<seq>[-...]`).
fn run_id_of(name: &str) -> Option<String> {
    let rest = name.strip_prefix("ambit-")?;
    let id = rest.split('-').next()?;
    owner_pid(id).map(|_| id.to_string())
}

/// Every netns, cgroup and run directory left by test runs, with the run id it belongs to.
pub fn leftovers() -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(o) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX) {
                if let Some(id) = run_id_of(name) {
                    out.push((id, format!("netns {name}")));
                }
            }
        }
    }
    if let Ok(root) = cgroup2_root() {
        if let Ok(rd) = fs::read_dir(&root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = run_id_of(&name) {
                    out.push((id, format!("cgroup {}", e.path().display())));
                }
            }
        }
    }
    if let Ok(rd) = fs::read_dir(RUN_ROOT) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some() {
                out.push((name.clone(), format!("run directory {}", e.path().display())));
            }
        }
    }
    if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
        for l in mounts.lines() {
            let dir = l.split_whitespace().nth(1).unwrap_or("");
            if let Some(rest) = dir.strip_prefix(&format!("{RUN_ROOT}/")) {
                let id = rest.split('/').next().unwrap_or("").to_string();
                out.push((id, format!("mount {dir}")));
            }
        }
    }
    out
}

/// Removes leftovers of runs whose process is gone. Returns what it removed.
pub fn sweep_dead_runs() -> Vec<String> {
    let mut removed = Vec::new();
    for (id, what) in leftovers() {
        let alive = owner_pid(&id).is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if alive {
            continue;
        }
        remove_leftover(&what);
        removed.push(what);
    }
    removed
}

fn remove_leftover(what: &str) {
    let (kind, name) = what.split_once(' ').unwrap_or(("", what));
    match kind {
        "netns" => delete_netns(name),
        "mount" => {
            let _gone_is_fine = umount2(name, MntFlags::MNT_DETACH);
        }
        "cgroup" => remove_cgroup_tree(Path::new(name)),
        "run" => {
            let dir = name.trim_start_matches("directory ");
            for m in fs::read_to_string("/proc/self/mounts").unwrap_or_default().lines() {
                let d = m.split_whitespace().nth(1).unwrap_or("");
                if d.starts_with(dir) {
                    let _gone_is_fine = umount2(d, MntFlags::MNT_DETACH);
                }
            }
            if let Err(e) = fs::remove_dir_all(dir) {
                eprintln!("sweep: removing {dir}: {e}");
            }
        }
        _ => {}
    }
}
