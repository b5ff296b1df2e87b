//! Load without leaks: connections opened and closed as fast as the client can for a
//! bounded time, through both proxies and an HBONE tunnel; afterwards descriptors, kernel map
//! entries and memory are back where they were.

mod common;

use std::time::Duration;

use ambit_testbed::{
    ambit::pinned_map_len,
    ambit::write_mesh,
    controlplane::ControlPlane,
    exec::workspace_bin,
    mesh::{Mesh, AMBIENT, OPT_OUT},
    pod_command, run_with_timeout, Ambit, Bed, Pod,
};
use common::*;

/// Maps with an entry per connection (or per socket).
const PER_CONNECTION_MAPS: [&str; 3] = ["AMBIT_PENDING", "AMBIT_ORIG_DST", "AMBIT_TRACED"];

#[derive(Debug, PartialEq)]
struct Footprint {
    fds: usize,
    rss_kib: u64,
    map_entries: Vec<usize>,
}

fn footprint(p: &Ambit<'_>) -> Footprint {
    let pid = p.proc.pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir").count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS");
    let map_entries =
        PER_CONNECTION_MAPS.iter().map(|m| pinned_map_len(&p.pin_dir().join(m)).expect("map dump")).collect();
    Footprint { fds, rss_kib, map_entries }
}

/// `bench-tool connrate` from `pod` for `secs` with 4 parallel clients; connections made.
fn churn(pod: &Pod, addr: &str, secs: u32) -> u64 {
    let bin = workspace_bin("bench-tool");
    let cmd = pod_command(pod, &[bin.to_str().expect("utf-8"), "connrate", addr, &secs.to_string(), "4"]);
    let out = run_with_timeout(cmd, Duration::from_secs(u64::from(secs) + 30)).expect("bench-tool runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("connrate JSON");
    assert_eq!(v["errors"], 0, "connections failed during the churn: {v}");
    v["connections"].as_u64().expect("count")
}

/// No connection being relayed (the pooled HBONE connection itself stays open).
fn idle(p: &Ambit<'_>) -> bool {
    p.metric("ambit_proxy_connections_active") == 0
}

#[test]
fn connection_churn_leaves_no_descriptor_map_entry_or_memory_behind() {
    let bed = Bed::new("load-churn");
    let AcrossNodes { n1, n2, cp: cpn, a, b, mesh } = across_nodes(&bed);
    let cp = ControlPlane::start(&bed, &cpn, &mesh, &[&n1, &n2], &[]);
    // The access log of thousands of connections would only measure the log.
    let quiet = ["--log-level", "warn"];
    let (p1, p2) = (cp.start_node(&n1, &mesh, &quiet), cp.start_node(&n2, &mesh, &quiet));
    let mut echo = netprobe(&bed, &b, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    let addr = format!("{}:7000", b.ipv4);

    // Warm-up, as hard as the measured run: the pooled HBONE connection, metric series,
    // caches, and the threads (with their allocator arenas) that a burst of this rate starts
    // exist from here on. A shorter one left ~1 MiB of first-burst growth in the figure.
    churn(&a, &addr, 3);
    assert!(eventually(T, || idle(&p1) && idle(&p2)), "connections still open after the warm-up");
    std::thread::sleep(Duration::from_secs(1));
    let before = [footprint(&p1), footprint(&p2)];

    let n = churn(&a, &addr, 5);
    assert!(n >= 1000, "only {n} connections in 5 s: too few to show a leak");
    assert!(eventually(T, || idle(&p1) && idle(&p2)), "connections still open after the churn");
    // Closed sockets leave the maps as their close callbacks run.
    let settled = |i: usize, p: &Ambit<'_>| {
        let now = footprint(p);
        now.fds <= before[i].fds && now.map_entries.iter().zip(&before[i].map_entries).all(|(x, y)| x <= y)
    };
    assert!(
        eventually(T, || settled(0, &p1) && settled(1, &p2)),
        "left behind after {n} connections: before {before:?}, after {:?}",
        [footprint(&p1), footprint(&p2)]
    );
    let after = [footprint(&p1), footprint(&p2)];
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        // The allocator keeps some freed memory; a leak of even 100 bytes per connection
        // would show as more than this.
        let grown = a.rss_kib.saturating_sub(b.rss_kib);
        assert!(grown * 1024 < 100 * n, "proxy {}: RSS grew {grown} KiB over {n} connections", i + 1);
    }
    eprintln!(
        "churn: {n} connections in 5 s; node 1 fds {} -> {}, RSS {} -> {} KiB, map entries {:?} -> {:?}; \
         node 2 fds {} -> {}, RSS {} -> {} KiB, map entries {:?} -> {:?}",
        before[0].fds,
        after[0].fds,
        before[0].rss_kib,
        after[0].rss_kib,
        before[0].map_entries,
        after[0].map_entries,
        before[1].fds,
        after[1].fds,
        before[1].rss_kib,
        after[1].rss_kib,
        before[1].map_entries,
        after[1].map_entries
    );
}

/// The proxy's open network-namespace references (`net:[…]` descriptors).
fn netns_fds(p: &Ambit<'_>) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", p.proc.pid()))
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("net:["))
        .count()
}

/// What an enrolled pod costs the proxy: descriptors, netns references, registered
/// listeners, entries of the per-pod maps and per-pod tc link pins.
fn pod_state(p: &Ambit<'_>) -> Vec<usize> {
    // Descriptors first: the admin request below is itself a connection for a moment.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", p.proc.pid())).expect("fd dir").count();
    let netns = netns_fds(p);
    let dump = p.config_dump();
    let maps = ["AMBIT_ENROLLED", "AMBIT_POD_IPS", "AMBIT_LISTENERS"]
        .iter()
        .map(|m| pinned_map_len(&p.pin_dir().join(m)).expect("map dump"));
    let tc_pins = std::fs::read_dir(p.pin_dir().join("tc")).expect("tc pins").count();
    [fds, netns, dump["capture"]["registered_listeners"].as_u64().expect("listeners") as usize, tc_pins]
        .into_iter()
        .chain(maps)
        .collect()
}

fn enrolled(p: &Ambit<'_>, pod: &str) -> bool {
    p.config_dump()["pods"].as_array().expect("pods").iter().any(|x| x["name"] == pod)
}

#[test]
fn five_hundred_enrol_unenrol_cycles_leak_no_listener_map_entry_or_netns_reference() {
    const CYCLES: usize = 500;
    let bed = Bed::new("load-pod-churn");
    let node = bed.node("n1");
    let a = bed.pod(&node, "a");
    let c = bed.pod(&node, "c");
    let mesh = bed.dir().join("mesh.yaml");
    let with_c = |labels: &[(&str, &str)]| {
        Mesh::default().namespace("demo", &[AMBIENT]).pod(&a, "demo", &[]).pod(&c, "demo", labels).yaml()
    };
    let (enrol, unenrol) = (with_c(&[]), with_c(&[OPT_OUT]));
    write_mesh(&mesh, &unenrol);
    let p = Ambit::start(&bed, &node, &mesh, &["--mesh-file-poll", "10ms", "--log-level", "warn"]);
    let _http = http_server(&bed, &a, "a\n");
    let before = pod_state(&p);
    let rss = |p: &Ambit<'_>| footprint(p).rss_kib;
    let rss_before = rss(&p);

    let started = std::time::Instant::now();
    for i in 0..CYCLES {
        write_mesh(&mesh, &enrol);
        assert!(eventually(T, || enrolled(&p, "c")), "cycle {i}: c was not enrolled");
        write_mesh(&mesh, &unenrol);
        assert!(eventually(T, || !enrolled(&p, "c")), "cycle {i}: c was not unenrolled");
    }
    let took = started.elapsed();
    // Descriptors may be fewer (an admin connection may still have been closing before),
    // never more once settled; everything else exactly as before. A leak never settles.
    let back = |now: &[usize]| now[0] <= before[0] && now[1..] == before[1..];
    assert!(
        eventually(T, || back(&pod_state(&p))),
        "after {CYCLES} cycles [fds, netns fds, listeners, tc pins, ENROLLED, POD_IPS, LISTENERS]: \
         {:?}, before {before:?}",
        pod_state(&p)
    );
    // a was enrolled all along and still works; c goes direct again.
    assert_eq!(ok_body(&curl(&c, &format!("http://{}:8080/", a.ipv4))), "a\n");
    let grown = rss(&p).saturating_sub(rss_before);
    assert!(grown < 4096, "RSS grew {grown} KiB over {CYCLES} enrol/unenrol cycles");
    eprintln!(
        "pod churn: {CYCLES} enrol/unenrol cycles in {:.1} s; state {before:?} before and after; RSS +{grown} KiB",
        took.as_secs_f64()
    );
}
