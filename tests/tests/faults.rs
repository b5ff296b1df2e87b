//! Faults under traffic across two nodes: the source proxy drained with SIGTERM or killed
//! with SIGKILL mid-transfer, the control plane and the peer's proxy restarted while bytes
//! flow. Transfers are `netprobe send` → `netprobe sink` (SHA-256 of every byte compared).

mod common;

use std::time::{Duration, Instant};

use ambit_testbed::{controlplane::ControlPlane, pod_command, run_with_timeout, Ambit, Bed, Chat, Pod, Proc};
use common::*;

const CURL_REFUSED: i32 = 7;

struct Two<'b> {
    a: Pod,
    b: Pod,
    cp: ControlPlane<'b>,
    p1: Ambit<'b>,
    p2: Ambit<'b>,
    _sink: Proc<'b>,
    _echo: Proc<'b>,
    _http: Proc<'b>,
}

/// Pod a on n1 (client), pod b on n2 with a sink on 7000, an echo on 7001 and HTTP on 8080.
fn two<'b>(bed: &'b Bed) -> Two<'b> {
    let AcrossNodes { n1, n2, cp: cpn, a, b, mesh } = across_nodes(bed);
    let cp = ControlPlane::start(bed, &cpn, &mesh, &[&n1, &n2], &[]);
    let (p1, p2) = (cp.start_node(&n1, &mesh, &[]), cp.start_node(&n2, &mesh, &[]));
    let mut sink = netprobe(bed, &b, "sink", "[::]:7000");
    sink.wait_for_output("listening", T).expect("sink listens");
    let mut echo = netprobe(bed, &b, "echo", "[::]:7001");
    echo.wait_for_output("listening", T).expect("echo listens");
    let http = http_server(bed, &b, "b\n");
    Two { a, b, cp, p1, p2, _sink: sink, _echo: echo, _http: http }
}

/// `netprobe send` of `bytes` from a to b's sink, running.
fn send<'b>(bed: &'b Bed, t: &Two<'_>, bytes: u64) -> Proc<'b> {
    let bin = ambit_testbed::exec::workspace_bin("netprobe");
    let addr = format!("{}:7000", t.b.ipv4);
    let cmd = pod_command(&t.a, &[bin.to_str().expect("utf-8"), "send", &addr, &bytes.to_string()]);
    Proc::spawn(bed, "send", cmd)
}

fn wait_exit(p: &mut Proc<'_>, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = p.exited() {
            return s;
        }
        assert!(Instant::now() < deadline, "still running after {timeout:?}:\n{}", p.output());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn curl_code(pod: &Pod, url: &str) -> i32 {
    let cmd = pod_command(pod, &["curl", "-sS", "--connect-timeout", "2", "--max-time", "5", url]);
    run_with_timeout(cmd, T).expect("curl runs").status.code().unwrap_or(-1)
}

/// Bytes pod a has sent on its eth0 (the tunnel leaves from the pod's namespace).
fn eth0_sent(pod: &Pod) -> u64 {
    let out = run_with_timeout(pod_command(pod, &["cat", "/proc/net/dev"]), T).expect("cat runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("eth0:").map(|r| r.split_whitespace().nth(8).and_then(|v| v.parse().ok()))
        })
        .flatten()
        .unwrap_or_else(|| panic!("no eth0 in {}'s /proc/net/dev", pod.name))
}

/// Starts a `netprobe send` of `bytes` from a to b's sink and waits until a few MiB of it
/// left the pod, so that a fault lands mid-transfer, not before it.
fn send_started<'b>(bed: &'b Bed, t: &Two<'_>, bytes: u64) -> Proc<'b> {
    let before = eth0_sent(&t.a);
    let p = send(bed, t, bytes);
    assert!(
        eventually(T, || eth0_sent(&t.a) > before + (4 << 20)),
        "the transfer did not start:\n{}",
        p.output()
    );
    p
}

#[test]
fn sigterm_drains_in_flight_transfers_byte_exact_and_refuses_new_connections() {
    let bed = Bed::new("faults-drain");
    let mut t = two(&bed);
    // A deadline long enough for the transfer: the drain must end when the connections do.
    t.p1.proc.kill();
    let mut args = t.p1.args.clone();
    let i = args.iter().position(|a| a == "--drain-timeout").expect("the bed sets a drain timeout");
    args[i + 1] = "30s".into();
    t.p1 = Ambit::start_with(&bed, &t.p1.node.clone(), &t.p1.mesh.clone(), args);
    let url = format!("http://{}:8080/", t.b.ipv4);
    let mut chat = Chat::open(&bed, &t.a, &format!("{}:7001", t.b.ipv4)).expect("chat");
    assert_eq!(chat.say("before").expect("echo"), "before");
    let mut transfer = send_started(&bed, &t, 512 << 20);

    let pid = nix::unistd::Pid::from_raw(t.p1.proc.pid() as i32);
    let signalled = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(
        eventually(T, || t.p1.readiness().is_ok_and(|(code, body)| code == 503 && body.contains("draining"))),
        "the proxy does not report draining"
    );
    // Draining: new connections are refused, open ones carry on.
    assert_eq!(curl_code(&t.a, &url), CURL_REFUSED, "a new connection was accepted while draining");
    assert!(transfer.exited().is_none(), "the transfer was over before the drain: make it larger");
    assert_eq!(chat.say("during the drain").expect("echo while draining"), "during the drain");
    let status = wait_exit(&mut transfer, Duration::from_secs(30));
    assert!(status.success(), "the in-flight transfer did not arrive byte-exact:\n{}", transfer.output());
    // The last connection closes: the drain ends there, well before its deadline.
    drop(chat);
    let status = wait_exit(&mut t.p1.proc, Duration::from_secs(30));
    assert!(status.success(), "the proxy's exit after draining: {status}\n{}", t.p1.log());
    assert!(signalled.elapsed() < Duration::from_secs(25), "the drain waited for its deadline");
    assert!(t.p1.log().contains("left_after_deadline=0"), "{}", t.p1.log());

    t.p1.restart();
    assert_eq!(curl_code(&t.a, &url), 0, "the next proxy serves");
}

#[test]
fn sigkill_mid_transfer_fails_the_client_cleanly_and_nothing_leaks_until_the_restart() {
    let bed = Bed::new("faults-kill");
    let mut t = two(&bed);
    let url = format!("http://{}:8080/", t.b.ipv4);
    let mut transfer = send_started(&bed, &t, 4 << 30);
    t.p1.kill();
    // The client sees its connection fail: an error and an exit, not a hang.
    let status = wait_exit(&mut transfer, Duration::from_secs(15));
    assert!(!status.success(), "a transfer cut by a dead proxy reported success");
    let out = transfer.output();
    assert!(out.contains("send:") || out.contains("sink's answer") || out.contains("received"), "{out}");

    // No proxy: enrolled pods fail closed, nothing reaches b around the proxy.
    let served = t._http.output().matches("GET /").count();
    assert_eq!(curl_code(&t.a, &url), CURL_REFUSED);
    assert_eq!(t._http.output().matches("GET /").count(), served, "a request reached b without the proxy");

    t.p1.restart();
    assert_eq!(curl_code(&t.a, &url), 0, "the restarted proxy serves");
    let mut again = send(&bed, &t, 16 << 20);
    assert!(wait_exit(&mut again, T).success(), "{}", again.output());
}

#[test]
fn transfers_survive_a_control_plane_restart_and_a_peer_restart_recovers() {
    let bed = Bed::new("faults-restarts");
    let mut t = two(&bed);
    let url = format!("http://{}:8080/", t.b.ipv4);

    // The control plane goes and comes back while bytes flow: nothing in the data path
    // depends on it.
    let mut transfer = send_started(&bed, &t, 2 << 30);
    t.cp.stop();
    assert!(
        transfer.exited().is_none(),
        "the transfer was over before the control plane went: make it larger"
    );
    t.cp.restart();
    assert!(wait_exit(&mut transfer, Duration::from_secs(60)).success(), "{}", transfer.output());
    let resynced = || t.cp.config_dump()["proxies"].as_array().is_some_and(|p| p.len() == 2);
    assert!(eventually(T, resynced), "the proxies did not reconnect: {}", t.cp.config_dump());

    // The peer's proxy restarts mid-transfer: that transfer fails (its far end was in the
    // dead process), the next ones work without touching the source side.
    let mut cut = send_started(&bed, &t, 4 << 30);
    t.p2.restart();
    assert!(!wait_exit(&mut cut, Duration::from_secs(30)).success(), "a cut transfer reported success");
    assert!(eventually(T, || curl_code(&t.a, &url) == 0), "no connection after the peer restarted");
    let mut again = send(&bed, &t, 16 << 20);
    assert!(wait_exit(&mut again, T).success(), "{}", again.output());
}

#[test]
fn a_certificate_expiring_while_the_ca_is_down_fails_closed_and_recovers() {
    let bed = Bed::new("faults-expiry");
    let AcrossNodes { n1, n2, cp: cpn, a, b, mesh } = across_nodes(&bed);
    let mut cp = ControlPlane::start(&bed, &cpn, &mesh, &[&n1, &n2], &[]);
    let short = ["--cert-validity", "6s"];
    let (p1, _p2) = (cp.start_node(&n1, &mesh, &short), cp.start_node(&n2, &mesh, &short));
    let _http = http_server(&bed, &b, "b\n");
    let url = format!("http://{}:8080/", b.ipv4);
    assert_eq!(curl_code(&a, &url), 0);

    cp.stop();
    // Renewal fails, then the certificate runs out: a clear log, readiness drops, and new
    // connections are refused rather than sent without mTLS.
    assert!(
        eventually(Duration::from_secs(20), || p1
            .log()
            .contains("no valid certificate: connections of this identity fail until the CA answers")),
        "{}",
        p1.log()
    );
    assert!(
        eventually(T, || p1.readiness().is_ok_and(|(code, _)| code == 503)),
        "ready without a valid certificate"
    );
    let served = _http.output().matches("GET /").count();
    assert_ne!(curl_code(&a, &url), 0, "a connection went through without a valid certificate");
    assert_eq!(_http.output().matches("GET /").count(), served, "b was reached without mTLS");
    assert!(eventually(T, || access_lines(&p1, &["no_certificate"]) > 0), "{}", p1.log());

    cp.restart();
    assert!(
        eventually(Duration::from_secs(30), || curl_code(&a, &url) == 0),
        "no recovery after the CA returned"
    );
    assert!(eventually(T, || p1.readiness().is_ok_and(|(code, _)| code == 200)), "not ready again");
}
