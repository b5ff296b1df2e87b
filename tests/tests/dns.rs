//! DNS capture, end to end: enrolled pods' queries to port 53 steered by the eBPF programs to
//! the proxy's listener in the pod, answered from the mesh or forwarded to the pod's own
//! resolver (a real dnsmasq inside the bed), with real clients (`dig`, glibc's `getent`,
//! curl by name). The pods' resolv.conf is their own, bind-mounted as a runtime would; the
//! proxy reads it through the pod's processes.

use std::process::Output;

mod common;

use ambit_testbed::{
    ambit::write_mesh,
    apps::{dig, dns_server, BIG_NAME, OUTSIDE_NAME, OUTSIDE_V4},
    eventually,
    mesh::{Mesh, AMBIENT},
    pod_command, run_with_timeout, Ambit, Bed, Node, Pod,
};
use common::*;

const VIP: &str = "10.96.0.50";

/// Node n1 with pods `a` (enrolled client), `b` (enrolled, behind service `web` at [`VIP`]),
/// `c` (not enrolled) and `r` (not enrolled, the resolver in `a`'s and `c`'s resolv.conf).
struct DnsBed {
    node: Node,
    a: Pod,
    b: Pod,
    c: Pod,
    r: Pod,
    mesh: std::path::PathBuf,
}

fn dns_bed(bed: &Bed) -> DnsBed {
    let node = bed.node("n1");
    let r = bed.pod(&node, "r");
    let a = bed.pod(&node, "a").with_resolver(bed.dir(), "demo", r.ipv4);
    let b = bed.pod(&node, "b");
    let c = bed.pod(&node, "c").with_resolver(bed.dir(), "demo", r.ipv4);
    let mesh = bed.dir().join("mesh.yaml");
    write_mesh(
        &mesh,
        &Mesh::default()
            .namespace("demo", &[AMBIENT])
            .pod(&a, "demo", &[("app", "client")])
            .pod(&b, "demo", &[("app", "web")])
            .service("web", "demo", &[VIP], &[(80, 8080)], &[("app", "web")])
            .yaml(),
    );
    DnsBed { node, a, b, c, r, mesh }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The records of a `dig` answer section (`+noall +answer`), sorted, TTLs dropped: two
/// resolvers' TTLs count down independently.
fn records(out: &Output) -> Vec<String> {
    let mut v: Vec<String> = stdout(out)
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| {
            let mut f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 1 {
                f.remove(1);
            }
            f.join(" ")
        })
        .collect();
    v.sort();
    v
}

fn dns_metric(ambit: &Ambit, name: &str, labels: &[(&str, &str)]) -> u64 {
    labelled(&ambit.metrics(), name, labels)
}

#[test]
fn an_enrolled_pod_s_dns_is_answered_from_the_mesh_and_the_rest_forwarded_unchanged() {
    let bed = Bed::new("dns-answer");
    let d = dns_bed(&bed);
    let _resolver = dns_server(&bed, &d.r);
    let ambit = Ambit::start(&bed, &d.node, &d.mesh, &[]);
    let _web = http_server(&bed, &d.b, "b\n");
    let at = format!("@{}", d.r.ipv4);

    // glibc, through the pod's search path: a short service name is the service's VIP. glibc
    // checks that the answer came from the server it asked: the capture restores that.
    let out = run_with_timeout(pod_command(&d.a, &["getent", "hosts", "web"]), T).expect("getent");
    assert_eq!(ok_body(&out).split_whitespace().next(), Some(VIP), "{}", ambit.log());
    // Curl by name: resolved in the pod, then captured to the service's endpoint.
    assert_eq!(ok_body(&curl(&d.a, "http://web/")), "b\n");
    let service = "dst_service=demo/web.demo.svc.cluster.local";
    assert!(eventually(T, || access_lines(&ambit, &["direction=outbound", "pod=a", service]) == 1));

    // dig, asking the pod's resolver by address: the full name, then AAAA of a name that has
    // no IPv6 address (NOERROR, no records: the name exists).
    let full = dig(&d.a, &[&at, "web.demo.svc.cluster.local", "A", "+noall", "+answer"]);
    assert_eq!(records(&full), [format!("web.demo.svc.cluster.local. IN A {VIP}")], "{}", stdout(&full));
    let aaaa = dig(&d.a, &[&at, "web.demo.svc.cluster.local", "AAAA"]);
    assert!(
        stdout(&aaaa).contains("status: NOERROR") && stdout(&aaaa).contains("ANSWER: 0"),
        "{}",
        stdout(&aaaa)
    );
    // The answer reads as coming from the resolver asked, not from the proxy's listener.
    assert!(stdout(&aaaa).contains(&format!("SERVER: {}#53", d.r.ipv4)), "{}", stdout(&aaaa));

    // A name the mesh does not know: the resolver's answer, the same as a pod outside the
    // mesh gets asking directly.
    let via_proxy = dig(&d.a, &[&at, OUTSIDE_NAME, "A", "+noall", "+answer"]);
    let direct = dig(&d.c, &[&at, OUTSIDE_NAME, "A", "+noall", "+answer"]);
    assert_eq!(records(&via_proxy), [format!("{OUTSIDE_NAME}. IN A {OUTSIDE_V4}")], "{}", stdout(&via_proxy));
    assert_eq!(records(&via_proxy), records(&direct));
    // Too big for 512 bytes without EDNS: truncated over UDP, complete over TCP, both captured.
    let big_proxy = dig(&d.a, &[&at, BIG_NAME, "TXT", "+noedns"]);
    let big_direct = dig(&d.c, &[&at, BIG_NAME, "TXT", "+noedns"]);
    assert!(stdout(&big_proxy).contains("Truncated, retrying in TCP mode"), "{}", stdout(&big_proxy));
    let answer = |o: &Output| {
        let text = stdout(o);
        let mut v: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with(BIG_NAME))
            .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
            .collect();
        v.sort();
        v
    };
    assert_eq!(answer(&big_proxy).len(), 6, "{}", stdout(&big_proxy));
    assert_eq!(answer(&big_proxy), answer(&big_direct));

    // All of it went through the proxy, with ztunnel's metrics; the pod outside the mesh
    // was not captured.
    let client = [("source_canonical_service", "client")];
    let by = |ty: &'static str, proto: &'static str| {
        [("request_query_type", ty), ("request_protocol", proto), client[0]]
    };
    assert!(dns_metric(&ambit, "istio_dns_requests_total", &by("a", "udp")) >= 3, "{}", ambit.metrics());
    assert!(dns_metric(&ambit, "istio_dns_requests_total", &by("txt", "tcp")) >= 1, "{}", ambit.metrics());
    assert!(dns_metric(&ambit, "istio_dns_upstream_requests_total", &by("a", "udp")) >= 1);
    assert_eq!(dns_metric(&ambit, "istio_dns_upstream_failures_total", &client), 0);
    let captured = kernel(&ambit, "dns_captured");
    assert!(captured >= 5, "{captured}");
    assert!(kernel(&ambit, "dns_source_restored") >= 3);
    let _ = dig(&d.c, &[&at, "web.demo.svc.cluster.local", "A"]);
    assert_eq!(kernel(&ambit, "dns_captured"), captured, "a pod outside the mesh was captured");
    // ...and the resolver saw c's query for the mesh's name, never a's.
    let resolver_log = std::fs::read_to_string(bed.dir().join("dnsmasq-r.log")).unwrap_or_default();
    let asked_by = |pod: &Pod| {
        resolver_log
            .lines()
            .filter(|l| l.contains("web.demo.svc.cluster.local") && l.contains(&format!("from {}", pod.ipv4)))
            .count()
    };
    assert_eq!(asked_by(&d.a), 0, "{resolver_log}");
    assert_eq!(asked_by(&d.c), 1, "{resolver_log}");
}

#[test]
fn with_the_proxy_down_an_enrolled_pod_s_dns_fails_closed_unless_fail_open() {
    let bed = Bed::new("dns-down");
    let d = dns_bed(&bed);
    let _resolver = dns_server(&bed, &d.r);
    let at = format!("@{}", d.r.ipv4);
    let resolves = |pod: &Pod| records(&dig(pod, &[&at, OUTSIDE_NAME, "A", "+noall", "+answer"])).len() == 1;

    let mut ambit = Ambit::start(&bed, &d.node, &d.mesh, &[]);
    assert!(resolves(&d.a), "{}", ambit.log());
    ambit.kill();
    // The programs and maps stay pinned: a's DNS still goes to its (now closed) listener.
    assert!(!resolves(&d.a), "an enrolled pod's DNS bypassed the mesh with no proxy");
    let out = run_with_timeout(pod_command(&d.a, &["getent", "hosts", OUTSIDE_NAME]), T).expect("getent");
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(resolves(&d.c), "a pod outside the mesh lost its DNS");

    // The same with fail-open: while no proxy runs, queries go where they were sent.
    let mut open = Ambit::start(&bed, &d.node, &d.mesh, &["--fail-open"]);
    assert!(resolves(&d.a));
    open.kill();
    assert!(resolves(&d.a), "fail-open: the query should reach the resolver directly");
}

#[test]
fn dns_capture_can_be_turned_off() {
    let bed = Bed::new("dns-off");
    let d = dns_bed(&bed);
    let _resolver = dns_server(&bed, &d.r);
    let ambit = Ambit::start(&bed, &d.node, &d.mesh, &["--dns-capture=false"]);
    // The resolver answers: it knows nothing of the mesh's names.
    let out = dig(&d.a, &[&format!("@{}", d.r.ipv4), "web.demo.svc.cluster.local", "A"]);
    assert!(!stdout(&out).contains(VIP), "{}", stdout(&out));
    assert!(stdout(&out).contains("status:"), "the resolver answered directly: {}", stdout(&out));
    assert_eq!(kernel(&ambit, "dns_captured"), 0);
    assert_eq!(ambit.config_dump()["pods"][0]["dns"].as_array().map(Vec::len), Some(0));
}

/// Hostile DNS through the real capture path: what an attacker in an enrolled pod can send to
/// port 53. Each datagram gets no answer or a well-formed one, and the proxy keeps answering.
#[test]
fn hostile_dns_from_a_pod_never_crashes_the_proxy_and_every_reply_is_well_formed() {
    let bed = Bed::new("dns-hostile");
    let d = dns_bed(&bed);
    let _resolver = dns_server(&bed, &d.r);
    let ambit = Ambit::start(&bed, &d.node, &d.mesh, &[]);
    let script = format!(
        r#"
import os, random, socket, struct, sys
random.seed(7)
server = ("{ip}", 53)
def header(id, flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", id, flags, qd, an, ns, ar)
q = b"\x03web\x04demo\x00\x00\x01\x00\x01"
cases = [
    b"",                                              # empty
    b"\x12",                                          # shorter than a header
    header(1) + b"\xc0\x0c" + b"\x00\x01\x00\x01",    # pointer to itself
    header(2) + b"\x01a\xc0\x0e\x00\x01\x00\x01",     # pointer loop a -> back into itself
    header(3) + b"\xc0\xff\x00\x01\x00\x01",          # pointer past the end
    header(4, qd=65535) + q,                          # counts that lie
    header(5, flags=0x8100) + q,                      # a response, not a query
    header(6, flags=0x2900) + q,                      # opcode UPDATE
    header(7) + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63 + b"\x00\x00\x01\x00\x01",  # name > 255
    header(8) + b"\x05web" ,                          # label past the end
    header(9) + q + b"\x00" * 40000,                  # trailing garbage, oversized
    header(10, ar=1) + q + b"\x00\x00\x29\xff\xff\x00\x00\x00\x00\xff\xff",  # OPT rdlen past the end
]
for i in range(200):
    cases.append(bytes(random.getrandbits(8) for _ in range(random.randint(12, 600))))
bad = 0
answered = 0
for i, m in enumerate(cases):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.3)
    s.sendto(m, server)
    try:
        r, src = s.recvfrom(65535)
    except socket.timeout:
        continue
    finally:
        pass
    answered += 1
    ok = len(r) >= 12 and r[2] & 0x80 and r[:2] == m[:2] and src == server
    if not ok:
        bad += 1
        print("malformed reply to case", i, r[:32].hex(), src, file=sys.stderr)
# TCP: a frame that promises more than it sends, then one that is garbage.
for frame in [b"\xff\xff" + b"\x00" * 100, b"\x00\x10" + os.urandom(16)]:
    t = socket.create_connection(server, timeout=2)
    t.sendall(frame)
    t.settimeout(1)
    try:
        t.recv(65535)
    except Exception:
        pass
    t.close()
print(answered, bad)
"#,
        ip = d.r.ipv4
    );
    let out =
        run_with_timeout(pod_command(&d.a, &["python3", "-c", &script]), std::time::Duration::from_secs(180))
            .expect("the attack script runs");
    let text = ok_body(&out);
    let (answered, bad): (u32, u32) = {
        let mut f = text.split_whitespace().map(|n| n.parse().expect("a count"));
        (f.next().expect("answered"), f.next().expect("bad"))
    };
    assert_eq!(bad, 0, "{}", String::from_utf8_lossy(&out.stderr));
    // The malformed queries with a readable header get FORMERR or NOTIMP: some answers came.
    assert!(answered >= 5, "{text}");
    // Every datagram went through the capture to the proxy, which still answers.
    assert!(kernel(&ambit, "dns_captured") >= 200);
    let ok = dig(&d.a, &[&format!("@{}", d.r.ipv4), "web.demo.svc.cluster.local", "A", "+noall", "+answer"]);
    assert_eq!(records(&ok), [format!("web.demo.svc.cluster.local. IN A {VIP}")], "{}", ambit.log());
    assert!(ambit.readiness().is_ok_and(|(code, _)| code == 200));
}
