//! A pod's Kubernetes side as the tests make it: its object as the API returns it
//! ([`pod_object`]), and its sandbox, a process in the pod's network namespace and in a
//! cgroup named as the kubelet names a pod's ([`sandbox`]).

use std::path::Path;

use serde_json::{json, Value};

/// A pod object as the API returns it: on `node`, with `ips`, a service account, labels,
/// Running and Ready (or not).
pub struct PodObject<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub service_account: &'a str,
    pub ips: Vec<String>,
    pub labels: Vec<(&'a str, &'a str)>,
    pub host_network: bool,
    pub ready: bool,
}

pub fn pod_object(p: &PodObject<'_>) -> Value {
    let labels: serde_json::Map<String, Value> =
        p.labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let pod_ips: Vec<Value> = p.ips.iter().map(|ip| json!({"ip": ip})).collect();
    let ready = if p.ready { "True" } else { "False" };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": labels,
            "creationTimestamp": "2026-11-23T00:00:00Z",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{}-rs", p.name), "uid": format!("rs-{}", p.uid), "controller": true}]
        },
        "spec": {
            "nodeName": p.node,
            "serviceAccountName": p.service_account,
            "hostNetwork": p.host_network,
            "containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst"
        },
        "status": {
            "phase": "Running",
            "podIP": p.ips.first(),
            "podIPs": pod_ips,
            "hostIP": "192.0.2.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": ready},
                {"type": "ContainersReady", "status": ready}
            ],
            "startTime": "2026-11-23T00:00:00Z"
        }
    })
}

/// How the kubelet names a pod's cgroup.
#[derive(Clone, Copy, Debug)]
pub enum CgroupDriver {
    /// `.../pod<uid>/...`
    Cgroupfs,
    /// `.../kubepods-pod<uid with '_' for '-'>.slice/...`
    Systemd,
}

/// The pod's sandbox: a long-lived process in `pod`'s network namespace, in a cgroup (under
/// the run's) named the way the kubelet names a pod's, so a node proxy can find the pod's
/// namespace from its UID. It ends with the bed (or when dropped).
pub fn sandbox<'b>(
    bed: &'b crate::Bed,
    pod: &crate::Pod,
    uid: &str,
    driver: CgroupDriver,
) -> crate::Proc<'b> {
    let argv = crate::exec::with_resolv_conf(pod, &["sleep", "3600"]);
    sandbox_with(bed, &pod.name, &pod.netns_path(), uid, driver, &argv)
}

/// [`sandbox`] in any network namespace (a node's: a host-network pod).
pub fn sandbox_in<'b>(
    bed: &'b crate::Bed,
    name: &str,
    netns: &Path,
    uid: &str,
    driver: CgroupDriver,
) -> crate::Proc<'b> {
    sandbox_with(bed, name, netns, uid, driver, &["sleep", "3600"])
}

fn sandbox_with<'b>(
    bed: &'b crate::Bed,
    name: &str,
    netns: &Path,
    uid: &str,
    driver: CgroupDriver,
    argv: &[&str],
) -> crate::Proc<'b> {
    let leaf = match driver {
        CgroupDriver::Cgroupfs => format!("pod{uid}"),
        CgroupDriver::Systemd => format!("kubepods-pod{}.slice", uid.replace('-', "_")),
    };
    let cgroup = bed.cgroup().join(leaf);
    std::fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", cgroup.display()));
    bed.state().cgroups.push(cgroup.clone());
    let cmd = crate::exec::in_cgroup_and_netns(&cgroup, netns, argv);
    crate::Proc::spawn(bed, &format!("sandbox-{name}"), cmd)
}
