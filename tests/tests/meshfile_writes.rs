//! A mesh file is read on every change, also while someone is still writing it. A half-written
//! file (valid YAML with fewer pods and no PeerAuthentication) must never be served, and a
//! complete change that removes STRICT mTLS or most of the mesh is held and loud.

mod common;

use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use ambit_testbed::{
    ambit::write_mesh,
    apps::http_server,
    controlplane::ControlPlane,
    mesh::{Mesh, AMBIENT},
    Bed,
};
use common::*;

const STRICT: &str = "  - apiVersion: security.istio.io/v1\n    kind: PeerAuthentication\n    metadata: {name: default, namespace: demo}\n    spec:\n      mtls:\n        mode: STRICT\n";

#[test]
fn a_half_written_mesh_file_is_never_served_and_a_shrinking_one_is_held_and_loud() {
    let bed = Bed::new("meshfile-writes");
    let t = across_nodes(&bed);
    let x = bed.pod(&t.n1, "x");
    let c = bed.pod(&t.n1, "c");
    let mesh = |extra_pod: bool, policies: &str| {
        let mut m = Mesh::default()
            .namespace("demo", &[AMBIENT])
            .namespace("plain", &[])
            .pod_with_sa(&t.a, "demo", &[], "client")
            .pod(&x, "plain", &[])
            .pod_with_sa(&t.b, "demo", &[("app", "web")], "server");
        if extra_pod {
            m = m.pod_with_sa(&c, "demo", &[], "client");
        }
        m.policies(policies).yaml()
    };
    write_mesh(&t.mesh, &mesh(false, STRICT));
    let cp = ControlPlane::start(&bed, &t.cp, &t.mesh, &[&t.n1, &t.n2], &[]);
    let _p1 = cp.start_node(&t.n1, &t.mesh, &[]);
    let p2 = cp.start_node(&t.n2, &t.mesh, &[]);
    let server = http_server(&bed, &t.b, "b\n");
    let url = format!("http://{}:8080/", t.b.ipv4);
    let refused = || !curl(&x, &url).status.success();
    assert!(refused(), "STRICT: plaintext from x must be refused");
    assert!(curl(&t.a, &url).status.success());

    // Rewritten in place, slowly: the first part alone is valid YAML without b and without
    // the PeerAuthentication. While the writer pauses, nothing of it may take effect.
    let full = mesh(true, STRICT);
    let cut = full.find("  - name: b\n").expect("b's entry");
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&t.mesh).expect("mesh file");
    f.write_all(&full.as_bytes()[..cut]).expect("first part");
    f.flush().expect("flush");
    let paused = Instant::now();
    let mut breaches = 0;
    while paused.elapsed() < Duration::from_millis(700) {
        if !refused() {
            breaches += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f.write_all(&full.as_bytes()[cut..]).expect("the rest");
    drop(f);
    assert_eq!(breaches, 0, "plaintext reached b while the mesh file was half written");
    assert!(!server.output().contains(&format!("::ffff:{} ", x.ipv4)), "b's application saw x");
    // The complete version does apply: c appears, STRICT holds.
    let has_c = || {
        p2.config_dump()["mesh"]["workloads"].as_array().is_some_and(|w| w.iter().any(|w| w["name"] == "c"))
    };
    assert!(
        eventually(Duration::from_secs(10), has_c),
        "the complete file was not applied:\n{}",
        cp.proc.output()
    );
    assert!(refused());
    // The control plane never took the partial version (a and x only).
    assert!(
        !cp.proc.output().lines().any(|l| l.contains("mesh file reloaded") && l.contains("pods=2")),
        "{}",
        cp.proc.output()
    );
    assert!(!p2.log().contains("pod unenrolled"), "b was unenrolled:\n{}", p2.log());

    // A complete change that drops STRICT: held, loudly, for its hold, then applied.
    write_mesh(&t.mesh, &mesh(true, ""));
    let held = "mesh file change held";
    assert!(eventually(Duration::from_secs(5), || cp.proc.output().contains(held)), "{}", cp.proc.output());
    assert!(cp.proc.output().contains("STRICT mTLS of demo/default"), "{}", cp.proc.output());
    assert!(refused(), "STRICT dropped before its hold");
    let applied = "mesh file change applied after its hold";
    assert!(
        eventually(Duration::from_secs(15), || cp.proc.output().contains(applied)),
        "{}",
        cp.proc.output()
    );
    assert!(cp.proc.output().lines().any(|l| l.contains(applied) && l.contains("ERROR")), "not loud");
    assert!(eventually(T, || !refused()), "PERMISSIVE again after the hold");
}
