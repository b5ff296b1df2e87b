//! The workloads and the readings: iperf3, fixed-rate request/response, connection rate, idle
//! connections held, and the proxies' CPU time and memory from /proc.

use std::{process::Output, time::Duration};

use anyhow::{bail, Context};
use serde_json::Value;

use ambit_testbed::{exec::workspace_bin, pod_command, run_with_timeout, Bed, Pod, Proc};

pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 7000;

fn json_of(what: &str, out: &Output) -> anyhow::Result<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).with_context(|| {
        format!(
            "{what}: no JSON in its output ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    Ok(v)
}

/// iperf3 from `client` to `server`: (Gbit/s received, bytes received).
pub fn iperf(client: &Pod, server: &Pod, streams: u32, secs: f64) -> anyhow::Result<(f64, u64)> {
    let addr = server.ipv4.to_string();
    let (p, t) = (streams.to_string(), format!("{secs}"));
    let argv = ["iperf3", "-c", &addr, "-p", "5201", "-P", &p, "-t", &t, "-J", "--connect-timeout", "5000"];
    let out = run_with_timeout(pod_command(client, &argv), Duration::from_secs_f64(secs + 20.0))?;
    let v = json_of("iperf3", &out)?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 {} -> {}: {e}", client.name, server.name);
    }
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"].as_f64().context("iperf3: no sum_received")?;
    Ok((bps / 1e9, sum["bytes"].as_f64().unwrap_or(0.0) as u64))
}

/// Latency percentiles (µs) of `bytes` request/response at `rate`/s over `conns` connections.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub requests: u64,
}

fn bench_tool(pod: &Pod, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
    let bin = workspace_bin("bench-tool");
    let mut argv = vec![bin.to_str().expect("utf-8 path")];
    argv.extend_from_slice(args);
    run_with_timeout(pod_command(pod, &argv), timeout)
}

pub fn latency(client: &Pod, server: &Pod, conns: u32, rate: u32, secs: f64) -> anyhow::Result<Latency> {
    let addr = format!("{}:{ECHO_PORT}", server.ipv4);
    let (c, r, s) = (conns.to_string(), rate.to_string(), secs.to_string());
    let out = bench_tool(client, &["rr", &addr, &c, &r, &s, "1024"], Duration::from_secs_f64(secs + 20.0))?;
    let v = json_of("bench-tool rr", &out)?;
    if v["errors"].as_u64() != Some(0) {
        bail!("request/response {} -> {}: {v}", client.name, server.name);
    }
    Ok(Latency {
        p50: v["p50_us"].as_f64().unwrap_or(0.0),
        p90: v["p90_us"].as_f64().unwrap_or(0.0),
        p99: v["p99_us"].as_f64().unwrap_or(0.0),
        requests: v["requests"].as_u64().unwrap_or(0),
    })
}

/// New connections per second (connect, a byte each way, close), `parallel` at a time.
pub fn connrate(client: &Pod, server: &Pod, secs: f64, parallel: u32) -> anyhow::Result<f64> {
    let addr = format!("{}:{ECHO_PORT}", server.ipv4);
    let (s, p) = (secs.to_string(), parallel.to_string());
    let out = bench_tool(client, &["connrate", &addr, &s, &p], Duration::from_secs_f64(secs + 30.0))?;
    let v = json_of("bench-tool connrate", &out)?;
    v["per_second"].as_f64().context("connrate: no rate")
}

/// Opens `n` idle connections from `client` to `server`'s echo port; they stay until the
/// returned process is dropped (or `secs` pass).
pub fn hold<'b>(bed: &'b Bed, client: &Pod, server: &Pod, n: u32, secs: u32) -> anyhow::Result<Proc<'b>> {
    let bin = workspace_bin("bench-tool");
    let addr = format!("{}:{ECHO_PORT}", server.ipv4);
    let (n_s, s) = (n.to_string(), secs.to_string());
    let cmd = pod_command(client, &[bin.to_str().expect("utf-8 path"), "hold", &addr, &n_s, &s]);
    let mut p = Proc::spawn(bed, &format!("hold-{}", client.name), cmd);
    p.wait_for_output(&format!("held {n}"), Duration::from_secs(120))?;
    Ok(p)
}

/// CPU time a process has run, in seconds: every thread's `/proc/<pid>/task/<tid>/schedstat`
/// (threads that ended are not counted, so measure around a run, with the process alive).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns = 0.0;
    for t in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))?.flatten() {
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(t.path().join("schedstat")) else { continue };
        ns += text.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    }
    Ok(ns / 1e9)
}

/// The whole machine's CPU time so far, from `/proc/stat`: (busy seconds, available seconds),
/// all CPUs together. Busy is user, system, interrupts and softirqs — every process's
/// share, the iperf3 ends' and the kernel's network processing included; available adds
/// idle time (time the hypervisor gave to other guests, `steal`, is in neither).
pub fn machine_cpu_seconds() -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().find(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let v: Vec<f64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
    if v.len() < 7 {
        bail!("/proc/stat: short cpu line: {line}");
    }
    // user nice system idle iowait irq softirq [steal ...], in USER_HZ (100 on Linux).
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    let idle = v[3] + v[4];
    Ok((busy / 100.0, (busy + idle) / 100.0))
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<f64> {
    status_bytes(pid, "VmRSS:")
}

/// The part of the resident memory mapped from files (the binary's code and read-only
/// data, shared libraries): pages shared with every process mapping the same file and
/// dropped by the kernel under memory pressure, unlike the private (anonymous) rest.
pub fn rss_file_bytes(pid: u32) -> anyhow::Result<f64> {
    status_bytes(pid, "RssFile:")
}

fn status_bytes(pid: u32, field: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb * 1024.0)
}
