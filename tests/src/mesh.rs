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

/// A service entry: name, namespace, VIPs, (port, target port) pairs, selector.
#[derive(Clone, Debug)]
struct ServiceEntry {
    name: String,
    namespace: String,
    vips: Vec<String>,
    ports: Vec<(u16, u16)>,
    selector: Labels,
}

/// Namespaces, pods and services to write.
#[derive(Clone, Debug, Default)]
pub struct Mesh {
    namespaces: Vec<(String, Labels)>,
    pods: Vec<PodEntry>,
    services: Vec<ServiceEntry>,
    unhealthy: Vec<String>,
    /// Items of `policies:`, as YAML (Istio resources).
    policies: String,
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

    /// Adds a service: `ports` as (port, target port), endpoints chosen by `selector`.
    pub fn service(
        mut self,
        name: &str,
        namespace: &str,
        vips: &[&str],
        ports: &[(u16, u16)],
        selector: &[(&str, &str)],
    ) -> Self {
        self.services.push(ServiceEntry {
            name: name.into(),
            namespace: namespace.into(),
            vips: vips.iter().map(|v| v.to_string()).collect(),
            ports: ports.to_vec(),
            selector: own(selector),
        });
        self
    }

    /// Marks a listed pod unhealthy (it stops being a service endpoint).
    pub fn unhealthy(mut self, pod: &str) -> Self {
        self.unhealthy.push(pod.to_string());
        self
    }

    /// Sets the `policies:` section: YAML list items (Istio AuthorizationPolicy and
    /// PeerAuthentication resources), indented by two spaces.
    pub fn policies(mut self, yaml: &str) -> Self {
        self.policies = yaml.to_string();
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
            if self.unhealthy.contains(&pod.name) {
                writeln!(s, "    status: unhealthy").expect("string");
            }
            write_labels(&mut s, labels);
        }
        if !self.services.is_empty() {
            s.push_str("services:\n");
        }
        for svc in &self.services {
            writeln!(s, "  - name: {}", svc.name).expect("string");
            writeln!(s, "    namespace: {}", svc.namespace).expect("string");
            writeln!(s, "    addresses: [{}]", svc.vips.join(", ")).expect("string");
            s.push_str("    ports:\n");
            for (p, t) in &svc.ports {
                writeln!(s, "      - port: {p}\n        targetPort: {t}").expect("string");
            }
            s.push_str("    selector:\n");
            for (k, v) in &svc.selector {
                writeln!(s, "      {k}: {v}").expect("string");
            }
        }
        if !self.policies.is_empty() {
            s.push_str("policies:\n");
            s.push_str(&self.policies);
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
