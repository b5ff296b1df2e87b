//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::{process::Output, time::Duration};

use ambit_testbed::{
    bed::Pod, exec::workspace_bin, pod_command, run_with_timeout, Ambit, Bed, Proc,
};

pub const T: Duration = Duration::from_secs(20);

pub fn curl(pod: &Pod, url: &str) -> Output {
    run_with_timeout(
        pod_command(pod, &["curl", "-sS", "--max-time", "5", url]),
        T,
    )
    .expect("curl runs")
}

pub fn http_server<'b>(bed: &'b Bed, pod: &Pod, body: &str) -> Proc<'b> {
    let root = bed.dir().join(format!("www-{}", pod.name));
    std::fs::create_dir_all(&root).expect("www dir");
    std::fs::write(root.join("index.html"), body).expect("body");
    let root = root.display().to_string();
    let cmd = pod_command(
        pod,
        &[
            "python3",
            "-u",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "::",
            "--directory",
            &root,
        ],
    );
    let mut p = Proc::spawn(bed, &format!("http-{}", pod.name), cmd);
    p.wait_for_output("Serving HTTP", T)
        .expect("http server starts");
    p
}

pub fn netprobe<'b>(bed: &'b Bed, pod: &Pod, mode: &str, addr: &str) -> Proc<'b> {
    let bin = workspace_bin("netprobe");
    let cmd = pod_command(pod, &[bin.to_str().expect("utf-8"), mode, addr]);
    Proc::spawn(bed, &format!("netprobe-{mode}-{}", pod.name), cmd)
}

pub fn ok_body(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn counter(ambit: &Ambit, name: &str, direction: &str, ns: &str, pod: &str) -> u64 {
    ambit.metric(&format!(
        r#"{name}{{direction="{direction}",namespace="{ns}",pod="{pod}"}}"#
    ))
}

pub fn kernel(ambit: &Ambit, event: &str) -> u64 {
    ambit.metric(&format!(r#"ambit_capture_events_total{{event="{event}"}}"#))
}

/// Lines of the proxy's access log (target `access`) that contain every needle.
pub fn access_lines(ambit: &Ambit, needles: &[&str]) -> usize {
    ambit
        .log()
        .lines()
        .filter(|l| l.contains(" access: ") && needles.iter().all(|n| l.contains(n)))
        .count()
}
