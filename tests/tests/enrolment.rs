//! Enrolment through the mesh file: namespace label, pod opt-out, live changes, and refusal
//! of invalid files (at start and on reload).

mod common;

use std::time::Duration;

use ambit_testbed::{
    ambit::{pinned_map_len, write_mesh},
    eventually,
    mesh::{Mesh, AMBIENT, OPT_OUT},
    run_with_timeout, Ambit, Bed, Chat,
};
use common::*;

/// The acceptance bound for a file edit to take effect.
const TWO_SECONDS: Duration = Duration::from_secs(2);

#[test]
fn enrolment_follows_the_file_and_established_connections_survive() {
    let bed = Bed::new("enrolment");
    let node = bed.node("n1");
    let b = bed.pod(&node, "b"); // enrolled, serves HTTP
    let c = bed.pod(&node, "c"); // toggled
    let d = bed.pod(&node, "d"); // never enrolled, serves echo
    let e = bed.pod(&node, "e"); // enrolled namespace, opted out
    let mesh_path = bed.dir().join("mesh.yaml");
    let mesh = Mesh::default()
        .namespace("demo", &[AMBIENT])
        .namespace("other", &[])
        .namespace("plain", &[])
        .pod(&b, "demo", &[])
        .pod(&e, "demo", &[OPT_OUT])
        .pod(&c, "other", &[])
        .pod(&d, "plain", &[]);
    write_mesh(&mesh_path, &mesh.yaml());
    let ambit = Ambit::start(&bed, &node, &mesh_path, &[]);
    let _http = http_server(&bed, &b, "b\n");
    let mut echo = netprobe(&bed, &d, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    let url_b = format!("http://{}:8080/", b.ipv4);
    let echo_d = format!("{}:7000", d.ipv4);
    let outbound_c = || counter(&ambit, "ambit_proxy_connections_opened_total", "outbound", "other", "c");

    // Neither c (namespace not labelled) nor e (opted out) is captured on the way out.
    assert_eq!(ok_body(&curl(&c, &url_b)), "b\n");
    assert_eq!(ok_body(&curl(&e, &url_b)), "b\n");
    assert_eq!(outbound_c(), 0);
    assert_eq!(counter(&ambit, "ambit_proxy_connections_opened_total", "outbound", "demo", "e"), 0);
    assert_eq!(kernel(&ambit, "connect_not_enrolled"), 2);
    let dump = ambit.config_dump();
    let names: Vec<&str> =
        dump["pods"].as_array().expect("pods").iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["b"], "{dump}");

    // A connection opened before enrolment.
    let mut before = Chat::open(&bed, &c, &echo_d).expect("direct connection");
    assert_eq!(before.say("one").expect("echo"), "one");

    // Enrol c's namespace: new connections are captured within 2 s.
    write_mesh(&mesh_path, &mesh.clone().relabel_namespace("other", &[AMBIENT]).yaml());
    let captured = eventually(TWO_SECONDS, || {
        assert_eq!(ok_body(&curl(&c, &url_b)), "b\n");
        outbound_c() > 0
    });
    assert!(captured, "c not captured within 2 s of enrolment:\n{}", ambit.log());
    assert_eq!(before.say("two").expect("survives enrolment"), "two");
    let opened = outbound_c();
    let mut during = Chat::open(&bed, &c, &echo_d).expect("captured connection");
    assert_eq!(during.say("x").expect("echo through the proxy"), "x");
    assert_eq!(outbound_c(), opened + 1, "the new connection is captured");

    // Unenrol again: new connections go direct within 2 s; both open ones keep working.
    write_mesh(&mesh_path, &mesh.yaml());
    let direct = eventually(TWO_SECONDS, || {
        let n = outbound_c();
        assert_eq!(ok_body(&curl(&c, &url_b)), "b\n");
        outbound_c() == n
    });
    assert!(direct, "c still captured 2 s after unenrolment:\n{}", ambit.log());
    assert_eq!(before.say("three").expect("survives unenrolment"), "three");
    assert_eq!(during.say("y").expect("proxied connection survives unenrolment"), "y");
    // The capture map entry goes first; the dump is published once the reconcile that
    // removed it has finished, a moment later.
    let one_pod = || ambit.config_dump()["pods"].as_array().map(Vec::len) == Some(1);
    assert!(eventually(TWO_SECONDS, one_pod), "{}", ambit.config_dump());
    let dump = ambit.config_dump();
    // Nothing of c is left in the kernel: one pod's entries, one pod's inbound attachment.
    let pins = ambit.pin_dir();
    assert_eq!(pinned_map_len(&pins.join("AMBIT_ENROLLED")).expect("enrolled"), 1);
    assert_eq!(pinned_map_len(&pins.join("AMBIT_POD_IPS")).expect("pod ips"), 2);
    assert_eq!(std::fs::read_dir(pins.join("tc")).expect("tc pins").count(), 1);
    let listeners = dump["capture"]["registered_listeners"].as_u64();
    // Outbound and inbound, IPv4 and IPv6, and the DNS listener of each family.
    assert_eq!(listeners, Some(6), "b's six listeners only: {dump}");
}

/// `(what to break, how, the line and field the error must name)`.
fn invalid_files(good: &str) -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "unknown field",
            good.replacen(
                "    serviceAccount: default\n",
                "    serviceAccount: default\n    colour: blue\n",
                1,
            ),
            "field `pods[0]`: unknown field `colour`",
        ),
        ("bad IP", good.replacen("ips: [10.1.0.2,", "ips: [10.1.0.300,", 1), "field `pods[0].ips[0]`"),
        (
            "duplicate pod",
            good.replacen("  - name: b\n", "  - name: a\n", 1),
            "field `pods[1].name`: duplicate pod demo/a",
        ),
        (
            "netns that does not exist",
            good.replacen("-n1-a\n", "-n1-gone\n", 1),
            "field `pods[0].netns`: network namespace",
        ),
    ]
}

/// The line number the error must carry: where `needle` is in the broken file.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect("needle in file") + 1
}

#[test]
fn an_invalid_file_is_refused_at_start_with_line_and_field() {
    let bed = Bed::new("invalid-start");
    let node = bed.node("n1");
    let a = bed.pod(&node, "a");
    let b = bed.pod(&node, "b");
    let good = Mesh::default().namespace("demo", &[AMBIENT]).pod(&a, "demo", &[]).pod(&b, "demo", &[]).yaml();
    let path = bed.dir().join("mesh.yaml");
    let needles =
        ["colour", "10.1.0.300", "  - name: a\n    namespace: demo\n    serviceAccount", "-n1-gone"];
    for ((what, text, expect), needle) in invalid_files(&good).into_iter().zip(needles) {
        write_mesh(&path, &text);
        let line = if what == "duplicate pod" {
            // The second "- name: a".
            text.lines().enumerate().filter(|(_, l)| *l == "  - name: a").nth(1).expect("duplicate").0 + 1
        } else {
            line_of(&text, needle)
        };
        let out = run_with_timeout(Ambit::command(&bed, &node, &path, &[]), T).expect("ambit runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: ambit started with an invalid file:\n{stderr}");
        assert!(stderr.contains(&format!("mesh.yaml:{line}:")), "{what}: line {line} not named:\n{stderr}");
        assert!(stderr.contains(expect), "{what}: {expect:?} not in:\n{stderr}");
        // Refused before touching the kernel: nothing was pinned.
        assert!(!bed.bpffs().join("ambit").join("n1").exists(), "{what}: state pinned despite the refusal");
    }
}

#[test]
fn an_invalid_edit_is_refused_and_the_previous_state_keeps_serving() {
    let bed = Bed::new("invalid-reload");
    let node = bed.node("n1");
    let a = bed.pod(&node, "a");
    let b = bed.pod(&node, "b");
    let good = Mesh::default().namespace("demo", &[AMBIENT]).pod(&a, "demo", &[]).pod(&b, "demo", &[]).yaml();
    let path = bed.dir().join("mesh.yaml");
    write_mesh(&path, &good);
    let mut ambit = Ambit::start(&bed, &node, &path, &[]);
    let _http = http_server(&bed, &b, "still here\n");
    let url = format!("http://{}:8080/", b.ipv4);

    for (n, (what, text, expect)) in invalid_files(&good).into_iter().enumerate() {
        write_mesh(&path, &text);
        ambit.wait_log(expect, T).unwrap_or_else(|e| panic!("{what}: refusal not logged: {e}"));
        assert!(ambit.log().contains("previous version stays in force"), "{what}");
        // Still captured with the previous state.
        assert_eq!(ok_body(&curl(&a, &url)), "still here\n", "{what}");
        let opened = counter(&ambit, "ambit_proxy_connections_opened_total", "outbound", "demo", "a");
        assert_eq!(opened, n as u64 + 1, "{what}: a no longer captured");
        let dump = ambit.config_dump();
        assert_eq!(dump["pods"].as_array().expect("pods").len(), 2, "{what}: {dump}");
    }

    // A valid edit is taken again: opting a out.
    let opted_out = good.replacen("-n1-a\n", "-n1-a\n    labels:\n      istio.io/dataplane-mode: none\n", 1);
    write_mesh(&path, &opted_out);
    assert!(eventually(T, || ambit.config_dump()["pods"].as_array().map(Vec::len) == Some(1)));
}
