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

/// Names the bed's resolver (`dnsmasq`) answers itself.
pub const OUTSIDE_NAME: &str = "outside.test";
pub const OUTSIDE_V4: &str = "203.0.113.7";
/// A name whose TXT records do not fit a 512-byte UDP answer: asked without EDNS, the answer
/// comes truncated and the client asks again over TCP.
pub const BIG_NAME: &str = "big.test";

/// dnsmasq on `pod`'s IPv4 address, port 53 (UDP and TCP), answering [`OUTSIDE_NAME`] and
/// [`BIG_NAME`] from its own records and nothing else (no upstream of its own: it never
/// sends a query out of the bed). Returns once it serves.
pub fn dns_server<'b>(bed: &'b Bed, pod: &Pod) -> Proc<'b> {
    dns_server_with(bed, pod, &[])
}

/// [`dns_server`] answering `records` (name, IPv4 address) too.
pub fn dns_server_with<'b>(bed: &'b Bed, pod: &Pod, records: &[(&str, std::net::IpAddr)]) -> Proc<'b> {
    let listen = format!("--listen-address={}", pod.ipv4);
    let host = format!("--host-record={OUTSIDE_NAME},{OUTSIDE_V4}");
    let chunk = "x".repeat(200);
    let txt: Vec<String> = (0..6).map(|i| format!("--txt-record={BIG_NAME},{i}{chunk}")).collect();
    let mut argv = vec![
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--pid-file",
        "--bind-interfaces",
        "--port=53",
        "--log-queries",
        "--log-facility=-",
        &listen,
        &host,
    ];
    argv.extend(txt.iter().map(String::as_str));
    let extra: Vec<String> = records.iter().map(|(name, ip)| format!("--host-record={name},{ip}")).collect();
    argv.extend(extra.iter().map(String::as_str));
    let mut p = Proc::spawn(bed, &format!("dnsmasq-{}", pod.name), pod_command(pod, &argv));
    p.wait_for_output("started, version", Duration::from_secs(20)).expect("dnsmasq starts");
    p
}

/// `dig` in `pod` with one try and a short timeout, and the given arguments.
pub fn dig(pod: &Pod, args: &[&str]) -> std::process::Output {
    let mut argv = vec!["dig", "+time=2", "+tries=1"];
    argv.extend_from_slice(args);
    crate::exec::run_with_timeout(pod_command(pod, &argv), Duration::from_secs(20)).expect("dig runs")
}
