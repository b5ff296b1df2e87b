//! `cargo xtask link-order`: which functions ambit runs, for `userspace/link-order.txt`.
//!
//! The kernel maps a binary's code 64 KiB around every page a process touches. ambit's
//! start-up (configuration, eBPF loading, TLS, xDS) and its data path run a few MB of
//! functions spread over all 14 MB of `.text`, so nearly all of it stayed resident in an
//! idle proxy. Release builds place the functions listed in `link-order.txt` first, together
//! (`userspace/build.rs`, LLD's `--symbol-ordering-file`), which keeps an idle proxy's code
//! to about the size of those functions.
//!
//! This runs the bench's topology with both node proxies under `valgrind --tool=callgrind`,
//! drives the bench's workloads through them (idle connections, bulk, request/response,
//! connection storms, cross-node and same-node), and lists every function of the binary
//! that ran, the ones that cost the most instructions first (the hot path stays dense).
//! Run it again after dependency or toolchain updates: symbol names carry crate hashes,
//! and names the build no longer has are skipped (the bench reports how many still match).

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use super::{load, topology::Config, topology::Topology, Progress};
use ambit_testbed::Bed;

/// The list, relative to the workspace root.
pub const FILE: &str = "userspace/link-order.txt";

pub fn run() -> anyhow::Result<()> {
    preflight("link-order", &["valgrind", "callgrind_control", "nm"])?;
    let (bed, out) = callgrind_bed("order")?;
    let binary = crate::root().join("target/release/ambit");
    let p = Progress { started: Instant::now() };
    p.say("building the bed, node proxies under callgrind (start-up takes a while)");
    let topo = Topology::build(&bed)?;
    let pids = topo.proxy_pids(Config::Ambit);
    drive(&topo, &p)?;
    control(&pids, "-d")?;
    let profiles = wait_for_profiles(&out, &pids, 1)?;
    let defined = defined_functions(&binary)?;
    let mut cost: HashMap<String, u64> = HashMap::new();
    for file in &profiles {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for (name, c) in self_costs(&text) {
            *cost.entry(name).or_default() += c;
        }
    }
    let mut ran: Vec<(String, u64)> = cost.into_iter().filter(|(n, _)| defined.contains_key(n)).collect();
    // Hottest first; the name breaks ties so the file is the same for the same profile.
    ran.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if ran.len() < 500 {
        bail!("only {} of the binary's functions ran: the profile looks incomplete", ran.len());
    }
    let bytes: u64 = ran.iter().map(|(n, _)| defined[n]).sum();
    let mut list = String::new();
    for (name, _) in &ran {
        list.push_str(name);
        list.push('\n');
    }
    let path = crate::root().join(FILE);
    std::fs::write(&path, list).with_context(|| format!("writing {}", path.display()))?;
    p.say(&format!(
        "{} functions ({:.1} MB of code) ran; listed in {FILE}: rebuild (`cargo build --release`) to apply",
        ran.len(),
        bytes as f64 / 1e6
    ));
    Ok(())
}

/// Root, and the tools a callgrind run needs, or an error naming what is missing.
pub(super) fn preflight(what: &str, tools: &[&str]) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} builds network namespaces and loads eBPF programs: run it as root");
    }
    for tool in tools {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.stdout.is_empty() {
            bail!("{tool} not found (Debian packages valgrind and binutils)");
        }
    }
    Ok(())
}

/// The release build, and a bed whose node proxies will run under callgrind (profiles in the
/// returned directory) once the topology is built on it.
pub(super) fn callgrind_bed(name: &str) -> anyhow::Result<(Bed, PathBuf)> {
    crate::build(true)?;
    let release = crate::root().join("target/release");
    let bed = Bed::new(name);
    let out = bed.dir().join("callgrind");
    let bin_dir = wrapper_dir(&bed, &release, &out)?;
    std::env::set_var("AMBIT_BIN_DIR", &bin_dir);
    Ok((bed, out))
}

/// `callgrind_control <flag>` for each proxy: `-z` zeroes its counters, `-d` dumps a profile.
pub(super) fn control(pids: &[u32], flag: &str) -> anyhow::Result<()> {
    for pid in pids {
        let out = Command::new("callgrind_control").arg(flag).arg(pid.to_string()).output()?;
        if !out.status.success() {
            bail!("callgrind_control {flag} {pid}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// A directory with the release binaries, where `ambit` runs `ambit node` under callgrind.
fn wrapper_dir(bed: &Bed, release: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let dir = bed.dir().join("bin");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(out)?;
    for entry in std::fs::read_dir(release)?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let executable = path.is_file()
            && std::os::unix::fs::PermissionsExt::mode(&entry.metadata()?.permissions()) & 0o111 != 0;
        if executable && name != "ambit" {
            std::os::unix::fs::symlink(&path, dir.join(&name))?;
        }
    }
    let ambit = release.join("ambit");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = node ]; then\n  exec valgrind --tool=callgrind --demangle=no -q \
         --callgrind-out-file={}/cg.%p {} \"$@\"\nfi\nexec {} \"$@\"\n",
        out.display(),
        ambit.display(),
        ambit.display()
    );
    let wrapper = dir.join("ambit");
    std::fs::write(&wrapper, script)?;
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(dir)
}

/// The bench's workloads, short: what a proxy runs in production is what should be dense.
fn drive(topo: &Topology<'_>, p: &Progress) -> anyhow::Result<()> {
    let pods = topo.pods(Config::Ambit);
    // Idle first: the timers and keepalives an idle proxy runs.
    std::thread::sleep(Duration::from_secs(5));
    let held = load::hold(topo.bed, &pods.client, &pods.cross, 200, 10)?;
    drop(held);
    for server in [&pods.cross, &pods.same] {
        p.say(&format!("driving traffic to {}", server.name));
        // Under callgrind the proxies are slow: an iperf3 server can still be finishing the
        // last test. Each workload gets a second try; the profile needs them all.
        let client = &pods.client;
        twice(p, "iperf3, 1 stream", || load::iperf(client, server, 1, 2.0).map(drop))?;
        twice(p, "iperf3, 4 streams", || load::iperf(client, server, 4, 2.0).map(drop))?;
        twice(p, "request/response", || load::latency(client, server, 4, 200, 2.0).map(drop))?;
        twice(p, "connection storm", || load::connrate(client, server, 2.0, 2).map(drop))?;
    }
    topo.ambit_tracing(false)?;
    topo.ambit_tracing(true)?;
    Ok(())
}

fn twice(p: &Progress, what: &str, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(e) = f() {
        p.say(&format!("{what}: {e:#}; again in 5 s"));
        std::thread::sleep(Duration::from_secs(5));
        return f().with_context(|| format!("{what}, second try"));
    }
    Ok(())
}

/// Callgrind writes `cg.<pid>.<n>` on its n-th dump request; waits until each is complete.
pub(super) fn wait_for_profiles(dir: &Path, pids: &[u32], n: u32) -> anyhow::Result<Vec<PathBuf>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let files: Vec<PathBuf> = pids.iter().map(|p| dir.join(format!("cg.{p}.{n}"))).collect();
    loop {
        let complete = files
            .iter()
            .all(|f| std::fs::read_to_string(f).is_ok_and(|t| t.lines().any(|l| l.starts_with("totals:"))));
        if complete {
            return Ok(files);
        }
        if Instant::now() > deadline {
            bail!("callgrind wrote no complete profile in {} within 60 s", dir.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The binary's functions (symbol → size), as `nm` lists them.
fn defined_functions(binary: &Path) -> anyhow::Result<HashMap<String, u64>> {
    let out = Command::new("nm").args(["--defined-only", "-S"]).arg(binary).output().context("running nm")?;
    if !out.status.success() {
        bail!("nm {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    let mut map = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [_, size, kind, name] = f[..] {
            if matches!(kind, "t" | "T" | "w" | "W") {
                map.insert(name.to_string(), u64::from_str_radix(size, 16).unwrap_or(0));
            }
        }
    }
    Ok(map)
}

/// Instructions spent in each function itself, from a callgrind profile: cost lines under
/// `fn=` count, except the one after `calls=` (that is the callee's inclusive cost).
/// Names are compressed: `fn=(7) name` the first time, `fn=(7)` after.
fn self_costs(text: &str) -> HashMap<String, u64> {
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut costs: HashMap<String, u64> = HashMap::new();
    let mut current: Option<&str> = None;
    let mut after_call = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("fn=").or_else(|| line.strip_prefix("cfn=")) {
            let (id, name) = match rest.split_once(' ') {
                Some((id, name)) => {
                    names.insert(id, name);
                    (id, Some(name))
                }
                None => (rest, names.get(rest).copied()),
            };
            if line.starts_with("fn=") {
                current = name.or_else(|| names.get(id).copied());
                if let Some(n) = current {
                    costs.entry(n.to_string()).or_default();
                }
            }
            continue;
        }
        if line.starts_with("calls=") {
            after_call = true;
            continue;
        }
        let first = line.as_bytes().first().copied().unwrap_or(b' ');
        if first.is_ascii_digit() || matches!(first, b'+' | b'-' | b'*') {
            if after_call {
                after_call = false;
                continue;
            }
            let ir = line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if let Some(n) = current {
                *costs.entry(n.to_string()).or_default() += ir;
            }
        }
    }
    costs
}

/// How many of the listed functions the binary has: the list is stale when this drops.
pub fn coverage(binary: &Path) -> anyhow::Result<(usize, usize)> {
    let path = crate::root().join(FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let listed: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let defined: HashSet<String> = defined_functions(binary)?.into_keys().collect();
    Ok((listed.iter().filter(|n| defined.contains(**n)).count(), listed.len()))
}

#[cfg(test)]
mod tests {
    use super::self_costs;

    #[test]
    fn self_cost_skips_the_callees_inclusive_cost() {
        let profile = "events: Ir\nfl=(1) a.rs\nfn=(1) main\n3 10\ncfn=(2) work\ncalls=1 5\n5 1000\n4 2\n\
                       fn=(2)\n5 900\nfn=(1)\n6 1\n";
        let c = self_costs(profile);
        assert_eq!(c["main"], 13);
        assert_eq!(c["work"], 900);
    }
}
