//! Two nodes, one proxy each, one control plane (the mesh CA): traffic between enrolled pods
//! travels in mutual-TLS HBONE tunnels, with the workloads' identities.

mod common;

use std::{path::Path, time::Duration};

use ambit_testbed::{
    ambit::write_mesh,
    certs,
    controlplane::ControlPlane,
    exec::{node_command, workspace_bin},
    mesh::{Mesh, AMBIENT, OPT_OUT},
    pod_command, run_with_timeout, Ambit, Bed, Chat, Node, Pod, Proc,
};
use common::*;

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";
const NEIGHBOUR: &str = "spiffe://cluster.local/ns/demo/sa/neighbour";

/// Nodes n1 and n2 linked, a control-plane namespace linked to both; pod a (sa client) on
/// n1, pod b (sa server) on n2, pod c (sa neighbour) on n1; all enrolled.
struct Mesh2 {
    n1: Node,
    n2: Node,
    cp: Node,
    a: Pod,
    b: Pod,
    c: Pod,
    mesh: std::path::PathBuf,
    /// n1's side of the n1–n2 link.
    n1_link: String,
}

fn two_nodes(bed: &Bed) -> Mesh2 {
    let n1 = bed.node("n1");
    let n2 = bed.node("n2");
    let cp = bed.node("cp");
    let (n1_link, _) = bed.link(&n1, &n2);
    bed.link(&cp, &n1);
    bed.link(&cp, &n2);
    let a = bed.pod(&n1, "a");
    let b = bed.pod(&n2, "b");
    let c = bed.pod(&n1, "c");
    let mesh = bed.dir().join("mesh.yaml");
    write_mesh(
        &mesh,
        &Mesh::default()
            .namespace("demo", &[AMBIENT])
            .pod_with_sa(&a, "demo", &[], "client")
            .pod_with_sa(&b, "demo", &[], "server")
            .pod_with_sa(&c, "demo", &[], "neighbour")
            .yaml(),
    );
    Mesh2 { n1, n2, cp, a, b, c, mesh, n1_link }
}

fn mtls_lines(p: &Ambit, direction: &str, src: &str, dst: &str) -> usize {
    let (dir, s, d) =
        (format!("direction={direction}"), format!("src_identity={src}"), format!("dst_identity={dst}"));
    access_lines(p, &["connection complete", "security=mutual_tls", &dir, &s, &d])
}

#[test]
fn curl_across_nodes_goes_through_an_mtls_tunnel_with_both_identities() {
    let bed = Bed::new("hbone-curl");
    let t = two_nodes(&bed);
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let p1 = cp.start_node(&t.n1, &t.mesh, &[]);
    let p2 = cp.start_node(&t.n2, &t.mesh, &[]);
    let _server = http_server(&bed, &t.b, "across nodes\n");

    for url in [format!("http://{}:8080/", t.b.ipv4), format!("http://[{}]:8080/", t.b.ipv6)] {
        assert_eq!(ok_body(&curl(&t.a, &url)), "across nodes\n", "{url}");
    }
    assert!(eventually(T, || mtls_lines(&p1, "outbound", CLIENT, SERVER) == 2), "n1:\n{}", p1.log());
    assert!(eventually(T, || mtls_lines(&p2, "inbound", CLIENT, SERVER) == 2), "n2:\n{}", p2.log());
    // Certificates: one per identity on the node, never a key in the dump.
    for (p, id) in [(&p1, CLIENT), (&p2, SERVER)] {
        let dump = p.config_dump();
        let certs = dump["certificates"].as_array().expect("certificates");
        assert_eq!(certs.len(), if id == CLIENT { 2 } else { 1 }, "{dump}");
        let cert = certs.iter().find(|c| c["identity"] == id).expect("the pod's identity");
        assert_eq!(cert["state"], "valid", "{dump}");
        assert!(cert["certificate"]["serial"].as_str().is_some_and(|s| !s.is_empty()), "{dump}");
        assert!(cert["certificate"]["not_after"].as_str().is_some(), "{dump}");
        let text = dump.to_string();
        assert!(!text.contains("PRIVATE KEY") && !text.contains("\"key\""), "key material in the dump");
    }
    // The CA issued each node only its own identities.
    assert!(cp.log().contains(&format!("node=n1 identity={CLIENT}")), "{}", cp.log());
    assert!(!cp.log().contains(&format!("node=n2 identity={CLIENT}")), "{}", cp.log());
}

#[test]
fn same_node_traffic_is_tunnelled_with_identity_too() {
    let bed = Bed::new("hbone-same-node");
    let t = two_nodes(&bed);
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let p1 = cp.start_node(&t.n1, &t.mesh, &[]);
    let _server = http_server(&bed, &t.c, "same node\n");
    assert_eq!(ok_body(&curl(&t.a, &format!("http://{}:8080/", t.c.ipv4))), "same node\n");
    assert!(eventually(T, || mtls_lines(&p1, "outbound", CLIENT, NEIGHBOUR) == 1), "{}", p1.log());
    assert!(eventually(T, || mtls_lines(&p1, "inbound", CLIENT, NEIGHBOUR) == 1), "{}", p1.log());
    // Not a single plaintext leg: the inbound plaintext listener saw nothing.
    assert_eq!(access_lines(&p1, &["security=none"]), 0, "{}", p1.log());

    // The neighbour leaves the mesh: n1 drops its certificate and key with it.
    let certs = |p: &Ambit| -> Vec<String> {
        let dump = p.config_dump();
        dump["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["identity"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(certs(&p1), [CLIENT, NEIGHBOUR]);
    let opted_out = Mesh::default()
        .namespace("demo", &[AMBIENT])
        .pod_with_sa(&t.a, "demo", &[], "client")
        .pod_with_sa(&t.b, "demo", &[], "server")
        .pod_with_sa(&t.c, "demo", &[OPT_OUT], "neighbour");
    write_mesh(&t.mesh, &opted_out.yaml());
    assert!(eventually(T, || certs(&p1) == [CLIENT]), "{:?}", certs(&p1));
    assert!(p1.log().contains(&format!(
        "no pod with this identity left on the node: certificate and key dropped identity={NEIGHBOUR}"
    )));
}

/// Packets of a capture file, as `tcpdump -r` prints them (`-A`: with payload as text).
fn read_capture(file: &Path, filter: &str, ascii: bool) -> String {
    let mut cmd = std::process::Command::new("tcpdump");
    cmd.arg("-r").arg(file).arg("-n");
    if ascii {
        cmd.arg("-A");
    }
    if !filter.is_empty() {
        cmd.arg(filter);
    }
    let out = run_with_timeout(cmd, T).expect("tcpdump -r");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bulk_across_nodes_is_byte_exact_and_the_wire_shows_only_tls_on_15008() {
    const GIB: u64 = 1 << 30;
    let bed = Bed::new("hbone-wire");
    let t = two_nodes(&bed);
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let p1 = cp.start_node(&t.n1, &t.mesh, &[]);
    let _p2 = cp.start_node(&t.n2, &t.mesh, &[]);
    let marker = format!("AMBIT-MARKER-{}", bed.id());
    let _server = http_server(&bed, &t.b, &format!("{marker}\n"));

    // Capture the node-to-node link while a request and its answer carry the marker.
    let capture = bed.dir().join("link.pcap");
    let mut dump = Proc::spawn(
        &bed,
        "tcpdump",
        node_command(
            &t.n1,
            &[
                "tcpdump",
                "--immediate-mode",
                "-Z",
                "root",
                "-i",
                &t.n1_link,
                "-n",
                "-U",
                "-w",
                capture.to_str().expect("utf-8"),
            ],
        ),
    );
    dump.wait_for_output("listening on", T).expect("tcpdump starts");
    let url = format!("http://{}:8080/index.html?{marker}", t.b.ipv4);
    assert_eq!(ok_body(&curl(&t.a, &url)), format!("{marker}\n"));
    std::thread::sleep(Duration::from_millis(300));
    dump.signal(nix::sys::signal::Signal::SIGINT, T).expect("tcpdump stops");
    let all = read_capture(&capture, "", false);
    let tunnel = read_capture(&capture, "tcp port 15008", false);
    let other = read_capture(&capture, "tcp and not port 15008", false);
    assert!(tunnel.lines().count() > 5, "no HBONE traffic captured:\n{all}");
    assert_eq!(other, "", "TCP outside the tunnel on the link");
    assert!(!read_capture(&capture, "", true).contains(&marker), "the marker crossed the link in clear");

    // And a gibibyte through the tunnel, hashed at both ends.
    let mut sink = netprobe(&bed, &t.b, "sink", "[::]:9000");
    sink.wait_for_output("listening", T).expect("sink listens");
    let bin = workspace_bin("netprobe");
    let send = pod_command(
        &t.a,
        &[bin.to_str().expect("utf-8"), "send", &format!("{}:9000", t.b.ipv4), &GIB.to_string()],
    );
    let text = ok_body(&run_with_timeout(send, Duration::from_secs(300)).expect("netprobe send runs"));
    let sent = text.lines().find_map(|l| l.strip_prefix("sent ")).expect("sender's hash");
    let received = text.lines().find_map(|l| l.strip_prefix("received ")).expect("sink's hash");
    assert_eq!(sent, received);
    assert!(sent.starts_with(&format!("{GIB} ")), "{sent}");
    let needles = ["security=mutual_tls", "direction=outbound"];
    assert!(
        eventually(T, || access_lines(&p1, &[needles[0], needles[1], &format!("bytes_sent={GIB}")]) == 1),
        "{}",
        p1.log()
    );
}

#[test]
fn fifty_concurrent_connections_share_a_handful_of_hbone_connections() {
    let bed = Bed::new("hbone-pool");
    let t = two_nodes(&bed);
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let p1 = cp.start_node(&t.n1, &t.mesh, &[]);
    let _p2 = cp.start_node(&t.n2, &t.mesh, &[]);
    let mut echo = netprobe(&bed, &t.b, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    let bin = workspace_bin("netprobe");
    let mut hold = Proc::spawn(
        &bed,
        "hold",
        pod_command(&t.a, &[bin.to_str().expect("utf-8"), "hold", &format!("{}:7000", t.b.ipv4), "50", "60"]),
    );
    hold.wait_for_output("held 50", Duration::from_secs(60)).expect("50 connections through the mesh");
    let dump = p1.config_dump();
    let pools = dump["hbone_pools"].as_array().expect("pools");
    let to_b: Vec<&serde_json::Value> =
        pools.iter().filter(|p| p["dst_ip"] == t.b.ipv4.to_string()).collect();
    assert_eq!(to_b.len(), 1, "one pool key (a→b over IPv4): {dump}");
    let conns = to_b[0]["connections"].as_array().expect("connections");
    let streams: u64 = conns.iter().filter_map(|c| c["streams"].as_u64()).sum();
    assert_eq!(streams, 50, "{dump}");
    assert!(
        !conns.is_empty() && conns.len() <= 3,
        "50 tunnels over {} HBONE connections: {dump}",
        conns.len()
    );
    assert_eq!(to_b[0]["src_identity"], CLIENT);
    assert_eq!(to_b[0]["dst_identity"], SERVER);
}

#[test]
fn the_client_s_first_bytes_travel_with_the_connect() {
    let bed = Bed::new("hbone-early");
    let t = two_nodes(&bed);
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let p1 = cp.start_node(&t.n1, &t.mesh, &[]);
    // b's 15008 is the test's own HBONE server, with b's identity, where n2's proxy would be:
    // it waits up to 3 s for DATA before it answers a CONNECT.
    let (cert, key) = certs::workload(bed.dir(), "b-server", SERVER, &cp.root_cert, &cp.root_key);
    let bin = workspace_bin("hbone-peer");
    let argv = [
        bin.to_str().expect("utf-8"),
        "[::]:15008",
        "--cert",
        cert.to_str().expect("utf-8"),
        "--key",
        key.to_str().expect("utf-8"),
        "--wait-ms",
        "3000",
    ];
    let mut peer = Proc::spawn(&bed, "hbone-peer-b", pod_command(&t.b, &argv));
    peer.wait_for_output("listening", T).expect("the peer listens");

    // curl writes its request as soon as it is connected: the request reaches the
    // destination with the CONNECT, before the destination answered it. The proxy reads
    // without waiting, once its tunnel is ready: a curl not scheduled by then (a loaded
    // machine) has sent nothing yet, and its request follows the answer. So up to five
    // tries, and one must have carried the request.
    let early = format!("connect {}:7000 early ", t.b.ipv4);
    let mut tries = 0;
    let carried = |out: &str| {
        out.lines()
            .any(|l| l.starts_with(&early) && l.ends_with(": GET / HTTP/1.1") && !l.contains(" early 0:"))
    };
    while tries < 5 && !carried(&peer.output()) {
        tries += 1;
        let out = curl(&t.a, &format!("http://{}:7000/", t.b.ipv4));
        assert_eq!(ok_body(&out), "ok\n", "{}", peer.output());
        assert!(
            eventually(T, || peer.output().matches(early.as_str()).count() == tries),
            "{}",
            peer.output()
        );
    }
    assert!(carried(&peer.output()), "no CONNECT carried the request:\n{}", peer.output());
    assert!(eventually(T, || mtls_lines(&p1, "outbound", CLIENT, SERVER) == tries), "{}", p1.log());

    // A client that waits for the server to speak first sends nothing early: the tunnel
    // opens all the same once the destination answers, and carries what follows.
    let mut chat = Chat::open(&bed, &t.a, &format!("{}:7001", t.b.ipv4)).expect("chat connects");
    peer.wait_for_output(&format!("connect {}:7001 early 0:", t.b.ipv4), T).expect("an empty CONNECT");
    assert_eq!(chat.say("after the answer").expect("echo"), "after the answer");
}

/// Runs the HBONE probe from n1's namespace against `target`.
fn probe(node: &Node, target: &str, authority: &str, extra: &[&str]) -> String {
    let bin = workspace_bin("hbone-probe");
    let mut argv = vec![bin.to_str().expect("utf-8"), target, authority];
    argv.extend_from_slice(extra);
    let out = run_with_timeout(node_command(node, &argv), T).expect("hbone-probe runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_inbound_side_refuses_what_the_spec_says() {
    let bed = Bed::new("hbone-refusals");
    let t = two_nodes(&bed);
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let p2 = cp.start_node(&t.n2, &t.mesh, &[]);
    let mut echo = netprobe(&bed, &t.b, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    let dir = bed.dir();
    let (cert, key) = certs::workload(dir, "good", CLIENT, &cp.root_cert, &cp.root_key);
    let (cert, key) = (cert.to_str().expect("utf-8").to_string(), key.to_str().expect("utf-8").to_string());
    let valid = ["--cert", cert.as_str(), "--key", key.as_str()];
    let target = format!("{}:15008", t.b.ipv4);
    let b = |port: u16| format!("{}:{port}", t.b.ipv4);

    // The control: a mesh client certificate, the pod's own address, a real application.
    assert_eq!(probe(&t.n1, &target, &b(7000), &valid), "status 200\necho ping");

    let (other_td, other_td_key) = certs::workload(
        dir,
        "other-td",
        "spiffe://other.domain/ns/demo/sa/client",
        &cp.root_cert,
        &cp.root_key,
    );
    let (foreign, foreign_key) = certs::foreign(dir, "foreign", CLIENT);
    let refusals: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "another trust domain",
            vec![
                "--cert".into(),
                other_td.display().to_string(),
                "--key".into(),
                other_td_key.display().to_string(),
            ],
            "is not in trust domain cluster.local",
        ),
        (
            "a certificate from another root",
            vec![
                "--cert".into(),
                foreign.display().to_string(),
                "--key".into(),
                foreign_key.display().to_string(),
            ],
            "UnknownIssuer",
        ),
        ("no client certificate", vec![], "peer sent no certificates"),
        (
            "TLS 1.2",
            valid.iter().map(|s| s.to_string()).chain(["--tls12".to_string()]).collect(),
            "HBONE TLS handshake refused",
        ),
    ];
    for (what, args, logged) in refusals {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = probe(&t.n1, &target, &b(7000), &args);
        assert!(out.starts_with("refused"), "{what}: {out}");
        assert!(
            eventually(T, || p2.log().contains(logged)),
            "{what}: {logged:?} not in the log:\n{}",
            p2.log()
        );
    }
    let tls_refused = r#"ambit_proxy_connections_failed_total{direction="inbound",namespace="demo",pod="b",reason="hbone_tls_refused"}"#;
    assert_eq!(p2.metric(tls_refused), 4);

    // Valid TLS, bad CONNECTs.
    for (what, authority, status) in [
        ("another pod's address", format!("{}:7000", t.a.ipv4), "status 400"),
        ("a malformed authority", "not-an-address:80".to_string(), "status 400"),
        ("the HBONE port itself", b(15008), "status 503"),
        ("the outbound capture port", b(15001), "status 503"),
        ("a port nothing listens on", b(9), "status 503"),
    ] {
        assert_eq!(probe(&t.n1, &target, &authority, &valid), status, "{what}");
    }
}

/// Asks the CA for a certificate with `csr` as node `node`; returns the status on refusal.
fn ask_ca(
    cp: &ControlPlane<'_>,
    from: &Node,
    token_node: &str,
    csr: String,
    validity: Duration,
) -> Result<usize, String> {
    use ambit::identity::caclient::{CaClient, CaError, CaSettings};
    let settings = CaSettings {
        address: cp.address.clone(),
        server_name: "ambit-controlplane".into(),
        root_cert: cp.root_cert.clone(),
        token_file: cp.token_file(token_node),
        timeout: Duration::from_secs(10),
        cluster_id: "Kubernetes".into(),
    };
    let netns = from.netns_path();
    std::thread::spawn(move || {
        ambit::crypto::install_default_provider();
        let f = std::fs::File::open(&netns).expect("netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let client = CaClient::new(&settings).map_err(|e| e.to_string())?;
            match client.create_certificate(csr, validity, None).await {
                Ok(chain) => Ok(chain.len()),
                Err(CaError::Status { code, message }) => Err(format!("{code:?}: {message}")),
                Err(e) => Err(e.to_string()),
            }
        })
    })
    .join()
    .expect("CA thread")
}

fn csr_for(uris: &[&str]) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = uris.iter().map(|u| rcgen::SanType::URI((*u).try_into().expect("uri"))).collect();
    p.serialize_request(&key).expect("csr").pem().expect("pem")
}

#[test]
fn the_ca_signs_only_what_the_calling_node_may_impersonate() {
    let bed = Bed::new("hbone-ca");
    let t = two_nodes(&bed);
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &["--max-cert-validity", "48h"]);
    let day = Duration::from_secs(24 * 3600);
    // The control: n1 hosts a (sa client).
    assert_eq!(ask_ca(&cp, &t.n1, "n1", csr_for(&[CLIENT]), day), Ok(2), "leaf and root");
    for (what, token, csr, validity, expected) in [
        ("a workload on another node", "n1", csr_for(&[SERVER]), day, "PermissionDenied: node n1 hosts no workload with identity spiffe://cluster.local/ns/demo/sa/server"),
        ("two SANs", "n1", csr_for(&[CLIENT, SERVER]), day, "InvalidArgument: the CSR must carry exactly one URI SAN (the SPIFFE identity), it has 2"),
        ("an unknown identity", "n1", csr_for(&["spiffe://cluster.local/ns/demo/sa/nobody"]), day, "PermissionDenied: no workload in the mesh has identity"),
        ("too long a validity", "n1", csr_for(&[CLIENT]), Duration::from_secs(100 * 3600), "InvalidArgument: requested validity 360000s exceeds the maximum 172800s"),
        ("a malformed CSR", "n1", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_string(), day, "InvalidArgument: malformed CSR"),
        ("another trust domain", "n1", csr_for(&["spiffe://other.domain/ns/demo/sa/client"]), day, "PermissionDenied: identity spiffe://other.domain/ns/demo/sa/client is outside this mesh's trust domain"),
    ] {
        let got = ask_ca(&cp, &t.n1, token, csr, validity);
        assert!(got.as_ref().is_err_and(|e| e.starts_with(expected)), "{what}: {got:?}");
    }
    // An unknown token.
    std::fs::write(cp.token_file("intruder"), "0123456789abcdef0123456789abcdef").expect("token");
    let got = ask_ca(&cp, &t.n1, "intruder", csr_for(&[CLIENT]), day);
    assert_eq!(got, Err("Unauthenticated: unknown bearer token".into()));
}

#[test]
fn certificates_renew_and_connections_survive_renewals_and_a_ca_outage() {
    let bed = Bed::new("hbone-renew");
    let t = two_nodes(&bed);
    let mut cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let short = ["--cert-validity", "6s"];
    let p1 = cp.start_node(&t.n1, &t.mesh, &short);
    let _p2 = cp.start_node(&t.n2, &t.mesh, &short);
    let mut echo = netprobe(&bed, &t.b, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    let _server = http_server(&bed, &t.b, "fresh\n");
    let url = format!("http://{}:8080/", t.b.ipv4);
    let renewals = |p: &Ambit| p.log().matches(&format!("certificate renewed identity={CLIENT}")).count();

    let mut chat = Chat::open(&bed, &t.a, &format!("{}:7000", t.b.ipv4)).expect("long-lived connection");
    assert_eq!(chat.say("before").expect("echo"), "before");
    // At 6 s validity, renewal is every ~3 s: wait for two.
    assert!(eventually(Duration::from_secs(30), || renewals(&p1) >= 2), "no renewals:\n{}", p1.log());
    assert_eq!(
        chat.say("after two renewals").expect("the long-lived connection survives"),
        "after two renewals"
    );
    assert_eq!(ok_body(&curl(&t.a, &url)), "fresh\n", "a new connection with the renewed certificate");

    // The CA goes away: renewal fails visibly; the current certificate keeps serving.
    cp.stop();
    assert!(
        eventually(Duration::from_secs(15), || p1
            .log()
            .contains("certificate renewal failed; the current certificate is still valid")),
        "{}",
        p1.log()
    );
    assert_eq!(chat.say("ca down").expect("still open"), "ca down");
    // The CA comes back: renewal resumes, new connections work.
    let before = renewals(&p1);
    cp.restart();
    assert!(
        eventually(Duration::from_secs(30), || renewals(&p1) > before),
        "no renewal after the CA returned:\n{}",
        p1.log()
    );
    assert_eq!(ok_body(&curl(&t.a, &url)), "fresh\n");
    assert_eq!(chat.say("end").expect("still open"), "end");
}
