//! `cargo xtask soak`: many idle tunnelled connections held across two nodes for minutes,
//! the proxies' memory sampled all along, every connection checked alive at the end. The
//! bench's topology; a release build; results in `target/soak/`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use super::{load, topology::Config, topology::Topology, Progress};
use ambit_testbed::Bed;

#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// Idle connections held through ambit (cross-node, one HBONE pool).
    #[arg(long, default_value_t = 10_000)]
    connections: u32,
    /// How long they are held.
    #[arg(long, default_value_t = 3)]
    minutes: u32,
    /// Seconds between memory samples.
    #[arg(long, default_value_t = 15)]
    every: u64,
    /// Memory may not grow more than this (percent of the first sample) while held.
    #[arg(long, default_value_t = 5.0)]
    max_growth: f64,
}

pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    crate::build(true)?;
    std::env::set_var("AMBIT_BIN_DIR", crate::root().join("target").join("release"));
    let p = Progress { started: Instant::now() };
    p.say(&format!("building the bed: {} connections for {} minutes", args.connections, args.minutes));
    let bed = Bed::new("soak");
    let topo = Topology::build(&bed)?;
    let pids = topo.proxy_pids(Config::Ambit);
    let rss = || -> anyhow::Result<Vec<f64>> { pids.iter().map(|p| load::rss_bytes(*p)).collect() };
    let idle = rss()?;
    let pods = topo.pods(Config::Ambit);
    let hold_secs = args.minutes * 60;
    let mut held = load::hold(topo.bed, &pods.client, &pods.cross, args.connections, hold_secs)?;
    let n = f64::from(args.connections);
    let mut samples = Vec::new();
    let until = Instant::now() + Duration::from_secs(u64::from(hold_secs));
    loop {
        let now = rss()?;
        let per_conn: f64 = now.iter().zip(&idle).map(|(a, b)| (a - b) / n / 1024.0).sum();
        p.say(&format!(
            "{} held: RSS {:.1} + {:.1} MiB, {per_conn:.2} KiB per connection for both proxies",
            args.connections,
            now[0] / 1048576.0,
            now[1] / 1048576.0
        ));
        samples.push((p.started.elapsed().as_secs(), now, per_conn));
        if Instant::now() + Duration::from_secs(args.every) > until {
            break;
        }
        std::thread::sleep(Duration::from_secs(args.every));
    }
    // The holder checks every connection with an echo after its time, then prints.
    held.wait_for_output("alive", Duration::from_secs(u64::from(hold_secs) + 180))
        .context("waiting for the holder's final check")?;
    let verdict = held.output().lines().find(|l| l.starts_with("alive")).unwrap_or_default().to_string();
    p.say(&verdict);

    let (first, last) = (samples.first().context("no sample")?.2, samples.last().context("no sample")?.2);
    let growth = if first > 0.0 { (last - first) / first * 100.0 } else { 0.0 };
    let mut md = format!(
        "# ambit soak\n\n{} idle tunnelled connections across two nodes for {} minutes (release \
         build). Memory per connection is both proxies' RSS minus their idle RSS, divided by the \
         connections.\n\n| s | RSS node A (MiB) | RSS node B (MiB) | KiB per connection |\n|---|---|---|---|\n",
        args.connections, args.minutes
    );
    for (t, r, per) in &samples {
        md.push_str(&format!("| {t} | {:.1} | {:.1} | {per:.2} |\n", r[0] / 1048576.0, r[1] / 1048576.0));
    }
    md.push_str(&format!("\n{verdict}; memory growth while held: {growth:+.1}%\n"));
    let dir = crate::root().join("target/soak");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("latest.md"), &md).context("writing target/soak/latest.md")?;
    println!("\n{md}");
    if verdict != format!("alive {0} of {0}", args.connections) {
        bail!("connections were lost while held: {verdict}");
    }
    if growth > args.max_growth {
        bail!("memory grew {growth:.1}% while the connections were idle (limit {}%)", args.max_growth);
    }
    Ok(())
}
