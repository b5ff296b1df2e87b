//! Real programs the tests and the demo run inside pods.

use std::time::Duration;

use crate::{
    bed::{Bed, Pod},
    exec::{pod_command, workspace_bin, Proc},
};

/// Python's http.server on `[::]:8080` in `pod`, serving `body` as `/` and `/index.html`;
/// returns once it is listening. Its log (one line per request, with the client's address)
/// is the process output.
pub fn http_server<'b>(bed: &'b Bed, pod: &Pod, body: &str) -> Proc<'b> {
    http_server_on(bed, pod, 8080, body)
}

/// [`http_server`] on another port.
pub fn http_server_on<'b>(bed: &'b Bed, pod: &Pod, port: u16, body: &str) -> Proc<'b> {
    let root = bed.dir().join(format!("www-{}-{port}", pod.name));
    std::fs::create_dir_all(&root).expect("www dir");
    std::fs::write(root.join("index.html"), body).expect("body");
    let root = root.display().to_string();
    let port = port.to_string();
    let argv = ["python3", "-u", "-m", "http.server", &port, "--bind", "::", "--directory", &root];
    let mut p = Proc::spawn(bed, &format!("http-{}-{port}", pod.name), pod_command(pod, &argv));
    p.wait_for_output("Serving HTTP", Duration::from_secs(20)).expect("http server starts");
    p
}

/// `netprobe <mode> <addr>` in `pod` (see src/bin/netprobe.rs).
pub fn netprobe<'b>(bed: &'b Bed, pod: &Pod, mode: &str, addr: &str) -> Proc<'b> {
    let bin = workspace_bin("netprobe");
    let cmd = pod_command(pod, &[bin.to_str().expect("utf-8"), mode, addr]);
    Proc::spawn(bed, &format!("netprobe-{mode}-{}", pod.name), cmd)
}
