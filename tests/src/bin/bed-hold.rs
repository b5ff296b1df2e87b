//! Builds a small bed (a node, an enrolled pod, a running proxy), prints `READY <run id> <proxy pid>`,
//! then waits (at most 60 s) to be interrupted. The teardown tests use it to check that
//! Ctrl-C removes everything, and that the bed refuses to run without root.

use std::time::Duration;

use ambit_testbed::{ambit::write_mesh, mesh, Ambit, Bed};

fn main() {
    let bed = Bed::new("bed-hold");
    let node = bed.node("n1");
    let pod = bed.pod(&node, "a");
    let path = bed.dir().join("mesh.yaml");
    write_mesh(
        &path,
        &mesh::Mesh::default().namespace("demo", &[mesh::AMBIENT]).pod(&pod, "demo", &[]).yaml(),
    );
    let proxy = Ambit::start(&bed, &node, &path, &[]);
    println!("READY {} {}", bed.id(), proxy.proc.pid());
    std::thread::sleep(Duration::from_secs(60));
    eprintln!("bed-hold: not interrupted within 60 s; tearing down");
}
