//! L4 authorization with Istio's AuthorizationPolicy semantics, as the workload API carries
//! them (`istio.security.Authorization`, docs/istio.md):
//!
//! - a policy applies to a workload by scope: global, its namespace, or selected (listed by
//!   name in the workload's `authorization_policies`);
//! - any matching DENY denies; else with no ALLOW applying, allow; else allow only if an ALLOW
//!   matches;
//! - a policy matches when any rule matches, a rule when all its clauses match, a clause when
//!   any of its matches matches, a match when every field it sets holds (`not_` fields: none of
//!   the values may match);
//! - `dry_run` policies are evaluated as if enforced and only reported.
//!
//! Policies are compiled once when they arrive (`compile`), so evaluation does no parsing.

mod compile;

use std::{net::IpAddr, sync::Arc};

use serde::Serialize;

pub use compile::compile;

use crate::identity::Identity;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

/// How a string attribute (principal, namespace) is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value: an authenticated peer.
    Presence,
}

impl StrMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(s) => v == s,
            StrMatch::Prefix(s) => v.starts_with(s.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Presence => !v.is_empty(),
        }
    }
}

/// An address block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A service account by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

/// Positive and negative values of one attribute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Field<T> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub any_of: Vec<T>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub none_of: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field { any_of: Vec::new(), none_of: Vec::new() }
    }
}

impl<T> Field<T> {
    /// Holds when no value is set, or one positive value matches; and no negative one does.
    fn holds(&self, mut f: impl FnMut(&T) -> bool) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(&mut f)) && !self.none_of.iter().any(f)
    }

    fn is_empty(&self) -> bool {
        self.any_of.is_empty() && self.none_of.is_empty()
    }
}

/// One `Match`: every field it sets must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    #[serde(skip_serializing_if = "Field::is_empty")]
    pub namespaces: Field<StrMatch>,
    #[serde(skip_serializing_if = "Field::is_empty")]
    pub principals: Field<StrMatch>,
    #[serde(skip_serializing_if = "Field::is_empty")]
    pub service_accounts: Field<ServiceAccount>,
    #[serde(skip_serializing_if = "Field::is_empty")]
    pub source_ips: Field<Cidr>,
    #[serde(skip_serializing_if = "Field::is_empty")]
    pub destination_ips: Field<Cidr>,
    #[serde(skip_serializing_if = "Field::is_empty")]
    pub destination_ports: Field<u16>,
}

impl Match {
    fn matches(&self, c: &Conn<'_>) -> bool {
        // Without a peer identity the identity attributes are empty: a positive value never
        // matches, a negative one never excludes, and `presence` fails.
        let (ns, principal) =
            c.src.map_or(("", ""), |s| (s.identity.namespace.as_str(), s.principal.as_str()));
        self.namespaces.holds(|m| m.matches(ns))
            && self.principals.holds(|m| m.matches(principal))
            && self.service_accounts.holds(|sa| {
                c.src.is_some_and(|s| {
                    s.identity.namespace == sa.namespace && s.identity.service_account == sa.name
                })
            })
            && self.source_ips.holds(|n| n.contains(c.src_ip))
            && self.destination_ips.holds(|n| n.contains(c.dst_ip))
            && self.destination_ports.holds(|p| *p == c.dst_port)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// All must match; each is a list of alternatives (any may match).
    pub clauses: Vec<Vec<Match>>,
}

impl Rule {
    fn matches(&self, c: &Conn<'_>) -> bool {
        self.clauses.iter().all(|clause| clause.iter().any(|m| m.matches(c)))
    }
}

/// A compiled `istio.security.Authorization`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// `<namespace>/<name>`: how workloads reference it and how it is logged.
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn matches(&self, c: &Conn<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(c))
    }

    /// Whether it applies to a workload of `namespace` that lists `selected` policies.
    pub fn applies_to(&self, namespace: &str, selected: &[String]) -> bool {
        match self.scope {
            Scope::Global => true,
            Scope::Namespace => self.namespace == namespace,
            Scope::WorkloadSelector => selected.contains(&self.key),
        }
    }
}

/// The authenticated peer of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub identity: Identity,
    /// `<trust domain>/ns/<namespace>/sa/<sa>`, as policies write principals.
    pub principal: String,
}

impl Peer {
    pub fn new(identity: Identity) -> Peer {
        Peer { principal: identity.principal(), identity }
    }
}

/// What authorization sees of a connection (addresses canonical: IPv4-mapped as IPv4).
#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    pub src: Option<&'a Peer>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// Why a connection was denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// A DENY policy matched.
    Denied { policy: String },
    /// ALLOW policies apply and none matched.
    NotAllowed { allow_policies: Vec<String> },
}

impl Denial {
    /// The policy to name in logs and metrics: the DENY, or the (first) ALLOW not matched.
    pub fn policy(&self) -> &str {
        match self {
            Denial::Denied { policy } => policy,
            Denial::NotAllowed { allow_policies } => allow_policies.first().map_or("-", String::as_str),
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Denial::Denied { policy } => format!("denied by DENY policy {policy}"),
            Denial::NotAllowed { allow_policies } => {
                format!("no ALLOW policy matched (applicable: {})", allow_policies.join(", "))
            }
        }
    }
}

/// The outcome for one connection: the enforced result, and what dry-run policies would do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub denied: Option<Denial>,
    /// Set when the connection is allowed but would be denied with the dry-run policies
    /// enforced too.
    pub dry_run_denied: Option<Denial>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.denied.is_none()
    }
}

fn decide<'p>(policies: impl Iterator<Item = &'p Policy> + Clone, c: &Conn<'_>) -> Option<Denial> {
    if let Some(p) = policies.clone().find(|p| p.action == Action::Deny && p.matches(c)) {
        return Some(Denial::Denied { policy: p.key.clone() });
    }
    let allows = policies.filter(|p| p.action == Action::Allow);
    let mut any_allow = false;
    for p in allows.clone() {
        if p.matches(c) {
            return None;
        }
        any_allow = true;
    }
    // No ALLOW applies to the workload: allowed. Otherwise none matched: denied (names are
    // gathered only now, so the allowed path allocates nothing).
    any_allow.then(|| Denial::NotAllowed { allow_policies: allows.map(|p| p.key.clone()).collect() })
}

/// Evaluates `c` against the policies that apply to its destination workload.
pub fn evaluate(applicable: &[Arc<Policy>], c: &Conn<'_>) -> Decision {
    let denied = decide(applicable.iter().map(|p| &**p).filter(|p| !p.dry_run), c);
    let dry_run_denied = if denied.is_none() && applicable.iter().any(|p| p.dry_run) {
        decide(applicable.iter().map(|p| &**p), c)
    } else {
        None
    };
    Decision { denied, dry_run_denied }
}

#[cfg(test)]
mod tests;
