//! A cluster as Istio users run one, in the bed: the real API server (`realkube`), the real
//! istiod (`istiod`), ambit's own manifests (`daemonset/istiod`) applied to the API server,
//! Node objects, and on each node an `ambit node` started exactly as the DaemonSet would run
//! it: its Pod object, its service account's tokens (bound to that Pod: `istio-ca` audience
//! for istiod, the API server's for the pod watch, so its RBAC is the manifests'), the
//! downward-API environment, the pod source `kubernetes`.
//!
//! Workload pods are API objects (created with kubectl, their status set as a kubelet
//! would) whose network namespaces and processes are the bed's pods, a process of each in a
//! kubelet-style cgroup carrying the pod's UID.

use std::path::PathBuf;

use anyhow::Context;

use crate::{
    ambit::Ambit,
    bed::{Bed, Node, Pod},
    exec::Proc,
    istiod::{Istiod, SERVING_NAME},
    pods::{sandbox, CgroupDriver},
    realkube::Kube,
};

/// The namespace and service account `daemonset/istiod` installs ambit with.
pub const AMBIT_NAMESPACE: &str = "istio-system";
pub const AMBIT_SA: &str = "ambit";

/// `ns/sa` of ambit, for istiod's `CA_TRUSTED_NODE_ACCOUNTS`.
pub fn trusted_account() -> String {
    format!("{AMBIT_NAMESPACE}/{AMBIT_SA}")
}

/// The repository's `daemonset/istiod`, rendered by kubectl's kustomize and applied
/// server-side to the API server.
pub fn apply_manifests(kube: &Kube<'_>) -> anyhow::Result<()> {
    // Istio's install creates the namespace; the manifests install into it.
    namespace(kube, AMBIT_NAMESPACE, &[])?;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../daemonset/istiod");
    let rendered = kube.kubectl(&["kustomize", dir.to_str().context("utf-8")?])?;
    kube.apply(&rendered).context("applying daemonset/istiod")?;
    Ok(())
}

/// A Node object for a bed node (its InternalIP: the bridge address), Ready.
pub fn node_object(kube: &Kube<'_>, node: &Node) -> anyhow::Result<()> {
    kube.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    kubernetes.io/hostname: {}\n    kubernetes.io/os: linux\n",
        node.name, node.name
    ))?;
    let patch = format!(
        "{{\"status\":{{\"addresses\":[{{\"type\":\"InternalIP\",\"address\":\"{}\"}}],\"conditions\":[{{\"type\":\"Ready\",\"status\":\"True\",\"lastHeartbeatTime\":\"2026-01-01T00:00:00Z\",\"lastTransitionTime\":\"2026-01-01T00:00:00Z\"}}]}}}}",
        node.bridge_ipv4()
    );
    kube.kubectl(&["patch", "node", &node.name, "--subresource=status", "--type=merge", "-p", &patch])?;
    Ok(())
}

/// Starts `ambit node` on `node` as the DaemonSet runs it, against `istiod`; waits until
/// ready. `extra`: more flags.
pub fn start_ambit<'b>(
    bed: &'b Bed,
    kube: &Kube<'_>,
    istiod: &Istiod<'_>,
    node: &Node,
    extra: &[&str],
) -> anyhow::Result<Ambit<'b>> {
    start_daemonset_pod(bed, kube, Some(istiod), node, extra)
}

/// [`start_ambit`] with no control plane: pods from the API, captured, relayed without mTLS.
pub fn start_ambit_alone<'b>(
    bed: &'b Bed,
    kube: &Kube<'_>,
    node: &Node,
    extra: &[&str],
) -> anyhow::Result<Ambit<'b>> {
    start_daemonset_pod(bed, kube, None, node, extra)
}

fn start_daemonset_pod<'b>(
    bed: &'b Bed,
    kube: &Kube<'_>,
    istiod: Option<&Istiod<'_>>,
    node: &Node,
    extra: &[&str],
) -> anyhow::Result<Ambit<'b>> {
    let pod = format!("ambit-{}", node.name);
    kube.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {AMBIT_NAMESPACE}\n  labels:\n    app.kubernetes.io/name: ambit\nspec:\n  nodeName: {}\n  serviceAccountName: {AMBIT_SA}\n  hostNetwork: true\n  containers:\n  - name: ambit\n    image: ambit\n",
        node.name
    ))?;
    let ip = node.bridge_ipv4();
    kube.set_pod_status(AMBIT_NAMESPACE, &pod, ip, &[ip], true)?;
    let dir = bed.dir().join(format!("ambit-{}", node.name));
    std::fs::create_dir_all(&dir)?;
    // A token for the API server, where the manifests' RBAC applies.
    let kubeconfig = dir.join("kubeconfig");
    kube.token_kubeconfig(&kubeconfig, &kube.token(AMBIT_NAMESPACE, AMBIT_SA, None, Some(&pod))?)?;
    let s = |p: &std::path::Path| p.display().to_string();
    let mut flags: Vec<String> = Vec::new();
    if let Some(istiod) = istiod {
        // The projected token istiod authenticates (bound to this Pod: its node authorizer
        // reads the pod from it).
        let istio_token = dir.join("istio-token");
        std::fs::write(&istio_token, kube.token(AMBIT_NAMESPACE, AMBIT_SA, Some("istio-ca"), Some(&pod))?)?;
        flags.extend(
            [
                "--xds-address",
                &istiod.address,
                "--ca-address",
                &istiod.address,
                "--root-cert",
                &s(&istiod.root_cert),
                "--token-file",
                &s(&istio_token),
                "--control-plane-name",
                SERVING_NAME,
            ]
            .iter()
            .map(|x| x.to_string()),
        );
    }
    flags.extend(extra.iter().map(|x| x.to_string()));
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let args = Ambit::kube_args(bed, node, &kubeconfig, &flag_refs);
    let env = vec![
        ("POD_NAME".to_string(), pod),
        ("POD_NAMESPACE".to_string(), AMBIT_NAMESPACE.to_string()),
        ("POD_IP".to_string(), ip.to_string()),
    ];
    Ok(Ambit::start_with_env(bed, node, &kubeconfig, args, env))
}

/// A workload pod in the API, backed by the bed pod `pod`: its Pod object (labels, service
/// account, node), a process in a kubelet-style cgroup with its UID, and its status set
/// Running with the bed pod's addresses, Ready as asked.
pub struct Workload<'b> {
    pub pod: Pod,
    pub namespace: String,
    pub uid: String,
    pub sandbox: Proc<'b>,
}

/// What a workload pod's object says.
pub struct Spec<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub ready: bool,
}

pub fn workload<'b>(
    bed: &'b Bed,
    kube: &Kube<'_>,
    node: &Node,
    pod: &Pod,
    spec: &Spec<'_>,
) -> anyhow::Result<Workload<'b>> {
    let (namespace, sa) = (spec.namespace, spec.service_account);
    let mut yaml = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {namespace}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {namespace}\n  labels:\n",
        pod.name
    );
    for (k, v) in spec.labels.iter().chain(&[("bed-pod", pod.name.as_str())]) {
        yaml.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    yaml.push_str(&format!(
        "spec:\n  nodeName: {}\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    image: app\n",
        pod.node
    ));
    kube.apply(&yaml)?;
    let uid = kube.get("pod", namespace, &pod.name, "{.metadata.uid}")?;
    let sandbox = sandbox(bed, pod, &uid, CgroupDriver::Cgroupfs);
    kube.set_pod_status(namespace, &pod.name, node.bridge_ipv4(), &[pod.ipv4, pod.ipv6], spec.ready)?;
    Ok(Workload { pod: pod.clone(), namespace: namespace.to_string(), uid, sandbox })
}

/// A namespace, with labels.
pub fn namespace(kube: &Kube<'_>, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n");
    for (k, v) in labels.iter().chain(&[("kubernetes.io/metadata.name", name)]) {
        yaml.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    kube.apply(&yaml).map(|_| ())
}
