//! `cargo xtask count`: instructions ambit spends per request and per new connection.
//!
//! At the bench's request rate, latency is the sum of each hop's CPU time, spread thin over
//! tokio, h2 and rustls: a sampling profile of it has a few thousand samples. Callgrind counts
//! every instruction instead, which shows what one operation costs down to single
//! allocations. Both node proxies run under `valgrind --tool=callgrind` in the bench's
//! topology; after a warm-up, the counters are zeroed, a fixed load
//! runs, and each proxy's profile is dumped: request/response (1 KiB, one connection) and a
//! connection storm (one byte each way per connection), cross-node. Instruction counts are
//! deterministic enough to compare two builds where the bench's timings are not. Profiles stay
//! in `target/bench/callgrind/` for `callgrind_annotate`.

use std::time::Instant;

use anyhow::Context;

use super::{callgrind, load, topology::Config, topology::Topology, Progress};

/// Requests per second and seconds of the counted request/response load (slow under
/// callgrind, so a rate it keeps up with).
const RR_RATE: u32 = 200;
const RR_SECS: f64 = 10.0;
const STORM_SECS: f64 = 5.0;

pub fn run() -> anyhow::Result<()> {
    callgrind::preflight("count", &["valgrind", "callgrind_control"])?;
    let (bed, out) = callgrind::callgrind_bed("count")?;
    let p = Progress { started: Instant::now() };
    p.say("building the bed, node proxies under callgrind (start-up takes a while)");
    let topo = Topology::build(&bed)?;
    let pids = topo.proxy_pids(Config::Ambit);
    let pods = topo.pods(Config::Ambit);
    p.say("warming up: a pooled HBONE connection, allocator and caches");
    load::latency(&pods.client, &pods.cross, 1, RR_RATE, 2.0)?;
    load::connrate(&pods.client, &pods.cross, 2.0, 2)?;

    callgrind::control(&pids, "-z")?;
    let rr = load::latency(&pods.client, &pods.cross, 1, RR_RATE, RR_SECS)?;
    callgrind::control(&pids, "-d")?;
    let rr_profiles = callgrind::wait_for_profiles(&out, &pids, 1)?;
    p.say(&format!("{} requests counted", rr.requests));

    callgrind::control(&pids, "-z")?;
    let rate = load::connrate(&pods.client, &pods.cross, STORM_SECS, 2)?;
    callgrind::control(&pids, "-d")?;
    let storm_profiles = callgrind::wait_for_profiles(&out, &pids, 2)?;
    let conns = (rate * STORM_SECS).round().max(1.0) as u64;
    p.say(&format!("about {conns} connections counted ({rate:.0}/s under callgrind)"));

    let keep = crate::root().join("target/bench/callgrind");
    std::fs::create_dir_all(&keep)?;
    let mut md = String::from(
        "# ambit: instructions per operation (callgrind, cross-node, both proxies)\n\n\
         | operation | source proxy (node A) | destination proxy (node B) |\n|---|---|---|\n",
    );
    for (what, per, files, n) in [
        ("request/response, 1 KiB", "request", &rr_profiles, rr.requests),
        ("new connection", "connection", &storm_profiles, conns),
    ] {
        let mut cells = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let total = totals(&text).with_context(|| format!("no totals in {}", f.display()))?;
            cells.push(format!("{:.0} per {per}", total as f64 / n.max(1) as f64));
            let node = if i == 0 { "a" } else { "b" };
            std::fs::copy(f, keep.join(format!("{}-{node}.cg", per)))?;
        }
        md.push_str(&format!("| {what} | {} |\n", cells.join(" | ")));
    }
    md.push_str(&format!(
        "\n{} requests at {RR_RATE}/s; about {conns} connections. Profiles: target/bench/callgrind/ \
         (`callgrind_annotate --auto=no <file> | c++filt`).\n",
        rr.requests
    ));
    std::fs::write(keep.join("count.md"), &md)?;
    print!("{md}");
    Ok(())
}

/// The `totals:` line of a callgrind profile (instructions, the only event recorded).
fn totals(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn totals_reads_the_instruction_count() {
        assert_eq!(super::totals("events: Ir\nfn=(1) x\n3 5\ntotals: 63879979\n"), Some(63_879_979));
        assert_eq!(super::totals("events: Ir\n"), None);
    }
}
