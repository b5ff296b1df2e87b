//! Writing the mesh file the node proxy reads (`docs/mesh-file.md`).

use std::fmt::Write as _;

use crate::bed::Pod;

type Labels = Vec<(String, String)>;

/// A pod entry: the bed's pod, its namespace, labels and service account.
#[derive(Clone, Debug)]
struct PodEntry {
    pod: Pod,
    namespace: String,
    labels: Labels,
    service_account: String,
}

/// Namespaces and pods to write.
#[derive(Clone, Debug, Default)]
pub struct Mesh {
    namespaces: Vec<(String, Labels)>,
    pods: Vec<PodEntry>,
}

pub const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
pub const OPT_OUT: (&str, &str) = ("istio.io/dataplane-mode", "none");

impl Mesh {
    pub fn namespace(mut self, name: &str, labels: &[(&str, &str)]) -> Self {
        self.namespaces.push((name.into(), own(labels)));
        self
    }

    pub fn pod(self, pod: &Pod, namespace: &str, labels: &[(&str, &str)]) -> Self {
        self.pod_with_sa(pod, namespace, labels, "default")
    }

    pub fn pod_with_sa(mut self, pod: &Pod, namespace: &str, labels: &[(&str, &str)], sa: &str) -> Self {
        self.pods.push(PodEntry {
            pod: pod.clone(),
            namespace: namespace.into(),
            labels: own(labels),
            service_account: sa.into(),
        });
        self
    }

    /// Sets the labels of an already listed namespace.
    pub fn relabel_namespace(mut self, name: &str, labels: &[(&str, &str)]) -> Self {
        for ns in &mut self.namespaces {
            if ns.0 == name {
                ns.1 = own(labels);
            }
        }
        self
    }

    pub fn yaml(&self) -> String {
        let mut s = String::from("namespaces:\n");
        for (name, labels) in &self.namespaces {
            writeln!(s, "  - name: {name}").expect("string");
            write_labels(&mut s, labels);
        }
        s.push_str("pods:\n");
        for PodEntry { pod, namespace: ns, labels, service_account: sa } in &self.pods {
            writeln!(s, "  - name: {}", pod.name).expect("string");
            writeln!(s, "    namespace: {ns}").expect("string");
            writeln!(s, "    serviceAccount: {sa}").expect("string");
            writeln!(s, "    node: {}", pod.node).expect("string");
            writeln!(s, "    ips: [{}, {}]", pod.ipv4, pod.ipv6).expect("string");
            writeln!(s, "    netns: {}", pod.netns_path().display()).expect("string");
            write_labels(&mut s, labels);
        }
        s
    }
}

fn own(labels: &[(&str, &str)]) -> Labels {
    labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn write_labels(s: &mut String, labels: &Labels) {
    if labels.is_empty() {
        return;
    }
    s.push_str("    labels:\n");
    for (k, v) in labels {
        writeln!(s, "      {k}: {v}").expect("string");
    }
}
