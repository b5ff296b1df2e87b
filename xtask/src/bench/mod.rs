//! `cargo xtask bench`: ambit against the baselines, side by side, in one run
//! (docs/benchmark.md, "Method"): alternating rounds, medians with min–max, ratios as
//! the headline, results in `target/bench/` (markdown and JSON).

mod callgrind;
pub mod count;
mod load;
mod profile;
mod report;
pub mod soak;
mod topology;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use ambit_testbed::Bed;
use report::{Row, Samples, Target};
use topology::{Config, Topology};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Alternating rounds (at least 5 for a result worth quoting).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Idle tunnelled connections held for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: u32,
    /// Use the debug build (to check the harness; figures mean little).
    #[arg(long)]
    debug: bool,
    /// Instead of the rounds: profile ambit's proxies (perf, software clock) under a bulk
    /// transfer, a connection storm and fixed-rate requests; reports in target/bench/.
    /// Installs linux-perf when missing.
    #[arg(long)]
    pub profile: bool,
}

const CONFIGS: [Config; 4] = [Config::Direct, Config::Relay, Config::Splice, Config::Ambit];
const LAT_CONNS: [u32; 3] = [1, 4, 16];
const LAT_RATE: u32 = 1000;
const LAT_SECS: f64 = 2.0;
const CONN_SECS: f64 = 2.0;
const CONN_PARALLEL: u32 = 4;

struct Progress {
    started: Instant,
}

impl Progress {
    fn say(&self, what: &str) {
        let t = self.started.elapsed().as_secs();
        println!("[{:02}:{:02}] {what}", t / 60, t % 60);
    }
}

/// Proxy CPU seconds of a configuration (both nodes).
fn cpu(topo: &Topology<'_>, c: Config) -> anyhow::Result<f64> {
    topo.proxy_pids(c).iter().map(|p| load::cpu_seconds(*p)).sum()
}

fn measure(
    topo: &Topology<'_>,
    c: Config,
    scope: &str,
    args: &BenchArgs,
    s: &mut Samples,
    p: &Progress,
) -> anyhow::Result<()> {
    let pods = topo.pods(c);
    let server = if scope == "cross" { &pods.cross } else { &pods.same };
    let name = c.name();
    for streams in [1u32, 4] {
        let before = cpu(topo, c)?;
        let (busy0, avail0) = load::machine_cpu_seconds()?;
        let (gbps, bytes) = load::iperf(&pods.client, server, streams, args.secs)?;
        let (busy1, avail1) = load::machine_cpu_seconds()?;
        let cpu_s = cpu(topo, c)? - before;
        s.add(&format!("{scope}.throughput_{streams}"), name, gbps);
        let gb = bytes as f64 / 1e9;
        if c != Config::Direct && bytes > 0 {
            s.add(&format!("{scope}.cpu_per_gb_{streams}"), name, cpu_s / gb);
        }
        let (busy, avail) = (busy1 - busy0, avail1 - avail0);
        if bytes > 0 && avail > 0.0 {
            s.add(&format!("{scope}.machine_cpu_per_gb_{streams}"), name, busy / gb);
            s.add(&format!("{scope}.machine_busy_{streams}"), name, 100.0 * busy / avail);
        }
        p.say(&format!(
            "{scope} {name}: iperf3 {streams} stream(s) {gbps:.2} Gbit/s, proxies {cpu_s:.2} CPU-s, machine {busy:.2} of {avail:.2} CPU-s busy"
        ));
    }
    for conns in LAT_CONNS {
        let l = load::latency(&pods.client, server, conns, LAT_RATE, LAT_SECS)?;
        for (q, v) in [("p50", l.p50), ("p90", l.p90), ("p99", l.p99)] {
            s.add(&format!("{scope}.latency_{conns}.{q}"), name, v);
        }
        p.say(&format!(
            "{scope} {name}: {LAT_RATE} req/s over {conns} connection(s): p50 {:.0} µs, p99 {:.0} µs ({} requests)",
            l.p50, l.p99, l.requests
        ));
    }
    // The splice relay is a floor for what a proxy hop costs per byte and per request; its
    // connections are the relay's.
    if c == Config::Splice {
        return Ok(());
    }
    let rate = load::connrate(&pods.client, server, CONN_SECS, CONN_PARALLEL)?;
    s.add(&format!("{scope}.connections_per_s"), name, rate);
    p.say(&format!("{scope} {name}: {rate:.0} new connections/s"));
    Ok(())
}

/// Connections the relay can hold: it keeps two descriptors per connection per node, and
/// without CAP_SYS_RESOURCE the open-files limit cannot be raised past the hard limit.
fn relay_capacity() -> u32 {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE)
        .map_or(4096, |(_, hard)| (hard.saturating_sub(256) / 2).min(u64::from(u32::MAX)) as u32)
}

/// RSS of the proxies with `n` idle connections through them, minus without (per
/// connection, so the relay's figure holds with fewer connections when its limit is lower).
fn memory(topo: &Topology<'_>, c: Config, n: u32, s: &mut Samples, p: &Progress) -> anyhow::Result<()> {
    let n = if c == Config::Relay { n.min(relay_capacity()) } else { n };
    let pids = topo.proxy_pids(c);
    let before: Vec<f64> = pids.iter().map(|p| load::rss_bytes(*p)).collect::<Result<_, _>>()?;
    let pods = topo.pods(c);
    let held = load::hold(topo.bed, &pods.client, &pods.cross, n, 600)?;
    // Let the proxies settle (connections accepted, tunnels opened).
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<f64> = pids.iter().map(|p| load::rss_bytes(*p)).collect::<Result<_, _>>()?;
    drop(held);
    let per_proxy: Vec<f64> =
        before.iter().zip(&after).map(|(b, a)| (a - b) / f64::from(n) / 1024.0).collect();
    let both: f64 = per_proxy.iter().sum();
    s.add("memory.kib_per_idle_connection_both_proxies", c.name(), both);
    s.add("memory.kib_per_idle_connection_source_proxy", c.name(), per_proxy[0]);
    s.add("memory.kib_per_idle_connection_destination_proxy", c.name(), per_proxy[1]);
    p.say(&format!(
        "{}: {n} idle connections: {both:.2} KiB each for both proxies ({:.2} + {:.2})",
        c.name(),
        per_proxy[0],
        per_proxy[1]
    ));
    // The connections close when the holder goes; wait until the proxies let them go.
    std::thread::sleep(Duration::from_secs(2));
    // What the burst left behind: tables sized for it, memory the allocator kept — once
    // ambit's heap trimmer has looked (every 10 s).
    std::thread::sleep(Duration::from_secs(11));
    let released: Vec<f64> = pids.iter().map(|p| load::rss_bytes(*p)).collect::<Result<_, _>>()?;
    let kept: f64 = before.iter().zip(&released).map(|(b, r)| (r - b) / 1048576.0).sum();
    s.add("memory.kept_after_close_mib", c.name(), kept);
    p.say(&format!("{}: after they closed, both proxies keep {kept:.2} MiB more than before", c.name()));
    Ok(())
}

/// Per round, a series minus direct's: what the proxies add.
fn added(s: &mut Samples) {
    let figures: Vec<String> = s.0.keys().filter(|k| k.contains(".latency_")).cloned().collect();
    for f in figures {
        let m = s.0[&f].clone();
        let Some(direct) = m.get("direct") else { continue };
        for series in ["ambit", "relay", "splice"] {
            for (x, d) in m.get(series).into_iter().flatten().zip(direct) {
                s.add(&f, &format!("{series}_added"), x - d);
            }
        }
    }
}

fn rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for (scope, label) in [("cross", "cross-node"), ("same", "same node")] {
        // The splice floor runs cross-node only.
        let series = |all: &[&'static str], cross_only: &[&'static str]| -> Vec<&'static str> {
            let extra = if scope == "cross" { cross_only } else { &[] };
            all.iter().chain(extra).copied().collect()
        };
        for streams in [1, 4] {
            rows.push(Row {
                label: format!("{label} throughput, {streams} stream(s)"),
                figure: format!("{scope}.throughput_{streams}"),
                unit: "Gbit/s",
                digits: 2,
                ratios: if scope == "cross" {
                    vec![
                        ("ambit/direct", "ambit", "direct"),
                        ("relay/direct", "relay", "direct"),
                        ("splice/direct", "splice", "direct"),
                        ("ambit/relay", "ambit", "relay"),
                    ]
                } else {
                    vec![
                        ("ambit/direct", "ambit", "direct"),
                        ("relay/direct", "relay", "direct"),
                        ("ambit/relay", "ambit", "relay"),
                    ]
                },
                series: series(&["ambit", "relay", "direct"], &["splice", "ambit_notrace"]),
            });
        }
        for conns in LAT_CONNS {
            for q in ["p50", "p90", "p99"] {
                rows.push(Row {
                    label: format!("{label} latency added at {LAT_RATE} req/s, {conns} conn, {q}"),
                    figure: format!("{scope}.latency_{conns}.{q}"),
                    unit: "µs",
                    digits: 0,
                    ratios: vec![],
                    series: series(&["ambit_added", "relay_added", "direct"], &["splice_added"]),
                });
            }
        }
        rows.push(Row {
            label: format!("{label} new connections"),
            figure: format!("{scope}.connections_per_s"),
            unit: "per s",
            digits: 0,
            ratios: vec![("ambit/relay", "ambit", "relay"), ("ambit/direct", "ambit", "direct")],
            series: vec!["ambit", "relay", "direct"],
        });
        for streams in [1, 4] {
            rows.push(Row {
                label: format!("{label} proxy CPU, both hops, {streams} stream(s)"),
                figure: format!("{scope}.cpu_per_gb_{streams}"),
                unit: "CPU-s/GB",
                digits: 3,
                ratios: vec![("ambit/relay", "ambit", "relay")],
                series: series(&["ambit", "relay"], &["splice"]),
            });
        }
        for streams in [1, 4] {
            let machine = series(&["ambit", "relay", "direct"], &["splice"]);
            rows.push(Row {
                label: format!("{label} whole machine CPU, {streams} stream(s)"),
                figure: format!("{scope}.machine_cpu_per_gb_{streams}"),
                unit: "CPU-s/GB",
                digits: 3,
                ratios: vec![("ambit/direct", "ambit", "direct")],
                series: machine.clone(),
            });
            rows.push(Row {
                label: format!("{label} whole machine busy, {streams} stream(s)"),
                figure: format!("{scope}.machine_busy_{streams}"),
                unit: "% of all CPUs",
                digits: 0,
                ratios: vec![],
                series: machine,
            });
        }
    }
    for (f, l) in [
        ("memory.kib_per_idle_connection_both_proxies", "memory per idle tunnelled connection, both proxies"),
        ("memory.kib_per_idle_connection_source_proxy", "memory per idle connection, source proxy"),
        ("memory.kib_per_idle_connection_destination_proxy", "memory per idle connection, destination proxy"),
    ] {
        rows.push(Row {
            label: l.into(),
            figure: f.into(),
            unit: "KiB",
            digits: 2,
            ratios: vec![],
            series: vec!["ambit", "relay"],
        });
    }
    rows.push(Row {
        label: "memory kept after the idle connections closed, both proxies".into(),
        figure: "memory.kept_after_close_mib".into(),
        unit: "MiB",
        digits: 2,
        ratios: vec![],
        series: vec!["ambit", "relay"],
    });
    for (f, l) in [
        ("memory.idle_rss_mib", "idle RSS per proxy"),
        ("memory.idle_rss_private_mib", "idle RSS per proxy: private (heap, stacks)"),
        ("memory.idle_rss_file_mib", "idle RSS per proxy: mapped from files (code, shared)"),
    ] {
        rows.push(Row {
            label: l.into(),
            figure: f.into(),
            unit: "MiB",
            digits: 1,
            ratios: vec![],
            series: vec!["ambit"],
        });
    }
    rows
}

fn med(s: &Samples, f: &str, series: &str) -> Option<f64> {
    s.get(f, series).map(|x| x.median)
}

fn targets(s: &Samples) -> Vec<Target> {
    let ratio = |f: &str, a: &str, b: &str| s.ratio(f, a, b).map(|x| x.median);
    let at_least = |what: &str, v: Option<f64>, goal: f64| Target {
        what: what.into(),
        value: v,
        goal: format!(">= {goal}"),
        met: v.map(|v| v >= goal),
    };
    let at_most = |what: &str, v: Option<f64>, goal: f64| Target {
        what: what.into(),
        value: v,
        goal: format!("<= {goal}"),
        met: v.map(|v| v <= goal),
    };
    let ambit_p50 = med(s, "cross.latency_1.p50", "ambit_added");
    let relay_p50 = med(s, "cross.latency_1.p50", "relay_added");
    let rss = med(s, "memory.idle_rss_mib", "ambit");
    vec![
        at_least(
            "cross-node throughput, 1 stream, ambit/direct",
            ratio("cross.throughput_1", "ambit", "direct"),
            0.6,
        ),
        at_least(
            "cross-node throughput, 4 streams, ambit/direct",
            ratio("cross.throughput_4", "ambit", "direct"),
            0.4,
        ),
        at_most("added p50 at 1000 req/s, 1 connection (µs)", ambit_p50, 80.0),
        Target {
            what: "added p50, ambit minus relay (µs)".into(),
            value: ambit_p50.zip(relay_p50).map(|(a, r)| a - r),
            goal: "<= 0".into(),
            met: ambit_p50.zip(relay_p50).map(|(a, r)| a <= r),
        },
        at_most("proxy CPU-seconds per GB, both hops, 1 stream", med(s, "cross.cpu_per_gb_1", "ambit"), 1.0),
        at_least(
            "new connections per second, ambit/relay",
            ratio("cross.connections_per_s", "ambit", "relay"),
            1.2,
        ),
        at_most(
            "KiB per idle tunnelled connection, both proxies",
            med(s, "memory.kib_per_idle_connection_both_proxies", "ambit"),
            4.0,
        ),
        at_most("idle RSS per proxy (MB)", rss.map(|m| m * 1.048_576), 15.0),
        at_least(
            "throughput with tracing on / off, 1 stream",
            ratio("cross.throughput_1", "ambit", "ambit_notrace"),
            0.95,
        ),
        at_least(
            "throughput with tracing on / off, 4 streams",
            ratio("cross.throughput_4", "ambit", "ambit_notrace"),
            0.95,
        ),
    ]
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark builds network namespaces and loads eBPF programs: run it as root");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let profile = if args.debug { "debug" } else { "release" };
    // Experiments: measure binaries built elsewhere (other profile settings) as they are.
    if let Some(dir) = std::env::var_os("AMBIT_BENCH_BIN_DIR") {
        std::env::set_var("AMBIT_BIN_DIR", dir);
    } else {
        crate::build(!args.debug)?;
        std::env::set_var("AMBIT_BIN_DIR", crate::root().join("target").join(profile));
    }
    let p = Progress { started: Instant::now() };
    p.say(&format!("building the bed ({profile} build, {} rounds)", args.rounds));
    let bed = Bed::new("bench");
    let topo = Topology::build(&bed)?;
    if args.profile {
        for line in profile::run(&topo, args.secs.max(3.0))? {
            p.say(&line);
        }
        return Ok(());
    }
    let mut s = Samples::default();
    for (i, pid) in topo.proxy_pids(Config::Ambit).iter().enumerate() {
        let mib = load::rss_bytes(*pid)? / 1048576.0;
        let file = load::rss_file_bytes(*pid)? / 1048576.0;
        s.add("memory.idle_rss_mib", "ambit", mib);
        s.add("memory.idle_rss_file_mib", "ambit", file);
        s.add("memory.idle_rss_private_mib", "ambit", mib - file);
        p.say(&format!(
            "ambit on node {}: idle RSS {mib:.1} MiB ({file:.1} MiB of it mapped from files)",
            if i == 0 { "a" } else { "b" }
        ));
    }
    // Memory first, once, on fresh proxies: memory freed after other load stays with the
    // allocator, and idle connections made later would reuse it and look free.
    for c in [Config::Ambit, Config::Relay] {
        memory(&topo, c, args.idle_connections, &mut s, &p)?;
    }
    p.say("warming up");
    for c in CONFIGS {
        let pods = topo.pods(c);
        load::iperf(&pods.client, &pods.cross, 1, 1.0).with_context(|| format!("warm-up of {}", c.name()))?;
        load::latency(&pods.client, &pods.cross, 1, LAT_RATE, 1.0)?;
    }
    for round in 0..args.rounds {
        p.say(&format!("round {}/{}", round + 1, args.rounds));
        // Alternate the order: A B C, B C A, C A B, ...
        let order: Vec<Config> =
            (0..CONFIGS.len()).map(|i| CONFIGS[(i + round as usize) % CONFIGS.len()]).collect();
        for scope in ["cross", "same"] {
            for &c in &order {
                if c == Config::Splice && scope == "same" {
                    continue;
                }
                measure(&topo, c, scope, &args, &mut s, &p)?;
            }
        }
        topo.ambit_tracing(false)?;
        for streams in [1u32, 4] {
            let pods = topo.pods(Config::Ambit);
            let (gbps, _) = load::iperf(&pods.client, &pods.cross, streams, args.secs)?;
            s.add(&format!("cross.throughput_{streams}"), "ambit_notrace", gbps);
            p.say(&format!("cross ambit, tracing off: iperf3 {streams} stream(s) {gbps:.2} Gbit/s"));
        }
        topo.ambit_tracing(true)?;
    }
    added(&mut s);
    let elapsed = p.started.elapsed().as_secs();
    let meta = json!({
        "rounds": args.rounds,
        "seconds_per_throughput_run": args.secs,
        "build": profile,
        "elapsed_s": elapsed,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "note": "cross-node: client pod on node A, server pod on node B (veth, MTU 1500); ambit: eBPF capture + HBONE mTLS, access log off (--log-level warn), kernel tracing on unless 'notrace'; relay: userspace relay per node behind iptables REDIRECT, plaintext; splice: the same relay moving bytes with splice(2), no userspace copy (a floor: throughput, CPU and latency, cross-node); direct: no proxy. Whole machine: /proc/stat busy time during the iperf3 run, both ends and every proxy included.",
    });
    let targets = targets(&s);
    let md = report::markdown(&s, &rows(), &targets, &meta);
    let js = report::json(&s, &targets, &meta);
    let dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for (name, body) in [
        (format!("bench-{stamp}.md"), md.clone()),
        ("latest.md".into(), md.clone()),
        (format!("bench-{stamp}.json"), serde_json::to_string_pretty(&js)?),
        ("latest.json".into(), serde_json::to_string_pretty(&js)?),
    ] {
        std::fs::write(dir.join(&name), body).with_context(|| format!("writing target/bench/{name}"))?;
    }
    println!("\n{md}");
    p.say(&format!(
        "done in {}m{:02}s; results in target/bench/latest.md and latest.json",
        elapsed / 60,
        elapsed % 60
    ));
    Ok(())
}
