//! What happens while no proxy runs (fail closed by default, fail open on request), and a
//! restarted proxy re-adopting the pinned programs, links and maps instead of duplicating them.

mod common;

use ambit_testbed::{
    ambit::{links_of_programs, pinned_ids, write_mesh},
    bed::Pod,
    mesh::{Mesh, AMBIENT},
    pod_command, run_with_timeout, Ambit, Bed,
};
use common::*;

/// curl's exit codes: 7 = could not connect (refused), 28 = timed out.
const CURL_REFUSED: i32 = 7;
const CURL_TIMEOUT: i32 = 28;

fn curl_code(pod: &Pod, url: &str, connect_timeout: &str) -> (i32, String) {
    let cmd =
        pod_command(pod, &["curl", "-sS", "--connect-timeout", connect_timeout, "--max-time", "5", url]);
    let out = run_with_timeout(cmd, T).expect("curl runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The programs, as the start line lists them.
const PROGRAMS: &str = r#"["ambit_connect4", "ambit_connect6", "ambit_sendmsg4", "ambit_sendmsg6", "ambit_recvmsg4", "ambit_recvmsg6", "ambit_getpeername4", "ambit_getpeername6", "ambit_sock_ops", "ambit_tc_ingress", "ambit_kubelet_ops"]"#;

/// The proxy's links on cgroups: eight sock_addr programs, sock_ops, the kubelet's sock_ops.
const CGROUP_LINKS: usize = 10;

/// IDs of this proxy's pinned programs and of every link in the system that runs them.
fn program_and_link_ids(ambit: &Ambit) -> (Vec<(String, u32)>, Vec<u32>) {
    let pinned = pinned_ids(&ambit.pin_dir()).expect("reading pins");
    let progs: Vec<u32> = pinned.iter().filter(|(n, _)| n.starts_with("prog_")).map(|(_, id)| *id).collect();
    assert_eq!(progs.len(), 11, "eleven programs pinned: {pinned:?}");
    (pinned, links_of_programs(&progs).expect("listing links"))
}

#[test]
fn without_a_proxy_enrolled_pods_fail_closed_and_a_restart_readopts_the_pinned_state() {
    let bed = Bed::new("fail-closed");
    let node = bed.node("n1");
    let a = bed.pod(&node, "a");
    let b = bed.pod(&node, "b");
    let c = bed.pod(&node, "c"); // not enrolled: a plain client of b
    let mesh = bed.dir().join("mesh.yaml");
    write_mesh(
        &mesh,
        &Mesh::default()
            .namespace("demo", &[AMBIENT])
            .namespace("plain", &[])
            .pod(&a, "demo", &[])
            .pod(&b, "demo", &[])
            .pod(&c, "plain", &[])
            .yaml(),
    );
    let mut ambit = Ambit::start(&bed, &node, &mesh, &[]);
    let server = http_server(&bed, &b, "b\n");
    let url = format!("http://{}:8080/", b.ipv4);
    assert_eq!(curl_code(&a, &url, "2"), (0, "b\n".into()));
    let (pins_before, links_before) = program_and_link_ids(&ambit);
    // Ten cgroup links (connect, sendmsg, recvmsg and getpeername for each family, sock_ops;
    // the kubelet's) and one TC link per enrolled pod.
    assert_eq!(links_before.len(), CGROUP_LINKS + 2, "{links_before:?}");

    ambit.kill();
    let requests_before = server.output().matches("GET /").count();
    // Outbound from an enrolled pod: refused (not timed out), never sent around the proxy.
    assert_eq!(curl_code(&a, &url, "2").0, CURL_REFUSED);
    // Inbound to an enrolled pod: the SYN is dropped, so the client times out.
    assert_eq!(curl_code(&c, &url, "1").0, CURL_TIMEOUT);
    assert_eq!(server.output().matches("GET /").count(), requests_before, "a request reached b");

    ambit.restart();
    assert_eq!(curl_code(&a, &url, "2"), (0, "b\n".into()));
    assert_eq!(curl_code(&c, &url, "2"), (0, "b\n".into()));
    let (pins_after, links_after) = program_and_link_ids(&ambit);
    assert_eq!(pins_after, pins_before, "the same programs, maps and links, not new ones");
    assert_eq!(links_after, links_before, "no link was added or replaced");
    let log = ambit.log();
    assert!(log.contains(&format!("adopted_programs={PROGRAMS}")), "{log}");
    assert!(log.contains("attached_links=[]"), "{log}");
    let dump = ambit.config_dump();
    for pod in dump["pods"].as_array().expect("pods") {
        assert_eq!(pod["inbound_attachment"], "adopted", "{dump}");
    }
    // The kernel's counters live in the pinned map: they saw the refusals.
    assert_eq!(kernel(&ambit, "connect_fail_closed"), 1);
    assert!(kernel(&ambit, "inbound_fail_closed") >= 1, "SYN retransmits may add more");
}

#[test]
fn with_fail_open_enrolled_pods_bypass_the_missing_proxy() {
    let bed = Bed::new("fail-open");
    let (node, a, b, mesh) = enrolled_pair(&bed);
    let mut ambit = Ambit::start(&bed, &node, &mesh, &["--fail-open"]);
    let server = http_server(&bed, &b, "b\n");
    let url = format!("http://{}:8080/", b.ipv4);

    ambit.kill();
    assert_eq!(curl_code(&a, &url, "2"), (0, "b\n".into()), "fail-open lets the connection through");
    // Directly: the server saw a's address, not its own (as it does through the proxy).
    assert!(server.output().contains(&format!("::ffff:{} ", a.ipv4)), "{}", server.output());

    ambit.restart();
    assert_eq!(kernel(&ambit, "connect_fail_open"), 1);
    assert_eq!(kernel(&ambit, "inbound_fail_open"), 1);
    assert_eq!(curl_code(&a, &url, "2"), (0, "b\n".into()));
    assert_eq!(kernel(&ambit, "connect_captured"), 1, "captured again after the restart");
}

#[test]
fn a_restart_removes_the_state_of_pods_that_left_while_no_proxy_ran() {
    let bed = Bed::new("stale");
    let (node, a, b, mesh) = enrolled_pair(&bed);
    let mut ambit = Ambit::start(&bed, &node, &mesh, &[]);
    let (_, links_before) = program_and_link_ids(&ambit);
    assert_eq!(links_before.len(), CGROUP_LINKS + 2);
    assert_eq!(std::fs::read_dir(ambit.pin_dir().join("tc")).expect("tc pins").count(), 2);

    ambit.kill();
    // b leaves the mesh while no proxy runs.
    write_mesh(&mesh, &Mesh::default().namespace("demo", &[AMBIENT]).pod(&a, "demo", &[]).yaml());
    ambit.restart();
    let (_, links_after) = program_and_link_ids(&ambit);
    assert_eq!(links_after.len(), CGROUP_LINKS + 1, "b's inbound attachment is gone: {links_after:?}");
    assert_eq!(std::fs::read_dir(ambit.pin_dir().join("tc")).expect("tc pins").count(), 1);
    let log = ambit.log();
    assert!(log.contains("stale=StaleRemoved { enrolled: 1, pod_ips: 2, inbound_attachments: 1 }"), "{log}");
    // b is really released: a client in b connects out directly.
    let _server = http_server(&bed, &a, "a\n");
    assert_eq!(curl_code(&b, &format!("http://{}:8080/", a.ipv4), "2"), (0, "a\n".into()));
    assert_eq!(kernel(&ambit, "connect_not_enrolled"), 1);
}

#[test]
fn uninstall_removes_every_pin_and_capture_stops() {
    let bed = Bed::new("uninstall");
    let (node, a, b, mesh) = enrolled_pair(&bed);
    let mut ambit = Ambit::start(&bed, &node, &mesh, &[]);
    let (pinned, links) = program_and_link_ids(&ambit);
    let progs: Vec<u32> = pinned.iter().filter(|(n, _)| n.starts_with("prog_")).map(|(_, id)| *id).collect();
    assert_eq!(links.len(), CGROUP_LINKS + 2);
    ambit.kill();

    let bin = ambit_testbed::exec::workspace_bin("ambit");
    let bpffs = bed.bpffs().display().to_string();
    let out = run_with_timeout(
        ambit_testbed::exec::node_command(
            &node,
            &[bin.to_str().expect("utf-8"), "uninstall", "--bpffs", &bpffs, "--instance", "n1"],
        ),
        T,
    )
    .expect("uninstall runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!ambit.pin_dir().exists(), "pins left behind");
    assert_eq!(links_of_programs(&progs).expect("links"), Vec::<u32>::new(), "links still attached");
    // With nothing attached, a's connection goes straight to b (no fail-closed refusal).
    let _server = http_server(&bed, &b, "b\n");
    assert_eq!(curl_code(&a, &format!("http://{}:8080/", b.ipv4), "2"), (0, "b\n".into()));
}

/// Makes the pinned state look as if another ambit build had created it, by changing the
/// object hash in the pinned config map (bytes 16–19 of its 24).
fn pretend_another_build_pinned(ambit: &Ambit) {
    let map = ambit.pin_dir().join("AMBIT_CONFIG").display().to_string();
    let json = ambit_testbed::bed::sh(&[
        "bpftool", "-j", "map", "lookup", "pinned", &map, "key", "0", "0", "0", "0",
    ])
    .expect("reading the pinned config");
    let v: serde_json::Value = serde_json::from_str(&json).expect("bpftool JSON");
    let mut value: Vec<String> = v["value"]
        .as_array()
        .expect("value bytes")
        .iter()
        .map(|b| b.as_str().expect("hex byte").trim_start_matches("0x").to_string())
        .collect();
    assert_eq!(value.len(), 24);
    value[16] = "ff".into();
    let mut args =
        vec!["bpftool", "map", "update", "pinned", &map, "key", "0", "0", "0", "0", "value", "hex"];
    args.extend(value.iter().map(String::as_str));
    ambit_testbed::bed::sh(&args).expect("writing the pinned config");
}

#[test]
fn a_proxy_with_another_ebpf_object_replaces_the_pinned_programs_and_links() {
    let bed = Bed::new("upgrade");
    let (node, a, b, mesh) = enrolled_pair(&bed);
    let mut ambit = Ambit::start(&bed, &node, &mesh, &[]);
    let _server = http_server(&bed, &b, "b\n");
    let url = format!("http://{}:8080/", b.ipv4);
    let (pins_before, links_before) = program_and_link_ids(&ambit);
    let old_progs: Vec<u32> =
        pins_before.iter().filter(|(n, _)| n.starts_with("prog_")).map(|(_, id)| *id).collect();

    ambit.kill();
    pretend_another_build_pinned(&ambit);
    ambit.restart();
    let log = ambit.log();
    assert!(log.contains(&format!("loaded_programs={PROGRAMS}")), "{log}");
    let (pins_after, links_after) = program_and_link_ids(&ambit);
    let new_progs: Vec<u32> =
        pins_after.iter().filter(|(n, _)| n.starts_with("prog_")).map(|(_, id)| *id).collect();
    assert!(new_progs.iter().all(|p| !old_progs.contains(p)), "new programs: {old_progs:?} -> {new_progs:?}");
    // The old programs run nowhere any more; the new ones exactly where the old ones did.
    assert_eq!(links_of_programs(&old_progs).expect("links"), Vec::<u32>::new());
    assert_eq!(links_after.len(), links_before.len(), "{links_before:?} -> {links_after:?}");
    for pod in ambit.config_dump()["pods"].as_array().expect("pods") {
        assert_eq!(pod["inbound_attachment"], "replaced");
    }
    // Maps are kept (same IDs): the enrolment state carried over.
    let maps = |p: &[(String, u32)]| -> Vec<(String, u32)> {
        p.iter().filter(|(n, _)| n.starts_with("AMBIT_")).cloned().collect()
    };
    assert_eq!(maps(&pins_after), maps(&pins_before));
    assert_eq!(curl_code(&a, &url, "2"), (0, "b\n".into()));
    assert_eq!(kernel(&ambit, "connect_captured"), 1, "captured by the new programs");
}

#[test]
fn a_second_proxy_on_the_same_pinned_state_is_refused() {
    let bed = Bed::new("instance-lock");
    let (node, _a, _b, mesh) = enrolled_pair(&bed);
    let ambit = Ambit::start(&bed, &node, &mesh, &[]);
    // Another port set, so only the pinned state can conflict.
    let extra = [
        "--admin-addr",
        "127.0.0.1:16000",
        "--stats-addr",
        "0.0.0.0:16020",
        "--readiness-addr",
        "0.0.0.0:16021",
    ];
    let out = run_with_timeout(Ambit::command(&bed, &node, &mesh, &extra), T).expect("second ambit runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("another ambit node is running with the pinned state in"), "{stderr}");
    // Nor can the state be uninstalled under it.
    let bin = ambit_testbed::exec::workspace_bin("ambit");
    let bpffs = bed.bpffs().display().to_string();
    let argv = [bin.to_str().expect("utf-8"), "uninstall", "--bpffs", &bpffs, "--instance", "n1"];
    let out = run_with_timeout(ambit_testbed::exec::node_command(&node, &argv), T).expect("uninstall runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another ambit node is running"));
    // The first one is unaffected.
    assert!(ambit.pin_dir().join("AMBIT_CONFIG").exists());
    assert_eq!(ambit.config_dump()["pods"].as_array().map(Vec::len), Some(2));
}
