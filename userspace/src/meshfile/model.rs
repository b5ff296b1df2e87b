//! The mesh file as written: serde types, with addresses kept as text so that a bad one is
//! reported with its position by the validator.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshFile {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Istio `AuthorizationPolicy` and `PeerAuthentication` resources.
    #[serde(default)]
    pub policies: Vec<super::policy::PolicyEntry>,
    /// Where mesh-wide policies live (Istio's root namespace).
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Kept as text so that a bad address is reported with its position.
    pub ips: Vec<String>,
    /// Network namespace: a path such as `/var/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
    /// Node the pod runs on. Absent: the pod is on the node reading the file.
    #[serde(default)]
    pub node: Option<String>,
    /// The pod's interface towards the node, inside its netns.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// Health as endpoints of services: `healthy` (default) or `unhealthy`.
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PodStatus {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Default: `<name>.<namespace>.svc.cluster.local`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Virtual IPs, kept as text.
    #[serde(default)]
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    /// Pods of the service's namespace whose labels include all of these are its endpoints.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// Default: `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl Default for MeshFile {
    fn default() -> Self {
        MeshFile {
            namespaces: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            policies: Vec::new(),
            root_namespace: default_root_namespace(),
        }
    }
}

pub fn default_root_namespace() -> String {
    "istio-system".into()
}

fn default_service_account() -> String {
    "default".into()
}

fn default_interface() -> String {
    "eth0".into()
}
