//! The mesh file's policies as `istio.security.Authorization` resources, converted the way
//! istiod converts AuthorizationPolicy and PeerAuthentication for ztunnel:
//!
//! - scope: in the root namespace without a selector → global; without a selector → the
//!   namespace; with one → selected workloads, which list `<namespace>/<name>` in their
//!   `authorization_policies`;
//! - a rule's `from` sources become one clause (any source), its `to` operations another, each
//!   `when` condition one more (all must hold);
//! - a workload whose effective mTLS mode is STRICT (its own PeerAuthentication, else its
//!   namespace's, else the mesh's) selects the DENY policy `<namespace>/peer_authentication_strict`
//!   (`not_principals: presence`): a client without a verified identity is refused.

use std::collections::{BTreeMap, HashMap};

use crate::{
    meshfile::{
        policy::{
            AuthorizationPolicySpec, ConditionSpec, IpBlock, MtlsMode, OperationSpec, Pattern, PolicyAction,
            RuleSpec, SourceSpec, Values,
        },
        Mesh, PodSpec,
    },
    pb::istio::security::{
        string_match::MatchType, Action, Address, Authorization, Clause, Match, Rule, Scope,
        ServiceAccountMatch, StringMatch,
    },
};

/// The name (in each namespace) of the policy that makes STRICT mTLS a DENY.
pub const STRICT_POLICY: &str = "peer_authentication_strict";

/// Resources by name, and for each pod (`<namespace>/<name>`) the policies selecting it.
#[derive(Debug, Default)]
pub struct Converted {
    pub resources: BTreeMap<String, Authorization>,
    pub selected: HashMap<String, Vec<String>>,
}

fn string_match(p: &Pattern) -> StringMatch {
    let t = match p {
        Pattern::Presence => MatchType::Presence(()),
        Pattern::Prefix(s) => MatchType::Prefix(s.clone()),
        Pattern::Suffix(s) => MatchType::Suffix(s.clone()),
        Pattern::Exact(s) => MatchType::Exact(s.clone()),
    };
    StringMatch { match_type: Some(t) }
}

fn address(b: &IpBlock) -> Address {
    let address = match b.addr {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    Address { address, length: b.len.into() }
}

fn map<T, U>(v: &[T], f: impl Fn(&T) -> U) -> Vec<U> {
    v.iter().map(f).collect()
}

fn accounts(v: &[(String, String)]) -> Vec<ServiceAccountMatch> {
    map(v, |(ns, sa)| ServiceAccountMatch { namespace: ns.clone(), service_account: sa.clone() })
}

fn ports(v: &Values<u16>) -> (Vec<u32>, Vec<u32>) {
    (map(&v.any_of, |p| u32::from(*p)), map(&v.none_of, |p| u32::from(*p)))
}

fn source(s: &SourceSpec) -> Match {
    Match {
        principals: map(&s.principals.any_of, string_match),
        not_principals: map(&s.principals.none_of, string_match),
        namespaces: map(&s.namespaces.any_of, string_match),
        not_namespaces: map(&s.namespaces.none_of, string_match),
        service_accounts: accounts(&s.service_accounts.any_of),
        not_service_accounts: accounts(&s.service_accounts.none_of),
        source_ips: map(&s.ip_blocks.any_of, address),
        not_source_ips: map(&s.ip_blocks.none_of, address),
        ..Default::default()
    }
}

fn operation(o: &OperationSpec) -> Match {
    let (destination_ports, not_destination_ports) = ports(&o.ports);
    Match { destination_ports, not_destination_ports, ..Default::default() }
}

fn condition(c: &ConditionSpec) -> Match {
    match c {
        ConditionSpec::SourceIp(v) => Match {
            source_ips: map(&v.any_of, address),
            not_source_ips: map(&v.none_of, address),
            ..Default::default()
        },
        ConditionSpec::SourceNamespace(v) => Match {
            namespaces: map(&v.any_of, string_match),
            not_namespaces: map(&v.none_of, string_match),
            ..Default::default()
        },
        ConditionSpec::SourcePrincipal(v) => Match {
            principals: map(&v.any_of, string_match),
            not_principals: map(&v.none_of, string_match),
            ..Default::default()
        },
        ConditionSpec::DestinationIp(v) => Match {
            destination_ips: map(&v.any_of, address),
            not_destination_ips: map(&v.none_of, address),
            ..Default::default()
        },
        ConditionSpec::DestinationPort(v) => {
            let (destination_ports, not_destination_ports) = ports(v);
            Match { destination_ports, not_destination_ports, ..Default::default() }
        }
    }
}

fn rule(r: &RuleSpec) -> Rule {
    let mut clauses = Vec::new();
    if !r.from.is_empty() {
        clauses.push(Clause { matches: map(&r.from, source) });
    }
    if !r.to.is_empty() {
        clauses.push(Clause { matches: map(&r.to, operation) });
    }
    clauses.extend(r.when.iter().map(|c| Clause { matches: vec![condition(c)] }));
    Rule { clauses }
}

fn selects(selector: &BTreeMap<String, String>, pod: &PodSpec) -> bool {
    selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
}

fn authorization_policy(mesh: &Mesh, p: &AuthorizationPolicySpec, out: &mut Converted) {
    let key = format!("{}/{}", p.namespace, p.name);
    let in_root = p.namespace == mesh.root_namespace;
    let scope = match &p.selector {
        None if in_root => Scope::Global,
        None => Scope::Namespace,
        Some(selector) => {
            for pod in mesh
                .pods
                .iter()
                .filter(|pod| (in_root || pod.namespace == p.namespace) && selects(selector, pod))
            {
                out.selected.entry(pod.key()).or_default().push(key.clone());
            }
            Scope::WorkloadSelector
        }
    };
    let action = match p.action {
        PolicyAction::Allow => Action::Allow,
        PolicyAction::Deny => Action::Deny,
    };
    out.resources.insert(
        key,
        Authorization {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            scope: scope as i32,
            action: action as i32,
            rules: map(&p.rules, rule),
            dry_run: p.dry_run,
        },
    );
}

/// The mTLS mode in force for `pod`: its own PeerAuthentication, else its namespace's, else
/// the mesh's (root namespace); PERMISSIVE when none sets one.
pub fn effective_mode(mesh: &Mesh, pod: &PodSpec) -> MtlsMode {
    let set = |m: MtlsMode| (m != MtlsMode::Unset).then_some(m);
    let pas = &mesh.peer_authentications;
    let workload = pas
        .iter()
        .filter(|pa| pa.namespace == pod.namespace)
        .find_map(|pa| pa.selector.as_ref().filter(|s| selects(s, pod)).and_then(|_| set(pa.mode)));
    let namespace = || {
        pas.iter()
            .filter(|pa| pa.namespace == pod.namespace && pa.selector.is_none())
            .find_map(|pa| set(pa.mode))
    };
    let mesh_wide = || {
        pas.iter()
            .filter(|pa| pa.namespace == mesh.root_namespace && pa.selector.is_none())
            .find_map(|pa| set(pa.mode))
    };
    workload.or_else(namespace).or_else(mesh_wide).unwrap_or(MtlsMode::Permissive)
}

fn strict_policy(namespace: &str) -> Authorization {
    Authorization {
        name: STRICT_POLICY.into(),
        namespace: namespace.into(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    not_principals: vec![StringMatch { match_type: Some(MatchType::Presence(())) }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

/// Every policy of the mesh file as xDS resources.
pub fn convert(mesh: &Mesh) -> Converted {
    let mut out = Converted::default();
    for p in &mesh.authorization_policies {
        authorization_policy(mesh, p, &mut out);
    }
    for pod in mesh.pods.iter().filter(|pod| effective_mode(mesh, pod) == MtlsMode::Strict) {
        let key = format!("{}/{STRICT_POLICY}", pod.namespace);
        out.resources.entry(key.clone()).or_insert_with(|| strict_policy(&pod.namespace));
        out.selected.entry(pod.key()).or_default().push(key);
    }
    out
}
