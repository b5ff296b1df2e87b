//! The real Kubernetes and Istio components the integration tests run against: which
//! versions, and where their binaries are. `cargo xtask setup` builds them from their Go
//! modules (see xtask's `gotools`) into a cache kept by version, outside the checkout, so a
//! fresh clone on the same machine reuses them.

use std::path::PathBuf;

/// `k8s.io/kubernetes`: kube-apiserver and kubectl, and the etcd it requires.
pub const KUBERNETES: &str = "v1.37.2";
/// `istio.io/istio` (pilot-discovery, the CRDs). The module proxy serves Istio only as
/// pseudo-versions (its tags have no `v`): this is master of 2026-08-27, Istio 1.31-dev.
pub const ISTIO: &str = "v0.0.0-20260827124520-eed52ebb66ad";
/// The Istio release the pinned snapshot is on its way to (what it reports as its version).
pub const ISTIO_RELEASE: &str = "1.31-dev";

/// `github.com/containernetworking/plugins`: the reference plugins a pod's sandbox is set up
/// with (`bridge`, `host-local`, `loopback`).
pub const CNI_PLUGINS: &str = "v1.10.0";
/// `github.com/containernetworking/cni`: `cnitool`, which runs a network configuration's
/// plugins against a network namespace as a container runtime does (through libcni).
pub const CNI: &str = "v1.3.1";

/// `helm.sh/helm/v4`: renders and lints ambit's chart as users install it.
pub const HELM: &str = "v4.3.2";

/// The cache of built tools: `$AMBIT_TOOLS_CACHE`, else `/var/cache/ambit-tools`.
pub fn cache() -> PathBuf {
    std::env::var_os("AMBIT_TOOLS_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/ambit-tools"), PathBuf::from)
}

/// The directory of one pinned set (complete once it holds `.complete`).
pub fn kubernetes_dir() -> PathBuf {
    cache().join(format!("kubernetes-{KUBERNETES}"))
}

pub fn istio_dir() -> PathBuf {
    cache().join(format!("istio-{ISTIO}"))
}

pub fn cni_dir() -> PathBuf {
    cache().join(format!("cni-{CNI_PLUGINS}-{CNI}"))
}

/// The tools users point at a cluster: istioctl (from the pinned Istio module) and helm.
pub fn clients_dir() -> PathBuf {
    cache().join(format!("clients-{ISTIO}-helm-{HELM}"))
}

/// A built binary or file of the pinned sets; fails the test with the setup hint if missing.
fn tool(dir: PathBuf, name: &str) -> PathBuf {
    let p = dir.join(name);
    assert!(
        dir.join(".complete").exists() && p.exists(),
        "{} is not built: `cargo xtask setup` (or `cargo xtask test`) builds it from its Go module",
        p.display()
    );
    p
}

pub fn kube_apiserver() -> PathBuf {
    tool(kubernetes_dir(), "kube-apiserver")
}

pub fn kubectl() -> PathBuf {
    tool(kubernetes_dir(), "kubectl")
}

pub fn etcd() -> PathBuf {
    tool(kubernetes_dir(), "etcd")
}

pub fn pilot_discovery() -> PathBuf {
    tool(istio_dir(), "pilot-discovery")
}

/// Istio's CRDs, from the same module as pilot-discovery.
pub fn istio_crds() -> PathBuf {
    tool(istio_dir(), "crd-all.gen.yaml")
}

/// The directory of the reference CNI plugins (a CNI bin dir).
pub fn cni_plugins() -> PathBuf {
    tool(cni_dir(), "bridge");
    cni_dir()
}

pub fn cnitool() -> PathBuf {
    tool(cni_dir(), "cnitool")
}

pub fn istioctl() -> PathBuf {
    tool(clients_dir(), "istioctl")
}

pub fn helm() -> PathBuf {
    tool(clients_dir(), "helm")
}
