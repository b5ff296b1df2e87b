//! Policies in the mesh file, written as Istio's own resources so that they can be pasted from
//! a cluster: `AuthorizationPolicy` (its L4 part) and `PeerAuthentication` (the mTLS mode).
//! Anything ambit would have to ignore to enforce a policy — HTTP attributes, waypoint
//! bindings, AUDIT/CUSTOM actions — is refused with the field that holds it, never dropped.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use serde::Deserialize;

use super::{
    locate::FieldPath,
    validate::{check_dns_label, check_dns_subdomain, Validator},
    BadValue, Mesh, MeshFileError,
};

type Value = serde_norway::Value;

// --- As written -------------------------------------------------------------------------

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyEntry {
    #[serde(default)]
    pub api_version: Option<String>,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Spec,
    /// What a cluster reports about the object; ignored.
    #[serde(default)]
    pub status: Option<Value>,
}

/// Kubernetes metadata; fields a cluster adds (uid, resourceVersion, ...) are ignored.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    pub selector: Option<Selector>,
    pub action: Option<String>,
    pub rules: Option<Vec<Rule>>,
    pub provider: Option<Value>,
    pub target_ref: Option<Value>,
    pub target_refs: Option<Value>,
    pub mtls: Option<Mtls>,
    pub port_level_mtls: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mtls {
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    pub from: Option<Vec<From>>,
    pub to: Option<Vec<To>>,
    pub when: Option<Vec<Condition>>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub service_accounts: Option<Vec<String>>,
    pub not_service_accounts: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
    // HTTP-level (L7): refused.
    pub request_principals: Option<Value>,
    pub not_request_principals: Option<Value>,
    pub remote_ip_blocks: Option<Value>,
    pub not_remote_ip_blocks: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// Istio writes ports as strings; numbers are accepted too.
    pub ports: Option<Vec<Value>>,
    pub not_ports: Option<Vec<Value>>,
    // HTTP-level (L7): refused.
    pub hosts: Option<Value>,
    pub not_hosts: Option<Value>,
    pub methods: Option<Value>,
    pub not_methods: Option<Value>,
    pub paths: Option<Value>,
    pub not_paths: Option<Value>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}

// --- Validated ----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// A string pattern as Istio writes it: `*` (any value present), `prefix*`, `*suffix`, exact.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    Presence,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

/// An IP address block (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpBlock {
    pub addr: IpAddr,
    pub len: u8,
}

/// Positive and negative values of one attribute.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Values<T> {
    pub any_of: Vec<T>,
    pub none_of: Vec<T>,
}

impl<T> Default for Values<T> {
    fn default() -> Self {
        Values { any_of: Vec::new(), none_of: Vec::new() }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceSpec {
    pub principals: Values<Pattern>,
    pub namespaces: Values<Pattern>,
    /// (namespace, service account)
    pub service_accounts: Values<(String, String)>,
    pub ip_blocks: Values<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct OperationSpec {
    pub ports: Values<u16>,
}

/// A `when` condition on an L4 attribute.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConditionSpec {
    SourceIp(Values<IpBlock>),
    SourceNamespace(Values<Pattern>),
    SourcePrincipal(Values<Pattern>),
    DestinationIp(Values<IpBlock>),
    DestinationPort(Values<u16>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleSpec {
    /// Any may match (none: any source).
    pub from: Vec<SourceSpec>,
    /// Any may match (none: any destination).
    pub to: Vec<OperationSpec>,
    /// All must hold.
    pub when: Vec<ConditionSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthorizationPolicySpec {
    pub name: String,
    pub namespace: String,
    /// `None` (or empty): every workload of the namespace — of the mesh, in the root namespace.
    pub selector: Option<BTreeMap<String, String>>,
    pub action: PolicyAction,
    pub dry_run: bool,
    pub rules: Vec<RuleSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    Strict,
    Permissive,
    /// Inherit from the namespace, then the mesh.
    Unset,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerAuthenticationSpec {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
}

/// Istio's annotation that makes an AuthorizationPolicy report instead of enforce.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

// --- Checks -------------------------------------------------------------------------------

fn l7(field: &str) -> String {
    format!(
        "`{field}` is an HTTP (L7) attribute; ambit enforces policies at L4 (identities, namespaces, \
         addresses, ports): remove it, or enforce it in a waypoint"
    )
}

fn pattern(s: &str) -> Result<Pattern, BadValue> {
    let p = if s == "*" {
        Pattern::Presence
    } else if let Some(rest) = s.strip_prefix('*') {
        Pattern::Suffix(rest.to_string())
    } else if let Some(rest) = s.strip_suffix('*') {
        Pattern::Prefix(rest.to_string())
    } else {
        Pattern::Exact(s.to_string())
    };
    match &p {
        Pattern::Prefix(x) | Pattern::Suffix(x) | Pattern::Exact(x) if x.contains('*') || x.is_empty() => {
            Err(BadValue::Pattern(s.to_string()))
        }
        _ => Ok(p),
    }
}

fn ip_block(s: &str) -> Result<IpBlock, BadValue> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| BadValue::NotAnIpBlock(s.to_string()))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| BadValue::PrefixLength { block: s.to_string(), max })?,
    };
    Ok(IpBlock { addr, len })
}

fn port(v: &Value) -> Result<u16, BadValue> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    n.and_then(|n| u16::try_from(n).ok()).filter(|p| *p != 0).ok_or_else(|| {
        BadValue::NotAPort(match v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => format!("{s:?}"),
            other => format!("{other:?}"),
        })
    })
}

fn service_account(s: &str) -> Result<(String, String), BadValue> {
    match s.split_once('/') {
        Some((ns, sa)) if check_dns_label(ns).is_ok() && check_dns_subdomain(sa).is_ok() => {
            Ok((ns.to_string(), sa.to_string()))
        }
        _ => Err(BadValue::NotAServiceAccount(s.to_string())),
    }
}

impl Validator<'_> {
    /// Parses every value of `v` with `f`, naming the failing element.
    fn each<T>(
        &self,
        v: &Option<Vec<String>>,
        at: &FieldPath,
        name: &str,
        f: impl Fn(&str) -> Result<T, BadValue>,
    ) -> Result<Vec<T>, MeshFileError> {
        let mut out = Vec::new();
        for (i, s) in v.iter().flatten().enumerate() {
            out.push(f(s).map_err(|m| self.err(at.clone().key(name).index(i), m))?);
        }
        Ok(out)
    }

    fn pair<T>(
        &self,
        pos: &Option<Vec<String>>,
        neg: &Option<Vec<String>>,
        at: &FieldPath,
        names: (&str, &str),
        f: impl Fn(&str) -> Result<T, BadValue> + Copy,
    ) -> Result<Values<T>, MeshFileError> {
        Ok(Values { any_of: self.each(pos, at, names.0, f)?, none_of: self.each(neg, at, names.1, f)? })
    }

    fn refuse_l7(&self, at: &FieldPath, fields: &[(&str, bool)]) -> Result<(), MeshFileError> {
        match fields.iter().find(|(_, present)| *present) {
            Some((name, _)) => Err(self.err(at.clone().key(name), l7(name))),
            None => Ok(()),
        }
    }

    fn source(&self, s: &Source, at: &FieldPath) -> Result<SourceSpec, MeshFileError> {
        self.refuse_l7(
            at,
            &[
                ("requestPrincipals", s.request_principals.is_some()),
                ("notRequestPrincipals", s.not_request_principals.is_some()),
                ("remoteIpBlocks", s.remote_ip_blocks.is_some()),
                ("notRemoteIpBlocks", s.not_remote_ip_blocks.is_some()),
            ],
        )?;
        Ok(SourceSpec {
            principals: self.pair(
                &s.principals,
                &s.not_principals,
                at,
                ("principals", "notPrincipals"),
                pattern,
            )?,
            namespaces: self.pair(
                &s.namespaces,
                &s.not_namespaces,
                at,
                ("namespaces", "notNamespaces"),
                pattern,
            )?,
            service_accounts: self.pair(
                &s.service_accounts,
                &s.not_service_accounts,
                at,
                ("serviceAccounts", "notServiceAccounts"),
                service_account,
            )?,
            ip_blocks: self.pair(
                &s.ip_blocks,
                &s.not_ip_blocks,
                at,
                ("ipBlocks", "notIpBlocks"),
                ip_block,
            )?,
        })
    }

    fn ports(&self, v: &Option<Vec<Value>>, at: &FieldPath, name: &str) -> Result<Vec<u16>, MeshFileError> {
        let mut out = Vec::new();
        for (i, p) in v.iter().flatten().enumerate() {
            out.push(port(p).map_err(|m| self.err(at.clone().key(name).index(i), m))?);
        }
        Ok(out)
    }

    fn operation(&self, o: &Operation, at: &FieldPath) -> Result<OperationSpec, MeshFileError> {
        self.refuse_l7(
            at,
            &[
                ("hosts", o.hosts.is_some()),
                ("notHosts", o.not_hosts.is_some()),
                ("methods", o.methods.is_some()),
                ("notMethods", o.not_methods.is_some()),
                ("paths", o.paths.is_some()),
                ("notPaths", o.not_paths.is_some()),
            ],
        )?;
        Ok(OperationSpec {
            ports: Values {
                any_of: self.ports(&o.ports, at, "ports")?,
                none_of: self.ports(&o.not_ports, at, "notPorts")?,
            },
        })
    }

    fn condition(&self, c: &Condition, at: &FieldPath) -> Result<ConditionSpec, MeshFileError> {
        if c.values.is_none() && c.not_values.is_none() {
            return Err(self.err(at.clone(), "a condition needs values or notValues"));
        }
        let names = ("values", "notValues");
        let (v, n) = (&c.values, &c.not_values);
        Ok(match c.key.as_str() {
            "source.ip" => ConditionSpec::SourceIp(self.pair(v, n, at, names, ip_block)?),
            "source.namespace" => ConditionSpec::SourceNamespace(self.pair(v, n, at, names, pattern)?),
            "source.principal" => ConditionSpec::SourcePrincipal(self.pair(v, n, at, names, pattern)?),
            "destination.ip" => ConditionSpec::DestinationIp(self.pair(v, n, at, names, ip_block)?),
            "destination.port" => ConditionSpec::DestinationPort(
                self.pair(v, n, at, names, |s| port(&Value::String(s.into())))?,
            ),
            other if other.starts_with("request.") || other == "remote.ip" || other == "connection.sni" => {
                return Err(self.err(at.clone().key("key"), l7(other)))
            }
            other => {
                return Err(self.err(
                    at.clone().key("key"),
                    format!(
                        "unknown condition key {other:?} (L4 keys: source.ip, source.namespace, \
                         source.principal, destination.ip, destination.port)"
                    ),
                ))
            }
        })
    }

    fn selector(
        &self,
        s: &Option<Selector>,
        at: &FieldPath,
    ) -> Result<Option<BTreeMap<String, String>>, MeshFileError> {
        match s {
            Some(sel) if !sel.match_labels.is_empty() => {
                self.check_labels(&sel.match_labels, at.clone().key("selector").key("matchLabels"))?;
                Ok(Some(sel.match_labels.clone()))
            }
            _ => Ok(None),
        }
    }

    fn authorization_policy(
        &self,
        e: &PolicyEntry,
        at: &FieldPath,
    ) -> Result<AuthorizationPolicySpec, MeshFileError> {
        let spec_at = at.clone().key("spec");
        for (name, present, why) in [
            ("mtls", e.spec.mtls.is_some(), "belongs to a PeerAuthentication"),
            ("portLevelMtls", e.spec.port_level_mtls.is_some(), "belongs to a PeerAuthentication"),
            ("provider", e.spec.provider.is_some(), "configures CUSTOM (external) authorization, which ambit does not support"),
            ("targetRef", e.spec.target_ref.is_some(), "binds a policy to a waypoint or gateway (L7); ambit enforces L4 policies chosen by `selector`"),
            ("targetRefs", e.spec.target_refs.is_some(), "binds a policy to a waypoint or gateway (L7); ambit enforces L4 policies chosen by `selector`"),
        ] {
            if present {
                return Err(self.err(spec_at.clone().key(name), format!("`{name}` {why}")));
            }
        }
        let action = match e.spec.action.as_deref() {
            None | Some("ALLOW") => PolicyAction::Allow,
            Some("DENY") => PolicyAction::Deny,
            Some(a @ ("AUDIT" | "CUSTOM")) => {
                return Err(
                    self.err(spec_at.key("action"), format!("action {a} is not supported (ALLOW or DENY)"))
                )
            }
            Some(other) => {
                return Err(
                    self.err(spec_at.key("action"), format!("unknown action {other:?} (ALLOW or DENY)"))
                )
            }
        };
        let dry_run = match e.metadata.annotations.get(DRY_RUN_ANNOTATION).map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                let f = at.clone().key("metadata").key("annotations").key(DRY_RUN_ANNOTATION);
                return Err(self.err(f, format!("{other:?}: expected \"true\" or \"false\"")));
            }
        };
        let mut rules = Vec::new();
        for (i, r) in e.spec.rules.iter().flatten().enumerate() {
            let r_at = spec_at.clone().key("rules").index(i);
            let mut rule = RuleSpec::default();
            for (j, f) in r.from.iter().flatten().enumerate() {
                rule.from.push(self.source(&f.source, &r_at.clone().key("from").index(j).key("source"))?);
            }
            for (j, t) in r.to.iter().flatten().enumerate() {
                rule.to
                    .push(self.operation(&t.operation, &r_at.clone().key("to").index(j).key("operation"))?);
            }
            for (j, c) in r.when.iter().flatten().enumerate() {
                rule.when.push(self.condition(c, &r_at.clone().key("when").index(j))?);
            }
            rules.push(rule);
        }
        Ok(AuthorizationPolicySpec {
            name: e.metadata.name.clone(),
            namespace: e.metadata.namespace.clone(),
            selector: self.selector(&e.spec.selector, &spec_at)?,
            action,
            dry_run,
            rules,
        })
    }

    fn peer_authentication(
        &self,
        e: &PolicyEntry,
        at: &FieldPath,
    ) -> Result<PeerAuthenticationSpec, MeshFileError> {
        let spec_at = at.clone().key("spec");
        for (name, present) in [
            ("action", e.spec.action.is_some()),
            ("rules", e.spec.rules.is_some()),
            ("provider", e.spec.provider.is_some()),
            ("targetRef", e.spec.target_ref.is_some()),
            ("targetRefs", e.spec.target_refs.is_some()),
        ] {
            if present {
                return Err(self
                    .err(spec_at.clone().key(name), format!("`{name}` belongs to an AuthorizationPolicy")));
            }
        }
        if e.spec.port_level_mtls.is_some() {
            return Err(self.err(
                spec_at.key("portLevelMtls"),
                "per-port mTLS modes are not supported (ambient data planes apply one mode per workload)",
            ));
        }
        let mode = match e.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()) {
            None | Some("UNSET") => MtlsMode::Unset,
            Some("STRICT") => MtlsMode::Strict,
            Some("PERMISSIVE") => MtlsMode::Permissive,
            Some("DISABLE") => {
                return Err(self.err(
                    spec_at.key("mtls").key("mode"),
                    "DISABLE is not supported: between enrolled pods traffic is always mutual TLS; use PERMISSIVE to accept plaintext",
                ))
            }
            Some(other) => {
                return Err(self.err(
                    spec_at.key("mtls").key("mode"),
                    format!("unknown mode {other:?} (STRICT, PERMISSIVE or UNSET)"),
                ))
            }
        };
        Ok(PeerAuthenticationSpec {
            name: e.metadata.name.clone(),
            namespace: e.metadata.namespace.clone(),
            selector: self.selector(&e.spec.selector, &spec_at)?,
            mode,
        })
    }

    pub(super) fn policies(&self, mesh: &mut Mesh, entries: Vec<PolicyEntry>) -> Result<(), MeshFileError> {
        let mut seen: HashSet<(String, String, String)> = HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            let at = FieldPath::default().key("policies").index(i);
            if let Some(v) = e.api_version.as_deref().filter(|v| !API_VERSIONS.contains(v)) {
                return Err(
                    self.err(at.key("apiVersion"), format!("{v:?}: expected {}", API_VERSIONS.join(" or ")))
                );
            }
            let meta = at.clone().key("metadata");
            check_dns_subdomain(&e.metadata.name).map_err(|m| self.err(meta.clone().key("name"), m))?;
            let ns = &e.metadata.namespace;
            if *ns != mesh.root_namespace && !mesh.namespaces.contains_key(ns) {
                return Err(self.err(
                    meta.key("namespace"),
                    format!(
                        "namespace {ns:?} is not declared under `namespaces` (nor the root namespace {:?})",
                        mesh.root_namespace
                    ),
                ));
            }
            if !seen.insert((e.kind.clone(), ns.clone(), e.metadata.name.clone())) {
                return Err(
                    self.err(meta.key("name"), format!("duplicate {} {ns}/{}", e.kind, e.metadata.name))
                );
            }
            match e.kind.as_str() {
                "AuthorizationPolicy" => mesh.authorization_policies.push(self.authorization_policy(e, &at)?),
                "PeerAuthentication" => mesh.peer_authentications.push(self.peer_authentication(e, &at)?),
                other => {
                    return Err(self.err(
                        at.key("kind"),
                        format!("unknown kind {other:?} (AuthorizationPolicy or PeerAuthentication)"),
                    ))
                }
            }
        }
        Ok(())
    }
}
