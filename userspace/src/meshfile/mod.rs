//! The mesh file: namespaces (with labels) and pods, in YAML.
//!
//! `ambit node --mesh-file` reads it as its offline source of pods (no control plane); the
//! format is documented in `docs/mesh-file.md`. Every error names the file, line, column and
//! field, and a file with any error is refused as a whole.

pub mod locate;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub use locate::{FieldPath, Location};

/// Label that enrols a namespace (value `ambient`) or opts a pod out (value `none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshFile {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
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
}

fn default_service_account() -> String {
    "default".into()
}

fn default_interface() -> String {
    "eth0".into()
}

/// A mesh file that parsed and validated: the pods with their addresses parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mesh {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: Vec<PodSpec>,
}

/// A pod as the rest of ambit uses it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub netns: PathBuf,
    pub node: Option<String>,
    pub interface: String,
}

impl PodSpec {
    /// `namespace/name`, unique in a mesh.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `other` can keep this pod's capture as it is: same netns, addresses, interface
    /// and identity (service account). Only label changes apply in place.
    pub fn same_capture(&self, other: &PodSpec) -> bool {
        self.netns == other.netns
            && self.ips == other.ips
            && self.interface == other.interface
            && self.service_account == other.service_account
    }
}

impl Mesh {
    /// Whether the pod is enrolled in the mesh, with Istio's rules: its namespace carries
    /// `istio.io/dataplane-mode=ambient` (or the pod itself does), and the pod does not opt
    /// out with `istio.io/dataplane-mode=none`.
    pub fn is_enrolled(&self, pod: &PodSpec) -> bool {
        match pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
            Some(DATAPLANE_MODE_NONE) => false,
            Some(DATAPLANE_MODE_AMBIENT) => true,
            _ => self
                .namespaces
                .get(&pod.namespace)
                .and_then(|ns| ns.labels.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|v| v == DATAPLANE_MODE_AMBIENT),
        }
    }

    /// Pods on `node` (pods without a node are on every reader's node).
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a PodSpec> + 'a {
        self.pods.iter().filter(move |p| p.node.as_deref().is_none_or(|n| n == node))
    }
}

/// What a mesh file is checked against besides itself.
pub struct Checks<'a> {
    /// The reading node: the network namespaces of its pods must exist. `None` (the control
    /// plane) checks no network namespace.
    pub node: Option<&'a str>,
}

/// A refused mesh file: where, which field, what is wrong.
#[derive(Debug, thiserror::Error)]
pub struct MeshFileError {
    pub file: PathBuf,
    pub location: Option<Location>,
    /// Empty for errors about the whole file (unreadable, not YAML).
    pub field: String,
    pub message: String,
}

impl fmt::Display for MeshFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.location {
            write!(f, ":{}:{}", l.line, l.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Reads, parses and validates a mesh file.
pub fn load(path: &Path, checks: &Checks<'_>) -> Result<Mesh, MeshFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| MeshFileError {
        file: path.to_path_buf(),
        location: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(path, &text, checks)
}

/// Parses and validates mesh file text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str, checks: &Checks<'_>) -> Result<Mesh, MeshFileError> {
    let file: MeshFile = if text.trim().is_empty() {
        MeshFile::default()
    } else {
        serde_norway::from_str(text).map_err(|e| serde_error(path, &e))?
    };
    Validator { path, text, checks }.validate(file)
}

fn serde_error(path: &Path, e: &serde_norway::Error) -> MeshFileError {
    // serde_norway renders "pods[1]: unknown field `x`, expected ... at line 9 column 5";
    // split the field path off the front so every error reads the same way.
    let full = e.to_string();
    let without_loc = match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full.clone(),
    };
    let (field, message) = match without_loc.split_once(": ") {
        Some((f, m)) if !f.contains(' ') => (f.to_string(), m.to_string()),
        _ => (String::new(), without_loc),
    };
    MeshFileError {
        file: path.to_path_buf(),
        location: e.location().map(|l| Location { line: l.line(), column: l.column() }),
        field,
        message,
    }
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
    checks: &'a Checks<'a>,
}

impl Validator<'_> {
    fn err(&self, field: FieldPath, message: impl Into<String>) -> MeshFileError {
        MeshFileError {
            file: self.path.to_path_buf(),
            location: locate::locate_nearest(self.text, &field),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn validate(&self, file: MeshFile) -> Result<Mesh, MeshFileError> {
        let mut mesh = Mesh::default();
        for (i, ns) in file.namespaces.into_iter().enumerate() {
            let at = FieldPath::default().key("namespaces").index(i);
            check_dns_label(&ns.name).map_err(|m| self.err(at.clone().key("name"), m))?;
            self.check_labels(&ns.labels, at.clone().key("labels"))?;
            if mesh.namespaces.contains_key(&ns.name) {
                return Err(self.err(at.key("name"), format!("namespace {:?} is declared twice", ns.name)));
            }
            mesh.namespaces.insert(ns.name.clone(), ns);
        }

        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut by_ip: HashMap<IpAddr, usize> = HashMap::new();
        for (i, pod) in file.pods.into_iter().enumerate() {
            let at = FieldPath::default().key("pods").index(i);
            check_dns_subdomain(&pod.name).map_err(|m| self.err(at.clone().key("name"), m))?;
            if !mesh.namespaces.contains_key(&pod.namespace) {
                return Err(self.err(
                    at.key("namespace"),
                    format!("namespace {:?} is not declared under `namespaces`", pod.namespace),
                ));
            }
            self.check_labels(&pod.labels, at.clone().key("labels"))?;
            check_dns_subdomain(&pod.service_account)
                .map_err(|m| self.err(at.clone().key("serviceAccount"), m))?;
            let key = format!("{}/{}", pod.namespace, pod.name);
            if let Some(first) = by_key.insert(key.clone(), i) {
                return Err(self
                    .err(at.key("name"), format!("duplicate pod {key} (first declared as pods[{first}])")));
            }
            if pod.ips.is_empty() {
                return Err(self.err(at.key("ips"), "a pod needs at least one IP address"));
            }
            let mut ips = Vec::with_capacity(pod.ips.len());
            for (j, text) in pod.ips.iter().enumerate() {
                let ip_at = at.clone().key("ips").index(j);
                let ip: IpAddr = text.parse().map_err(|_| {
                    self.err(ip_at.clone(), format!("{text:?} is not an IPv4 or IPv6 address"))
                })?;
                if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                    return Err(self.err(ip_at, format!("{ip} cannot be a pod address")));
                }
                if let Some(other) = by_ip.insert(ip, i) {
                    return Err(self.err(ip_at, format!("{ip} is already the address of pods[{other}]")));
                }
                ips.push(ip);
            }
            if pod.interface.is_empty() || pod.interface.len() > 15 || pod.interface.contains('/') {
                return Err(
                    self.err(at.key("interface"), format!("{:?} is not an interface name", pod.interface))
                );
            }
            let local = self.checks.node.is_some_and(|me| pod.node.as_deref().is_none_or(|n| n == me));
            if local {
                check_netns(&pod.netns).map_err(|m| self.err(at.clone().key("netns"), m))?;
            }
            mesh.pods.push(PodSpec {
                name: pod.name,
                namespace: pod.namespace,
                labels: pod.labels,
                service_account: pod.service_account,
                ips,
                netns: pod.netns,
                node: pod.node,
                interface: pod.interface,
            });
        }
        Ok(mesh)
    }

    fn check_labels(&self, labels: &BTreeMap<String, String>, at: FieldPath) -> Result<(), MeshFileError> {
        for (k, v) in labels {
            let ok_key = !k.is_empty() && k.len() <= 317 && !k.chars().any(char::is_whitespace);
            if !ok_key || v.len() > 63 || v.chars().any(char::is_whitespace) {
                return Err(self.err(at.clone().key(k), format!("invalid label {k:?}: {v:?}")));
            }
        }
        Ok(())
    }
}

/// RFC 1123 label, as Kubernetes requires of namespace names.
fn check_dns_label(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid name (lowercase letters, digits and '-', at most 63)"))
    }
}

/// RFC 1123 subdomain, as Kubernetes requires of pod and service account names.
fn check_dns_subdomain(name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name.len() <= 253 && name.split('.').all(|l| check_dns_label(l).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid name (lowercase letters, digits, '-' and '.')"))
    }
}

/// The path must name a network namespace that exists now.
fn check_netns(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    match crate::inpod::netns::is_network_namespace(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("{} is not a network namespace", path.display())),
        Err(e) => {
            Err(format!("network namespace {} does not exist or cannot be opened: {e}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests;
