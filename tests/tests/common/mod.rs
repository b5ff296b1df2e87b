//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

pub mod istio;

use std::{path::PathBuf, process::Output, time::Duration};

#[allow(unused_imports)] // not every test binary uses both
pub use ambit_testbed::apps::{http_server, netprobe};
#[allow(unused_imports)]
pub use ambit_testbed::eventually;
use ambit_testbed::{
    ambit::{pinned_map_len, write_mesh},
    mesh::{Mesh, AMBIENT},
    pod_command, run_with_timeout, Ambit, Bed, Node, Pod,
};

pub const T: Duration = Duration::from_secs(20);

/// Map entries and listeners the proxy holds in the kernel: (enrolled netns cookies, pod
/// addresses, tc links, registered listeners).
pub fn kernel_state(p: &Ambit) -> (usize, usize, usize, u64) {
    let pins = p.pin_dir();
    let listeners = p.config_dump()["capture"]["registered_listeners"].as_u64().expect("listeners");
    (
        pinned_map_len(&pins.join("AMBIT_ENROLLED")).expect("enrolled map"),
        pinned_map_len(&pins.join("AMBIT_POD_IPS")).expect("pod ips map"),
        std::fs::read_dir(pins.join("tc")).map(|d| d.count()).unwrap_or(0),
        listeners,
    )
}

pub fn curl(pod: &Pod, url: &str) -> Output {
    run_with_timeout(pod_command(pod, &["curl", "-sS", "--max-time", "5", url]), T).expect("curl runs")
}

/// A node with two pods `a` and `b` in the enrolled namespace `demo`, and the mesh file
/// listing them (written); start the proxy with `Ambit::start(&bed, &node, &mesh, &[])`.
pub fn enrolled_pair(bed: &Bed) -> (Node, Pod, Pod, PathBuf) {
    let node = bed.node("n1");
    let a = bed.pod(&node, "a");
    let b = bed.pod(&node, "b");
    let mesh = bed.dir().join("mesh.yaml");
    write_mesh(
        &mesh,
        &Mesh::default().namespace("demo", &[AMBIENT]).pod(&a, "demo", &[]).pod(&b, "demo", &[]).yaml(),
    );
    (node, a, b, mesh)
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
    ambit.metric(&format!(r#"{name}{{direction="{direction}",namespace="{ns}",pod="{pod}"}}"#))
}

pub fn kernel(ambit: &Ambit, event: &str) -> u64 {
    ambit.metric(&format!(r#"ambit_capture_events_total{{event="{event}"}}"#))
}

/// Lines of the proxy's access log (target `access`) that contain every needle.
pub fn access_lines(ambit: &Ambit, needles: &[&str]) -> usize {
    ambit.log().lines().filter(|l| l.contains(" access: ") && needles.iter().all(|n| l.contains(n))).count()
}

/// Sums the samples of metric `name` whose labels include every `(key, value)` (in any order).
pub fn labelled(scrape: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let body = rest.strip_suffix('}')?;
            let all = labels
                .iter()
                .all(|(k, v)| body.split("\",").any(|kv| kv.trim_end_matches('"') == format!("{k}=\"{v}")));
            all.then(|| value.parse::<f64>().ok().map(|v| v as u64)).flatten()
        })
        .sum()
}

/// Nodes n1 and n2 linked, a control-plane namespace `cp` linked to both; pod a (service
/// account client) on n1 and pod b (server) on n2, both enrolled; the mesh file written.
pub struct AcrossNodes {
    pub n1: Node,
    pub n2: Node,
    pub cp: Node,
    pub a: Pod,
    pub b: Pod,
    pub mesh: PathBuf,
}

pub fn across_nodes(bed: &Bed) -> AcrossNodes {
    let n1 = bed.node("n1");
    let n2 = bed.node("n2");
    let cp = bed.node("cp");
    bed.link(&n1, &n2);
    bed.link(&cp, &n1);
    bed.link(&cp, &n2);
    let a = bed.pod(&n1, "a");
    let b = bed.pod(&n2, "b");
    let mesh = bed.dir().join("mesh.yaml");
    write_mesh(
        &mesh,
        &Mesh::default()
            .namespace("demo", &[AMBIENT])
            .pod_with_sa(&a, "demo", &[], "client")
            .pod_with_sa(&b, "demo", &[], "server")
            .yaml(),
    );
    AcrossNodes { n1, n2, cp, a, b, mesh }
}
