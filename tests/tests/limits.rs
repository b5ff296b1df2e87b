//! Inbound HBONE against slow and greedy clients: each limit is set low on the destination
//! proxy and a hostile `hbone-probe` on the other node runs into it, while a well-behaved
//! request still gets through.

mod common;

use ambit_testbed::{
    ambit::write_mesh,
    certs,
    controlplane::ControlPlane,
    exec::{node_command, workspace_bin},
    mesh::{Mesh, AMBIENT},
    run_with_timeout, Ambit, Bed, Node, Proc,
};
use common::*;

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

/// n1 (where the probe runs) and n2 with pod b (an echo server on 7000) and its proxy,
/// started with `limits`.
struct Limits<'b> {
    n1: Node,
    target: String,
    authority: String,
    cert_args: Vec<String>,
    p2: Ambit<'b>,
    _cp: ControlPlane<'b>,
    _echo: Proc<'b>,
}

fn setup<'b>(bed: &'b Bed, limits: &[&str]) -> Limits<'b> {
    let n1 = bed.node("n1");
    let n2 = bed.node("n2");
    let cpn = bed.node("cp");
    bed.link(&n1, &n2);
    bed.link(&cpn, &n1);
    bed.link(&cpn, &n2);
    let b = bed.pod(&n2, "b");
    let mesh = bed.dir().join("mesh.yaml");
    write_mesh(
        &mesh,
        &Mesh::default().namespace("demo", &[AMBIENT]).pod_with_sa(&b, "demo", &[], "server").yaml(),
    );
    let cp = ControlPlane::start(bed, &cpn, &mesh, &[&n1, &n2], &[]);
    let mut args = cp.node_args(&n2);
    args.extend(limits.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p2 = Ambit::start(bed, &n2, &mesh, &args);
    let mut echo = netprobe(bed, &b, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    let (cert, key) = certs::workload(bed.dir(), "client", CLIENT, &cp.root_cert, &cp.root_key);
    let cert_args =
        vec!["--cert".into(), cert.display().to_string(), "--key".into(), key.display().to_string()];
    Limits {
        n1,
        target: format!("{}:15008", b.ipv4),
        authority: format!("{}:7000", b.ipv4),
        cert_args,
        p2,
        _cp: cp,
        _echo: echo,
    }
}

impl Limits<'_> {
    /// `hbone-probe` from n1 with the client certificate and `extra`; its one-line verdict.
    fn probe(&self, extra: &[&str]) -> String {
        let bin = workspace_bin("hbone-probe");
        let mut argv = vec![bin.to_str().expect("utf-8"), self.target.as_str(), self.authority.as_str()];
        argv.extend(self.cert_args.iter().map(String::as_str));
        argv.extend_from_slice(extra);
        let out = run_with_timeout(node_command(&self.n1, &argv), T).expect("hbone-probe runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn assert_well_behaved_client_served(&self) {
        assert_eq!(self.probe(&[]), "status 200\necho ping", "a well-behaved client is served");
    }

    fn assert_logged(&self, needle: &str) {
        assert!(
            eventually(T, || self.p2.log().contains(needle)),
            "{needle:?} not in the log:\n{}",
            self.p2.log()
        );
    }
}

/// `closed after <ms> ms` → ms.
fn closed_after(out: &str) -> u128 {
    out.strip_prefix("closed after ")
        .and_then(|r| r.strip_suffix(" ms"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the server did not hang up: {out}"))
}

#[test]
fn a_client_that_stalls_in_the_handshake_is_dropped_at_the_deadline() {
    let bed = Bed::new("limits-handshake");
    let l = setup(&bed, &["--hbone-handshake-timeout", "1s"]);
    l.assert_well_behaved_client_served();

    // TCP only, no ClientHello.
    let ms = closed_after(&l.probe(&["--idle", "tcp"]));
    assert!((900..5000).contains(&ms), "dropped after {ms} ms, the deadline is 1 s");
    l.assert_logged("hbone_tls_timeout");

    // TLS done, no HTTP/2 preface.
    let ms = closed_after(&l.probe(&["--idle", "tls"]));
    assert!((900..5000).contains(&ms), "dropped after {ms} ms, the deadline is 1 s");
    l.assert_logged("hbone_http2_timeout");

    l.assert_well_behaved_client_served();
}

#[test]
fn streams_beyond_the_limit_wait_and_are_not_served() {
    let bed = Bed::new("limits-streams");
    let l = setup(&bed, &["--hbone-max-streams", "4"]);
    assert_eq!(l.probe(&["--streams", "6"]), "answered 4 of 6");
    assert_eq!(l.probe(&["--streams", "3"]), "answered 3 of 3", "below the limit every stream is served");
}

#[test]
fn connections_beyond_the_per_peer_limit_are_closed_at_accept() {
    let bed = Bed::new("limits-connections");
    let l = setup(&bed, &["--hbone-max-connections-per-peer", "3"]);
    assert_eq!(l.probe(&["--connections", "5"]), "ok 3 refused 2");
    l.assert_logged("hbone_peer_limit");
    // The probe is gone and its connections with it: the peer's places are free again.
    assert!(
        eventually(T, || l.probe(&["--connections", "3"]) == "ok 3 refused 0"),
        "the per-peer count was not given back when the connections closed"
    );
}

#[test]
fn an_oversized_header_block_is_answered_431() {
    let bed = Bed::new("limits-headers");
    let l = setup(&bed, &["--hbone-max-header-bytes", "4096"]);
    assert_eq!(l.probe(&["--header-bytes", "8000"]), "status 431");
    assert_eq!(
        l.probe(&["--header-bytes", "1000"]),
        "status 200\necho ping",
        "a header under the limit passes"
    );
}
