//! `cargo xtask bench --profile`: where ambit's proxies spend their CPU under a bulk transfer
//! and under a connection storm — `perf record` (software clock, so it works without hardware
//! counters) on both proxies while the workload runs, reported flat by symbol into
//! `target/bench/profile-<workload>.txt`; and which system calls each proxy makes per new
//! connection (`perf trace -s`), into `target/bench/syscalls-<config>.txt`.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context};

use super::{
    load,
    topology::{Config, Topology},
};

fn perf_report(data: &Path, out: &Path) -> anyhow::Result<()> {
    let report = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "dso,symbol", "--percent-limit", "0.5", "-i"])
        .arg(data)
        .output()
        .context("running perf report")?;
    if !report.status.success() {
        bail!("perf report: {}", String::from_utf8_lossy(&report.stderr));
    }
    std::fs::write(out, &report.stdout).with_context(|| format!("writing {}", out.display()))
}

/// `config`'s proxies as `perf -p` takes them.
fn pid_list(topo: &Topology<'_>, config: Config) -> String {
    topo.proxy_pids(config).iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Records both of `config`'s proxies while `work` runs; `secs`: how long to record.
fn record(
    topo: &Topology<'_>,
    config: Config,
    name: &str,
    secs: f64,
    work: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    let dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let data = dir.join(format!("perf-{name}.data"));
    let pids = pid_list(topo, config);
    // Call stacks say which copy a `memmove` is, at the price of a lower rate and large data.
    let stacks = std::env::var_os("AMBIT_PROFILE_STACKS").is_some_and(|v| v == "1");
    let sampling: &[&str] =
        if stacks { &["-F", "1000", "--call-graph", "dwarf,8192"] } else { &["-F", "8000"] };
    let mut perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock"])
        .args(sampling)
        .args(["-p", &pids, "-o"])
        .arg(&data)
        .args(["--", "sleep", &format!("{secs}")])
        .spawn()
        .context("starting perf record (Debian package linux-perf)")?;
    std::thread::sleep(Duration::from_millis(300));
    let result = work();
    let status = perf.wait().context("waiting for perf record")?;
    if !status.success() {
        bail!("perf record failed: {status}");
    }
    let summary = result?;
    let txt = dir.join(format!("profile-{name}.txt"));
    perf_report(&data, &txt)?;
    Ok(format!("{summary}; profile in {}", txt.display()))
}

/// Counts what `config`'s proxies spend per operation while `work` runs (it returns how many
/// operations it made): `perf stat` of CPU time, context switches and system calls. At low
/// rates latency is each hop's CPU time and wakeups, which a CPU profile spreads thin.
fn sched_counts(
    topo: &Topology<'_>,
    config: Config,
    what: &str,
    secs: f64,
    work: impl FnOnce() -> anyhow::Result<u64>,
) -> anyhow::Result<String> {
    let pids = pid_list(topo, config);
    let perf = Command::new("perf")
        .args(["stat", "-x", ",", "-e", "task-clock,context-switches,raw_syscalls:sys_enter", "-p", &pids])
        .args(["--", "sleep", &format!("{secs}")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting perf stat")?;
    std::thread::sleep(Duration::from_millis(300));
    let ops = work()?.max(1);
    let out = perf.wait_with_output().context("waiting for perf stat")?;
    if !out.status.success() {
        bail!("perf stat failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut parts = Vec::new();
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        let f: Vec<&str> = line.split(',').collect();
        if let (Some(v), Some(name)) = (f.first().and_then(|v| v.parse::<f64>().ok()), f.get(2)) {
            parts.push(format!("{name} {:.3}", v / ops as f64));
        }
    }
    Ok(format!("{config:?}, per {what}: {}", parts.join(", ")))
}

/// `perf trace -s` output (a table per thread) summed by system call name.
fn syscall_totals(summary: &str) -> std::collections::BTreeMap<String, u64> {
    let mut totals = std::collections::BTreeMap::new();
    for line in summary.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "   name   calls   errors   total   min   avg   max   stddev%"
        if let (Some(name), Some(calls)) = (f.first(), f.get(1).and_then(|c| c.parse::<u64>().ok())) {
            if f.len() >= 7 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                *totals.entry(name.to_string()).or_insert(0) += calls;
            }
        }
    }
    totals
}

/// System calls per new connection of each of `config`'s proxies during a storm, by name,
/// into `target/bench/syscalls-<config>.txt`: where the proxies' kernel time comes from.
fn syscalls_per_connection(
    topo: &Topology<'_>,
    config: Config,
    pods: &super::topology::Pods,
    secs: f64,
) -> anyhow::Result<String> {
    let pids = topo.proxy_pids(config);
    let tracers = pids
        .iter()
        .map(|pid| {
            Command::new("perf")
                .args(["trace", "-s", "-p", &pid.to_string(), "--", "sleep", &format!("{secs}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("starting perf trace")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(300));
    let n = connections(pods, secs)?.max(1);
    let mut report = format!("# {config:?}: system calls per new connection ({n} connections)\n");
    let mut sums = Vec::new();
    for (pid, tracer) in pids.iter().zip(tracers) {
        let out = tracer.wait_with_output().context("waiting for perf trace")?;
        let totals = syscall_totals(&String::from_utf8_lossy(&out.stderr));
        let mut by_count: Vec<_> = totals.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1));
        let sum: u64 = totals.values().sum();
        sums.push(format!("{:.1}", sum as f64 / n as f64));
        report.push_str(&format!("\n## proxy pid {pid}: {:.1} in all\n", sum as f64 / n as f64));
        for (name, calls) in by_count {
            report.push_str(&format!("{name:>24} {:8.2}\n", *calls as f64 / n as f64));
        }
    }
    let dir = crate::root().join("target/bench");
    let file = dir.join(format!("syscalls-{}.txt", format!("{config:?}").to_lowercase()));
    std::fs::write(&file, report).with_context(|| format!("writing {}", file.display()))?;
    Ok(format!(
        "{config:?}, system calls per new connection: {} (per proxy); in {}",
        sums.join(" + "),
        file.display()
    ))
}

/// A connection storm of `secs` (less the start-up margin); how many connections it made.
fn connections(pods: &super::topology::Pods, secs: f64) -> anyhow::Result<u64> {
    let rate = load::connrate(&pods.client, &pods.cross, secs - 0.5, 4)?;
    Ok((rate * (secs - 0.5)) as u64)
}

pub fn run(topo: &Topology<'_>, secs: f64) -> anyhow::Result<Vec<String>> {
    let pods = topo.pods(Config::Ambit);
    let mut out = Vec::new();
    // 4 streams too: they ride pooled connections shared between tunnels, and the machine
    // is CPU-bound with them, where one stream is not.
    for (streams, name) in [(1, "bulk"), (4, "bulk-4")] {
        out.push(record(topo, Config::Ambit, name, secs, || {
            let (gbps, _) = load::iperf(&pods.client, &pods.cross, streams, secs - 0.5)?;
            Ok(format!("{name}: {gbps:.2} Gbit/s"))
        })?);
    }
    out.push(record(topo, Config::Ambit, "connections", secs, || {
        let rate = load::connrate(&pods.client, &pods.cross, secs - 0.5, 4)?;
        Ok(format!("connections: {rate:.0}/s"))
    })?);
    // The relay's too: at 1000 req/s the difference between the two is the question.
    for (config, name) in [(Config::Ambit, "latency"), (Config::Relay, "latency-relay")] {
        let pods = topo.pods(config);
        out.push(record(topo, config, name, secs, || {
            let l = load::latency(&pods.client, &pods.cross, 1, 1000, secs - 0.5)?;
            Ok(format!("{name}: p50 {:.0} µs", l.p50))
        })?);
    }
    let traced = sched_counts(topo, Config::Ambit, "new connection", secs, || connections(pods, secs))?;
    out.push(format!("kernel tracing on: {traced}"));
    topo.ambit_tracing(false)?;
    let untraced = sched_counts(topo, Config::Ambit, "new connection", secs, || connections(pods, secs))?;
    out.push(format!("kernel tracing off: {untraced}"));
    topo.ambit_tracing(true)?;
    for config in [Config::Ambit, Config::Relay] {
        let pods = topo.pods(config);
        // Wake-ups per MB tell a proxy that hands chunks between threads from one that
        // does not, where CPU-seconds per GB alone drift with the machine's load.
        for streams in [1, 4] {
            out.push(sched_counts(topo, config, &format!("MB moved, {streams} stream(s)"), secs, || {
                let (_, bytes) = load::iperf(&pods.client, &pods.cross, streams, secs - 0.5)?;
                Ok(bytes / 1_000_000)
            })?);
        }
        out.push(sched_counts(topo, config, "request at 1000/s", secs, || {
            Ok(load::latency(&pods.client, &pods.cross, 1, 1000, secs - 0.5)?.requests)
        })?);
        out.push(sched_counts(topo, config, "new connection", secs, || connections(pods, secs))?);
        out.push(syscalls_per_connection(topo, config, pods, secs)?);
    }
    Ok(out)
}
