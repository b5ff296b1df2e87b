//! The mesh file: namespaces (with labels), pods, services and policies, in YAML.
//!
//! `ambit controlplane` serves it over xDS; `ambit node` reads its own pods from it, and
//! everything else too when no control plane is used. The format is documented in
//! `docs/mesh-file.md`. Every error names the file, line, column and field, and a file with any
//! error is refused as a whole.

pub mod locate;
mod model;
pub mod policy;
mod validate;

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

pub use locate::{FieldPath, Location};
pub use model::Namespace;

/// Label that enrols a namespace (value `ambient`) or opts a pod out (value `none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";

/// A mesh file that parsed and validated: the pods with their addresses parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mesh {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    pub authorization_policies: Vec<policy::AuthorizationPolicySpec>,
    pub peer_authentications: Vec<policy::PeerAuthenticationSpec>,
    /// Policies here without a selector apply to the whole mesh.
    pub root_namespace: String,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            namespaces: BTreeMap::new(),
            pods: Vec::new(),
            services: Vec::new(),
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
            root_namespace: model::default_root_namespace(),
        }
    }
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
    /// Whether it receives traffic as a service endpoint.
    pub healthy: bool,
}

/// A service: virtual IPs and ports, and a label selector choosing its endpoints among the
/// pods of its namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServicePortSpec {
    pub port: u16,
    pub target_port: u16,
}

impl ServiceSpec {
    /// `<namespace>/<hostname>`: the xDS resource name and the key in workloads' service maps.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// Whether `pod` is one of its endpoints.
    pub fn selects(&self, pod: &PodSpec) -> bool {
        pod.namespace == self.namespace
            && !self.selector.is_empty()
            && self.selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

/// The canonical service of a workload, as Istio derives it from the pod's labels (what
/// Kiali and the dashboards group by): `service.istio.io/canonical-name`, then
/// `app.kubernetes.io/name`, then `app`, then the workload's name. A label that is present
/// wins even when empty, as in istiod (the metrics then say `unknown`).
pub fn canonical_name<'a>(labels: &'a BTreeMap<String, String>, workload: &'a str) -> &'a str {
    ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| labels.get(*k))
        .map_or(workload, String::as_str)
}

/// The canonical revision: `service.istio.io/canonical-revision`, then
/// `app.kubernetes.io/version`, then `version`, then `latest`.
pub fn canonical_revision(labels: &BTreeMap<String, String>) -> &str {
    ["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]
        .iter()
        .find_map(|k| labels.get(*k))
        .map_or("latest", String::as_str)
}

impl PodSpec {
    /// The pod's canonical service (see [`canonical_name`]); its workload is the pod.
    pub fn canonical_name(&self) -> &str {
        canonical_name(&self.labels, &self.name)
    }

    /// The pod's canonical revision (see [`canonical_revision`]).
    pub fn canonical_revision(&self) -> &str {
        canonical_revision(&self.labels)
    }

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
    /// Whether the pod is enrolled in the mesh, with Istio's rules (see [`Enrolment`]).
    pub fn is_enrolled(&self, pod: &PodSpec) -> bool {
        Enrolment::default().is_enrolled(self, pod)
    }

    /// Pods on `node` (pods without a node are on every reader's node).
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a PodSpec> + 'a {
        self.pods.iter().filter(move |p| p.node.as_deref().is_none_or(|n| n == node))
    }
}

/// A label as `key=value` (and so in the config dump).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub key: String,
    pub value: String,
}

impl std::str::FromStr for Label {
    type Err = BadValue;

    fn from_str(s: &str) -> Result<Label, BadValue> {
        match s.split_once('=') {
            Some((k, v))
                if !k.is_empty() && !k.contains(char::is_whitespace) && !v.contains(char::is_whitespace) =>
            {
                Ok(Label { key: k.to_string(), value: v.to_string() })
            }
            _ => Err(BadValue::NotALabel(s.to_string())),
        }
    }
}

impl serde::Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// Which labels enrol pods and opt them out. Istio's by default: a namespace (or pod)
/// labelled `istio.io/dataplane-mode=ambient` is enrolled, a pod labelled
/// `istio.io/dataplane-mode=none` never is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Enrolment {
    pub enrol: Label,
    pub opt_out: Label,
}

impl Default for Enrolment {
    fn default() -> Self {
        Enrolment {
            enrol: Label { key: DATAPLANE_MODE_LABEL.into(), value: DATAPLANE_MODE_AMBIENT.into() },
            opt_out: Label { key: DATAPLANE_MODE_LABEL.into(), value: DATAPLANE_MODE_NONE.into() },
        }
    }
}

impl Enrolment {
    /// The pod's own labels first (opt-out, then enrol), then its namespace's.
    pub fn is_enrolled(&self, mesh: &Mesh, pod: &PodSpec) -> bool {
        let has = |labels: &BTreeMap<String, String>, l: &Label| labels.get(&l.key) == Some(&l.value);
        if has(&pod.labels, &self.opt_out) {
            return false;
        }
        has(&pod.labels, &self.enrol)
            || mesh.namespaces.get(&pod.namespace).is_some_and(|ns| has(&ns.labels, &self.enrol))
    }
}

/// What a mesh file is checked against besides itself.
pub struct Checks<'a> {
    /// The reading node: the network namespaces of its pods must exist. `None` (the control
    /// plane) checks no network namespace.
    pub node: Option<&'a str>,
}

/// A value its field cannot take. The message of a [`MeshFileError`], which says where; the
/// whole error of a flag or a CNI setting.
#[derive(Debug, thiserror::Error)]
pub enum BadValue {
    #[error("{0:?}: '*' may only stand alone, or begin or end a value")]
    Pattern(String),
    #[error("{0:?} is not an IP address or CIDR block")]
    NotAnIpBlock(String),
    #[error("{block:?}: the prefix length must be 0 to {max}")]
    PrefixLength { block: String, max: u8 },
    /// The value as written (a YAML number or string).
    #[error("{0} is not a port (1 to 65535)")]
    NotAPort(String),
    #[error("{0:?} is not <namespace>/<service account>")]
    NotAServiceAccount(String),
    #[error("{0:?} is not a valid name (lowercase letters, digits and '-', at most 63)")]
    NotADnsLabel(String),
    #[error("{0:?} is not a valid name (lowercase letters, digits, '-' and '.')")]
    NotADnsSubdomain(String),
    #[error("{0:?}: expected key=value")]
    NotALabel(String),
    #[error("{} is not an absolute path", .0.display())]
    RelativePath(PathBuf),
    #[error("{} is not a network namespace", .0.display())]
    NotANetns(PathBuf),
    #[error("network namespace {} does not exist or cannot be opened: {source}", .path.display())]
    NoNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// The largest mesh file read: a hundred thousand pods fit in well under this.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// The deepest nesting of flow collections (`[...]`, `{...}`) accepted. A mesh file needs
/// three or four; the YAML parsers spend time quadratic in the depth (20,000 levels took
/// seconds, 100,000 over a minute), so deeper text is refused before it is parsed.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Reads, parses and validates a mesh file.
pub fn load(path: &Path, checks: &Checks<'_>) -> Result<Mesh, MeshFileError> {
    let error = |message: String| MeshFileError {
        file: path.to_path_buf(),
        location: None,
        field: String::new(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| error(format!("cannot read: {e}")))?;
    let mut text = String::new();
    // One byte past the limit tells "too large" from "exactly at it".
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_FILE_BYTES + 1), &mut text)
        .map_err(|e| error(format!("cannot read: {e}")))?;
    parse(path, &text, checks)
}

/// Refuses text the parsers would spend too long on: larger than [`MAX_FILE_BYTES`], or
/// flow collections nested deeper than [`MAX_FLOW_DEPTH`] (counted outside quotes and
/// comments, where a `[` or `{` opens a collection).
fn check_bounds(path: &Path, text: &str) -> Result<(), MeshFileError> {
    let refuse = |location: Option<Location>, message: String| MeshFileError {
        file: path.to_path_buf(),
        location,
        field: String::new(),
        message,
    };
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(refuse(None, format!("larger than {} MiB: refused unread", MAX_FILE_BYTES >> 20)));
    }
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut comment = false;
    // The last character that was not a space (a collection or a quoted scalar opens after
    // one of these), and the one right before (a comment starts after a space).
    let (mut last, mut prev) = ('\n', '\n');
    let opens_after = |c: char| matches!(c, '\n' | ':' | ',' | '[' | '{' | '-' | '?');
    for c in text.chars() {
        column += 1;
        if c == '\n' {
            (line, column, comment, prev) = (line + 1, 0, false, '\n');
            if quote.is_none() {
                last = '\n';
            }
            continue;
        }
        if comment {
            continue;
        }
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '#' if prev.is_whitespace() => comment = true,
                '"' | '\'' if opens_after(last) => quote = Some(c),
                '[' | '{' if opens_after(last) => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Err(refuse(
                            Some(Location { line, column }),
                            format!(
                                "collections nested deeper than {MAX_FLOW_DEPTH} levels: refused unparsed \
                                 (a mesh file needs a few)"
                            ),
                        ));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        if !c.is_whitespace() {
            last = c;
        }
        prev = c;
    }
    Ok(())
}

/// Parses and validates mesh file text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str, checks: &Checks<'_>) -> Result<Mesh, MeshFileError> {
    check_bounds(path, text)?;
    let file: model::MeshFile = if text.trim().is_empty() {
        model::MeshFile::default()
    } else {
        serde_norway::from_str(text).map_err(|e| serde_error(path, &e))?
    };
    validate::Validator { path, text, checks }.validate(file)
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

#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
