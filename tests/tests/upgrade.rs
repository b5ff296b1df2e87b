//! Zero-downtime upgrade: a new `ambit node --takeover` starts next to the running one,
//! shares its pod listeners (SO_REUSEPORT), and sends it into its drain once ready. New
//! connections never fail during the switch; an established one lives on in the old
//! process until it ends; the new process then holds the instance.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use ambit_testbed::{pod_command, run_with_timeout, Ambit, Bed, Chat, Pod};
use common::*;

/// Curls `url` from `pod` back to back until `stop`; the exit codes.
fn curl_loop(pod: Pod, url: String, stop: Arc<AtomicBool>, codes: Arc<Mutex<Vec<i32>>>) {
    while !stop.load(Ordering::Relaxed) {
        let cmd = pod_command(&pod, &["curl", "-sS", "--connect-timeout", "2", "--max-time", "5", &url]);
        let code = run_with_timeout(cmd, T).expect("curl runs").status.code().unwrap_or(-1);
        codes.lock().expect("codes").push(code);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_takeover_upgrade_drops_no_connection_and_established_ones_live_on() {
    let bed = Bed::new("upgrade");
    let (node, a, b, mesh) = enrolled_pair(&bed);
    // A drain deadline longer than the test: the established connection decides when the
    // old process may go.
    let mut args = Ambit::args(&bed, &node, &mesh, &[]);
    let i = args.iter().position(|a| a == "--drain-timeout").expect("the bed sets a drain timeout");
    args[i + 1] = "60s".into();
    let mut old = Ambit::start_with(&bed, &node, &mesh, args);
    let _http = http_server(&bed, &b, "b\n");
    let mut echo = netprobe(&bed, &b, "echo", "[::]:7001");
    echo.wait_for_output("listening", T).expect("echo listens");
    let mut chat = Chat::open(&bed, &a, &format!("{}:7001", b.ipv4)).expect("chat");
    assert_eq!(chat.say("before").expect("echo"), "before");

    let stop = Arc::new(AtomicBool::new(false));
    let codes = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (a, url, stop, codes) =
            (a.clone(), format!("http://{}:8080/", b.ipv4), stop.clone(), codes.clone());
        std::thread::spawn(move || curl_loop(a, url, stop, codes))
    };
    std::thread::sleep(Duration::from_millis(500));

    let new = old.start_successor(&[]);
    assert!(
        eventually(T, || old.log().contains("SIGTERM: draining")),
        "the old proxy was not asked to drain"
    );
    assert!(new.log().contains("took over: asked the previous proxy to drain"), "{}", new.log());
    // Let new connections run against the new process for a while.
    let switched = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(chat.say("during the switch").expect("the established connection"), "during the switch");
    assert!(old.proc.exited().is_none(), "the old proxy left with a connection still open");

    // The established connection ends: the old process has nothing left and exits.
    drop(chat);
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = old.proc.exited() {
            break s;
        }
        assert!(Instant::now() < deadline, "the old proxy did not exit:\n{}", old.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}\n{}", old.log());
    assert!(old.log().contains("left_after_deadline=0"), "{}", old.log());
    assert!(eventually(T, || new.log().contains("instance lock taken")), "{}", new.log());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("curl loop");

    let codes = codes.lock().expect("codes").clone();
    let failed = codes.iter().filter(|c| **c != 0).count();
    assert!(codes.len() >= 20, "too few connections to say anything: {}", codes.len());
    assert_eq!(failed, 0, "{failed} of {} connections failed during the switch: {codes:?}", codes.len());
    // After the switch the new process carried them (its access log), and it alone now
    // holds the instance: another proxy without --takeover is refused.
    assert!(access_lines(&new, &["direction=outbound"]) > 0, "the new proxy carried nothing");
    let out = run_with_timeout(Ambit::command(&bed, &node, &mesh, &[]), T).expect("ambit runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another ambit node is running"));
    eprintln!(
        "upgrade: {} connections during the switch, none failed; old exited {:.1} s after the switch",
        codes.len(),
        switched.elapsed().as_secs_f64()
    );
}
