//! The bed leaves nothing behind: not after a failing test, not after Ctrl-C; and it refuses
//! to run (fails, never skips) without root.

use std::{
    io::{BufRead, BufReader},
    panic::AssertUnwindSafe,
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use ambit_testbed::{
    ambit::write_mesh,
    cleanup::leftovers,
    exec::workspace_bin,
    mesh::{Mesh, AMBIENT},
    Ambit, Bed,
};

fn leftovers_of(run: &str) -> Vec<String> {
    leftovers().into_iter().filter(|(id, _)| id == run).map(|(_, what)| what).collect()
}

#[test]
fn a_failing_test_leaves_no_namespace_cgroup_or_pin_behind() {
    let run = Mutex::new(String::new());
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let bed = Bed::new("deliberate-failure");
        *run.lock().expect("lock") = bed.id().to_string();
        let node = bed.node("n1");
        let pod = bed.pod(&node, "a");
        let path = bed.dir().join("mesh.yaml");
        write_mesh(&path, &Mesh::default().namespace("demo", &[AMBIENT]).pod(&pod, "demo", &[]).yaml());
        let ambit = Ambit::start(&bed, &node, &path, &[]);
        assert!(ambit.pin_dir().exists());
        assert!(!leftovers_of(bed.id()).is_empty(), "the run's resources exist while it runs");
        panic!("deliberate failure inside a test");
    }));
    assert!(result.is_err(), "the closure panicked");
    let run = run.into_inner().expect("lock");
    assert!(!run.is_empty());
    assert_eq!(leftovers_of(&run), Vec::<String>::new());
}

#[test]
fn ctrl_c_tears_the_bed_down() {
    let mut child = Command::new(workspace_bin("bed-hold"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting bed-hold");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let (run, proxy_pid) = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("READY ") => {
                let mut f = l.split_whitespace().skip(1);
                let run = f.next().expect("run id").to_string();
                let pid: u32 = f.next().and_then(|p| p.parse().ok()).expect("proxy pid");
                break (run, pid);
            }
            Some(Ok(_)) => continue,
            other => {
                let _already_dead_is_fine = child.kill();
                panic!("bed-hold did not get ready: {other:?}");
            }
        }
    };
    assert!(!leftovers_of(&run).is_empty(), "bed-hold's run exists");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _already_dead_is_fine = child.kill();
            panic!("bed-hold did not exit after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "exit status of an interrupted run");
    assert_eq!(leftovers_of(&run), Vec::<String>::new());
    // The proxy the run started is gone too (reaped by init once its parent exited).
    let gone = ambit_testbed::eventually(Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{proxy_pid}")).exists()
    });
    assert!(gone, "the run's proxy (pid {proxy_pid}) survived the teardown");
}

#[test]
fn the_leftovers_of_a_killed_run_are_swept() {
    let mut child = Command::new(workspace_bin("bed-hold"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting bed-hold");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = lines.find_map(|l| l.ok().filter(|l| l.starts_with("READY "))).expect("bed-hold ready");
    let mut f = ready.split_whitespace().skip(1);
    let run = f.next().expect("run id").to_string();
    let proxy_pid: u32 = f.next().and_then(|p| p.parse().ok()).expect("proxy pid");
    // SIGKILL: no teardown runs, everything stays.
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    assert!(!leftovers_of(&run).is_empty());
    assert!(std::path::Path::new(&format!("/proc/{proxy_pid}")).exists(), "the proxy outlives its parent");

    let swept = ambit_testbed::cleanup::sweep_dead_runs();
    assert!(swept.iter().any(|w| w.contains(&run)), "{swept:?}");
    assert_eq!(leftovers_of(&run), Vec::<String>::new());
    // The proxy ran in the run's node cgroup, so the sweep stopped it too.
    let gone = ambit_testbed::eventually(Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{proxy_pid}")).exists()
    });
    assert!(gone, "the killed run's proxy (pid {proxy_pid}) is still running");
}

#[test]
fn the_bed_fails_without_root_instead_of_skipping() {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(workspace_bin("bed-hold"))
        .output()
        .expect("running bed-hold as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail without root:\n{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
}
