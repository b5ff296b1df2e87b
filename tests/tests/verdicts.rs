//! Every frame and every connect that reaches an enrolled pod's capture programs gets a
//! deliberate verdict.
//!
//! The programs are ambit's own object, loaded by this test into a private pin directory
//! and attached to a private, empty cgroup, with a bed pod "enrolled" by hand: no proxy runs
//! and nothing else moves their counters, so each frame's one verdict can be read off them.
//! - the inbound (TC) program runs on thousands of crafted frames through
//!   `BPF_PROG_TEST_RUN`, in the pod's namespace: every IPv4/IPv6 header shape, options,
//!   extension header chains, fragments, truncations, other protocols (`frames`), then
//!   random damage to them. Each built frame must get the verdict its construction calls
//!   for; every frame must move exactly one verdict counter, with the matching return code;
//! - the connect programs cannot be run that way (the kernel has no test run for cgroup
//!   sock_addr programs): a process in the pod makes real connects to generated destinations,
//!   and each must be captured (its original destination recorded for the proxy, exactly)
//!   or left alone for a documented reason (loopback inside the pod, UDP).

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::AsFd,
    process::Stdio,
    time::{Duration, Instant},
};

use ambit::{
    capture::{klog::KernelLogLevel, Capture, CaptureSettings, Opened},
    os::netns::{netns_cookie, Netns},
};
use ambit_common::{
    maps::{ConnKey, ListenerKey},
    stats, AF_INET, AF_INET6, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT,
};
use ambit_testbed::{
    bpf,
    exec::{in_cgroup_and_netns, workspace_bin},
    frames::{Rng, Target, Verdict},
    Bed, Pod,
};

/// The counters a frame can end in, and the verdicts they stand for.
const VERDICTS: [(u32, Verdict); 12] = [
    (stats::INBOUND_ASSIGNED, Verdict::Assign),
    (stats::INBOUND_KUBELET_PROBE, Verdict::KubeletProbe),
    (stats::INBOUND_PROXY_PORT, Verdict::ProxyPort),
    (stats::INBOUND_PASS_SEGMENT, Verdict::PassSegment),
    (stats::INBOUND_PASS_DATAGRAM, Verdict::PassDatagram),
    (stats::INBOUND_PASS_ARP, Verdict::PassArp),
    (stats::INBOUND_DROP_MALFORMED, Verdict::Malformed),
    (stats::INBOUND_DROP_FRAGMENT, Verdict::Fragment),
    (stats::INBOUND_DROP_PROTOCOL, Verdict::Protocol),
    (stats::INBOUND_DROP_UNCOVERED, Verdict::Uncovered),
    // Never expected here (the pod's listeners are registered), but a verdict all the same:
    // a frame ending in one of these is reported, not lost.
    (stats::INBOUND_FAIL_CLOSED, Verdict::Malformed),
    (stats::INBOUND_ASSIGN_ERROR, Verdict::Malformed),
];

/// The return code each verdict must come with: TC_PASS after an assignment, "next" for
/// what passes, TC_DROP for what is dropped.
fn retval(v: Verdict) -> i32 {
    match v {
        Verdict::Assign => 0,
        Verdict::KubeletProbe
        | Verdict::ProxyPort
        | Verdict::PassSegment
        | Verdict::PassDatagram
        | Verdict::PassArp => -1,
        Verdict::Malformed | Verdict::Fragment | Verdict::Protocol | Verdict::Uncovered => 2,
    }
}

fn seed() -> u64 {
    std::env::var("AMBIT_VERDICT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

/// ambit's programs loaded into a private pin directory and attached to a private cgroup.
fn private_capture(bed: &Bed) -> (Opened, std::path::PathBuf) {
    let cgroup = bed.cgroup_dir("verdicts");
    let settings = CaptureSettings {
        bpffs: bed.bpffs().to_path_buf(),
        instance: "verdicts".into(),
        cgroup: cgroup.clone(),
        kubelet_cgroup: None,
        proxy_mark: ambit_common::DEFAULT_PROXY_MARK,
        delivery_mark: ambit_common::DEFAULT_DELIVERY_MARK,
        fail_open: false,
        outbound_port: OUTBOUND_PORT,
        inbound_port: INBOUND_PORT,
        hbone_port: HBONE_PORT,
        dns_port: None,
        kernel_log_level: KernelLogLevel::Off,
        trace: false,
        takeover: false,
    };
    (Capture::open(&settings).expect("loading ambit's eBPF object"), cgroup)
}

/// Listeners on loopback inside `netns`, on `port` (0: any), IPv4 and IPv6, with room for
/// thousands of connections waiting to be accepted.
fn loopback_listeners(netns: &Netns, port: u16) -> (TcpListener, TcpListener) {
    use socket2::{Domain, Socket, Type};
    let listen = |addr: SocketAddr| {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        if addr.is_ipv6() {
            s.set_only_v6(true).expect("v6 only");
        }
        s.bind(&addr.into()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.listen(4096).expect("listen");
        TcpListener::from(s)
    };
    netns
        .run(|| {
            (
                listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)),
                listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)),
            )
        })
        .expect("entering the pod's netns")
}

fn octets4(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(v) => v.octets(),
        IpAddr::V6(_) => panic!("not IPv4: {ip}"),
    }
}

fn octets6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v) => v.octets(),
        IpAddr::V4(_) => panic!("not IPv6: {ip}"),
    }
}

#[test]
fn every_frame_to_an_enrolled_pod_gets_a_deliberate_verdict() {
    let bed = Bed::new("verdicts-inbound");
    let node = bed.node("n1");
    let b = bed.pod(&node, "b");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in_rt = rt.enter();
    let (mut opened, _cgroup) = private_capture(&bed);
    let netns = Netns::open(&b.netns_path()).expect("b's netns");
    let cookie = netns.cookie();
    let (l4, l6) = loopback_listeners(&netns, 0);
    for (family, l) in [(AF_INET, &l4), (AF_INET6, &l6)] {
        let key = ListenerKey { netns_cookie: cookie.0, family, port: INBOUND_PORT, _pad: 0 };
        opened.capture.register_listener(key, l).expect("registering the inbound listener");
    }
    opened.capture.add_pod_ips(cookie, &[b.ipv4, b.ipv6]).expect("b's addresses");

    // One kubelet probe in flight, as the kubelet's sock_ops program records it.
    let probe = ([10, 1, 0, 1], 41000u16, 8080u16);
    let pins = opened.capture.pin_dir().to_path_buf();
    let probes = bpf::obj_get(&pins.join("AMBIT_PROBES")).expect("the probes map");
    let mut key = Vec::new();
    key.extend_from_slice(&AF_INET.to_ne_bytes());
    key.extend_from_slice(&probe.1.to_ne_bytes());
    key.extend_from_slice(&probe.2.to_ne_bytes());
    key.extend_from_slice(&[0, 0]);
    key.extend_from_slice(&probe.0);
    key.extend_from_slice(&[0; 12]);
    key.extend_from_slice(&octets4(b.ipv4));
    key.extend_from_slice(&[0; 12]);
    bpf::update(probes.as_fd(), &key, &7u64.to_ne_bytes()).expect("recording the probe");

    let target = Target {
        pod4: octets4(b.ipv4),
        pod6: octets6(b.ipv6),
        uncovered4: [10, 1, 0, 250],
        uncovered6: {
            let mut a = octets6(b.ipv6);
            a[15] = 0xee;
            a
        },
        app_port: 8080,
        proxy_ports: [HBONE_PORT, OUTBOUND_PORT, INBOUND_PORT],
        probe,
    };
    let seed = seed();
    let mut rng = Rng::new(seed);
    let cases = target.cases(&mut rng, 40);
    let prog = bpf::obj_get(&pins.join("prog_ambit_tc_ingress")).expect("the inbound program");

    // bpf_sk_assign needs the listener in the namespace the frame arrives in: run there.
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(b.netns_path()).expect("b's netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into b");
            let run = |frame: &[u8]| -> Result<(i32, Verdict), String> {
                let before = opened.stats.read().expect("counters");
                let rv = bpf::test_run(prog.as_fd(), frame).map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
                let after = opened.stats.read().expect("counters");
                let moved: Vec<(u32, u64)> = VERDICTS
                    .iter()
                    .map(|(i, _)| (*i, after[*i as usize] - before[*i as usize]))
                    .filter(|(_, d)| *d != 0)
                    .collect();
                match moved.as_slice() {
                    [(i, 1)] => {
                        let v = VERDICTS.iter().find(|(c, _)| c == i).map(|(_, v)| *v).expect("listed");
                        let name = stats::NAMES[*i as usize];
                        // A test run's packet is not at TC ingress as the kernel knows it, so
                        // bpf_sk_assign refuses it: here the assignment attempt itself is the
                        // verdict (that a real SYN is assigned, every capture test shows).
                        if *i == stats::INBOUND_ASSIGN_ERROR && rv == 2 {
                            return Ok((rv, Verdict::Assign));
                        }
                        if *i == stats::INBOUND_FAIL_CLOSED || *i == stats::INBOUND_ASSIGN_ERROR {
                            return Err(format!("ended in {name}"));
                        }
                        if rv != retval(v) {
                            return Err(format!("{name} with return code {rv}"));
                        }
                        Ok((rv, v))
                    }
                    [] => Err(format!("fell through: no verdict counted (return code {rv})")),
                    more => Err(format!("counted more than once: {more:?}")),
                }
            };
            let mut failures = Vec::new();
            let mut seen: BTreeMap<Verdict, usize> = BTreeMap::new();
            for case in &cases {
                match run(&case.frame) {
                    Ok((_, got)) if got == case.expect => *seen.entry(got).or_default() += 1,
                    Ok((_, got)) => {
                        failures.push(format!("{}: expected {:?}, got {got:?}", case.name, case.expect))
                    }
                    Err(e) => failures.push(format!("{}: {e}", case.name)),
                }
            }
            let mut damaged = 0;
            for case in &cases {
                for _ in 0..3 {
                    let frame = ambit_testbed::frames::mutate(&mut rng, &case.frame);
                    if !ambit_testbed::frames::runnable(&frame) {
                        continue;
                    }
                    if let Err(e) = run(&frame) {
                        failures.push(format!("{} damaged to {frame:02x?}: {e}", case.name));
                    }
                    damaged += 1;
                }
            }
            (failures, seen, damaged)
        })
        .join()
        .expect("the test-run thread")
    });
    let (failures, seen, damaged) = outcome;
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {} frames:\n{}",
        failures.len(),
        cases.len() + damaged,
        failures.join("\n")
    );
    // Every verdict was reached by some frame: the generator covers them all.
    for (_, v) in VERDICTS.iter().take(10) {
        assert!(seen.get(v).copied().unwrap_or(0) > 0, "seed {seed}: no frame ended {v:?}: {seen:?}");
    }
    let total = cases.len() + damaged;
    assert!(total >= 5000, "only {total} frames");
    eprintln!("seed {seed}: {} built frames with their expected verdict, {damaged} damaged ones with exactly one: {seen:?}", cases.len());
}

/// Generated destinations: (line for netprobe, destination, captured?).
fn destinations(rng: &mut Rng) -> Vec<(String, SocketAddr, bool)> {
    let mut out = Vec::new();
    let port = |rng: &mut Rng| {
        if rng.below(8) == 0 {
            rng.pick(&[0u16, 1, 15001, 15006, 15008, 65535])
        } else {
            1 + rng.below(65535) as u16
        }
    };
    let mut push =
        |kind: &str, addr: SocketAddr, captured: bool| out.push((format!("{kind} {addr}"), addr, captured));
    for _ in 0..400 {
        let v4 =
            Ipv4Addr::new(rng.pick(&[10, 192, 203, 1, 224, 255, 100]), rng.byte(), rng.byte(), rng.byte());
        let p = port(rng);
        let captured = v4.octets()[0] != 127 && !v4.is_unspecified();
        push("tcp", SocketAddr::new(v4.into(), p), captured);
        // The same address from a dual-stack socket, IPv4-mapped.
        push("tcp", SocketAddr::new(v4.to_ipv6_mapped().into(), p), captured);
        let mut s = [0u16; 8];
        for w in &mut s {
            *w = rng.next_u64() as u16;
        }
        s[0] = rng.pick(&[0xfd00, 0x2001, 0xfe80, 0xff02, 0x0064, s[0] | 0x2000]);
        push("tcp", SocketAddr::new(Ipv6Addr::from(s).into(), port(rng)), true);
    }
    for _ in 0..50 {
        // Loopback inside the pod: never captured.
        let lo = Ipv4Addr::new(127, rng.byte(), rng.byte(), rng.byte().max(1));
        push("tcp", SocketAddr::new(lo.into(), port(rng)), false);
        push("tcp", SocketAddr::new(lo.to_ipv6_mapped().into(), port(rng)), false);
    }
    for a in ["0.0.0.0:80", "[::]:80", "[::1]:80", "[::ffff:0.0.0.0]:80", "127.0.0.1:15001", "[::1]:15001"] {
        push("tcp", a.parse().expect("addr"), false);
    }
    // UDP is not TCP: never captured, wherever it goes.
    for _ in 0..50 {
        let v4 = Ipv4Addr::new(10, rng.byte(), rng.byte(), rng.byte());
        push("udp", SocketAddr::new(v4.into(), port(rng).max(1)), false);
    }
    out
}

/// The address family and bytes of `ip` as the capture maps hold them.
fn key_addr(ip: IpAddr) -> (u16, [u8; 16]) {
    let mut b = [0u8; 16];
    match ambit::capture::addr::canonical(ip) {
        IpAddr::V4(v) => {
            b[..4].copy_from_slice(&v.octets());
            (AF_INET, b)
        }
        IpAddr::V6(v) => (AF_INET6, v.octets()),
    }
}

#[test]
fn every_connect_of_an_enrolled_pod_is_captured_exactly_or_left_for_a_reason() {
    let bed = Bed::new("verdicts-connect");
    let node = bed.node("n1");
    let a: Pod = bed.pod(&node, "a");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in_rt = rt.enter();
    let (mut opened, cgroup) = private_capture(&bed);
    let netns = Netns::open(&a.netns_path()).expect("a's netns");
    let cookie = netns.cookie();
    // The proxy's part, played by the test: the outbound listeners, registered.
    let (l4, l6) = loopback_listeners(&netns, OUTBOUND_PORT);
    for (family, l) in [(AF_INET, &l4), (AF_INET6, &l6)] {
        let key = ListenerKey { netns_cookie: cookie.0, family, port: OUTBOUND_PORT, _pad: 0 };
        opened.capture.register_listener(key, l).expect("registering the outbound listener");
    }
    opened.capture.add_pod_ips(cookie, &[a.ipv4, a.ipv6]).expect("a's addresses");
    opened.capture.enroll(cookie, 1).expect("enrolling a");

    let seed = seed();
    let dests = destinations(&mut Rng::new(seed));
    let list = bed.dir().join("destinations.txt");
    std::fs::write(&list, dests.iter().map(|(l, ..)| format!("{l}\n")).collect::<String>()).expect("list");
    let before = opened.stats.read().expect("counters");
    // The listeners hold every captured connection: a thread accepts them as they come and
    // takes each one's original destination the way the proxy does, by the connection as it
    // arrived. A connect straight to the listener's own address (loopback, not captured)
    // has none.
    let reaches_listener = |d: &SocketAddr| {
        let ip = ambit::capture::addr::canonical(d.ip());
        d.port() == OUTBOUND_PORT
            && (ip == IpAddr::from(Ipv4Addr::LOCALHOST) || ip == IpAddr::from(Ipv6Addr::LOCALHOST))
    };
    let expected: usize = dests.iter().filter(|d| d.2).count();
    let direct_expected =
        dests.iter().filter(|d| d.0.starts_with("tcp") && !d.2 && reaches_listener(&d.1)).count();
    for l in [&l4, &l6] {
        l.set_nonblocking(true).expect("non-blocking");
    }
    let orig = &opened.orig;
    let (lines, mut recorded, direct) = std::thread::scope(|s| {
        let acceptor = s.spawn(|| {
            let (mut recorded, mut direct) = (Vec::<SocketAddr>::new(), 0usize);
            let deadline = Instant::now() + Duration::from_secs(90);
            while recorded.len() + direct < expected + direct_expected && Instant::now() < deadline {
                let mut got = false;
                for l in [&l4, &l6] {
                    let Ok((s, peer)) = l.accept() else { continue };
                    got = true;
                    let local = s.local_addr().expect("local");
                    assert_eq!(netns_cookie(&s).expect("cookie"), cookie);
                    let (family, src) = key_addr(peer.ip());
                    let (_, dst) = key_addr(local.ip());
                    let key = ConnKey {
                        netns_cookie: cookie.0,
                        family,
                        src_port: peer.port(),
                        dst_port: local.port(),
                        _pad: 0,
                        src,
                        dst,
                    };
                    match orig.take(&key).expect("map lookup") {
                        Some(o) => {
                            let ip = if o.ip.family == AF_INET {
                                IpAddr::from([o.ip.addr[0], o.ip.addr[1], o.ip.addr[2], o.ip.addr[3]])
                            } else {
                                IpAddr::from(o.ip.addr)
                            };
                            recorded.push(SocketAddr::new(ip, o.port));
                        }
                        None => direct += 1,
                    }
                }
                if !got {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            (recorded, direct)
        });
        let bin = workspace_bin("netprobe");
        let mut child = in_cgroup_and_netns(
            &cgroup,
            &a.netns_path(),
            &[bin.to_str().expect("utf-8"), "connect-each", list.to_str().expect("utf-8")],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("netprobe connect-each");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            let n = std::io::BufRead::read_line(&mut stdout, &mut l).expect("reading netprobe");
            assert!(n > 0, "netprobe ended early: {lines:?}");
            if l.trim() == "done" {
                break;
            }
            lines.push(l.trim().to_string());
        }
        let (recorded, direct) = acceptor.join().expect("the accepting thread");
        // Every socket was open until now (a record lives as long as its connection).
        if let Some(mut stdin) = child.stdin.take() {
            let _closing_ends_it = stdin.write_all(b"");
        }
        child.wait().expect("netprobe exits");
        (lines, recorded, direct)
    });
    assert_eq!(lines.len(), dests.len());

    let after = opened.stats.read().expect("counters");
    let delta = |i: u32| after[i as usize] - before[i as usize];
    let mut failures = Vec::new();
    recorded.sort();
    let mut wanted: Vec<SocketAddr> = dests
        .iter()
        .filter(|d| d.2)
        .map(|d| SocketAddr::new(ambit::capture::addr::canonical(d.1.ip()), d.1.port()))
        .collect();
    wanted.sort();
    if recorded != wanted {
        failures.push(format!(
            "{} original destinations recorded for {} captured connects",
            recorded.len(),
            wanted.len()
        ));
    }
    if direct != direct_expected {
        failures.push(format!(
            "{direct} connects without a record, {direct_expected} expected (straight to the listener)"
        ));
    }
    for ((line, dst, captured), result) in dests.iter().zip(&lines) {
        let peer = result.rsplit(" -> ").next().unwrap_or("");
        let to_listener = peer.ends_with(&format!(":{OUTBOUND_PORT}"))
            && (peer.starts_with("127.0.0.1")
                || peer.starts_with("[::1]")
                || peer.starts_with("[::ffff:127.0.0.1]"));
        if to_listener != (*captured || reaches_listener(dst) && line.starts_with("tcp")) {
            failures.push(format!("{line}: captured should be {captured}, netprobe saw {result}"));
        }
    }
    let tcp_total = dests.iter().filter(|d| d.0.starts_with("tcp")).count() as u64;
    let loopback = dests.iter().filter(|d| d.0.starts_with("tcp") && !d.2).count() as u64;
    let counted = [
        (stats::CONNECT_CAPTURED, expected as u64),
        (stats::CONNECT_LOOPBACK, loopback),
        (stats::CONNECT_NOT_ENROLLED, 0),
        (stats::CONNECT_PROXY_MARK, 0),
        (stats::CONNECT_FAIL_CLOSED, 0),
        (stats::CONNECT_FAIL_OPEN, 0),
    ];
    for (i, want) in counted {
        if delta(i) != want {
            failures.push(format!("{}: {} (want {want})", stats::NAMES[i as usize], delta(i)));
        }
    }
    assert_eq!(expected as u64 + loopback, tcp_total, "every TCP connect is one or the other");
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
    eprintln!("seed {seed}: {expected} connects captured with their exact destination, {loopback} loopback and {} UDP left alone", dests.len() as u64 - tcp_total);
}
