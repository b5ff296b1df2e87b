//! The mesh state in the shape of ztunnel's `/config_dump` (camelCase `workloads`,
//! `services` and `policies` lists), which `istioctl ztunnel-config` reads: the same tool
//! works on an ambit node proxy. Fields ztunnel leaves out when empty are left out too.

use serde_json::{json, Map, Value};

use super::{model::Tunnel, StateDump};
use crate::authz::{Action, Match, Scope, StrMatch};

impl StateDump {
    /// `(workloads, services, policies)` as ztunnel dumps them.
    pub fn ztunnel(&self) -> (Value, Value, Value) {
        let workloads = self.workloads.iter().map(workload).collect();
        let by_uid: std::collections::HashMap<&str, &super::model::Workload> =
            self.workloads.iter().map(|w| (w.uid.as_str(), w)).collect();
        let healthy = |uid: &str| by_uid.get(uid).is_some_and(|w| w.healthy);
        let services = self
            .services
            .iter()
            .map(|s| {
                let svc = &s.service;
                let ports: Map<String, Value> =
                    svc.ports.iter().map(|p| (p.service_port.to_string(), json!(p.target_port))).collect();
                let endpoints: Map<String, Value> = s
                    .endpoints
                    .iter()
                    .map(|uid| {
                        let ports: Map<String, Value> = by_uid
                            .get(uid.as_str())
                            .and_then(|w| w.services.get(&svc.key))
                            .map(|pm| {
                                pm.iter()
                                    .map(|p| (p.service_port.to_string(), json!(p.target_port)))
                                    .collect()
                            })
                            .unwrap_or_default();
                        (uid.clone(), json!({ "workloadUid": uid, "service": svc.key, "port": ports }))
                    })
                    .collect();
                let families =
                    match (svc.vips.iter().any(|v| v.is_ipv4()), svc.vips.iter().any(|v| v.is_ipv6())) {
                        (true, true) => "Dual",
                        (false, true) => "IPv6Only",
                        _ => "IPv4Only",
                    };
                json!({
                    "name": svc.name,
                    "namespace": svc.namespace,
                    "hostname": svc.hostname,
                    // `<network>/<ip>`, the default network being empty.
                    "vips": svc.vips.iter().map(|v| format!("/{v}")).collect::<Vec<_>>(),
                    "ports": ports,
                    "endpoints": endpoints,
                    "ipFamilies": families,
                    // istioctl counts healthy endpoints from the workloads' status; ambit's
                    // own count, for readers of this dump alone.
                    "healthyEndpoints": s.endpoints.iter().filter(|u| healthy(u)).count(),
                })
            })
            .collect();
        let policies = self
            .policies
            .iter()
            .map(|p| {
                let rules: Vec<Value> = p
                    .rules
                    .iter()
                    .map(|r| {
                        r.clauses.iter().map(|c| c.iter().map(policy_match).collect::<Vec<_>>()).collect()
                    })
                    .collect();
                json!({
                    "name": p.name,
                    "namespace": p.namespace,
                    "scope": match p.scope {
                        Scope::Global => "Global",
                        Scope::Namespace => "Namespace",
                        Scope::WorkloadSelector => "WorkloadSelector",
                    },
                    "action": match p.action {
                        Action::Allow => "Allow",
                        Action::Deny => "Deny",
                    },
                    "rules": rules,
                    "dryRun": p.dry_run,
                })
            })
            .collect();
        (Value::Array(workloads), Value::Array(services), Value::Array(policies))
    }
}

fn workload(w: &super::model::Workload) -> Value {
    let services: Map<String, Value> = w
        .services
        .iter()
        .map(|(k, ports)| {
            let ports: Map<String, Value> =
                ports.iter().map(|p| (p.service_port.to_string(), json!(p.target_port))).collect();
            (k.clone(), Value::Object(ports))
        })
        .collect();
    let mut v = json!({
        "uid": w.uid,
        "workloadIps": w.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "protocol": match w.tunnel {
            Tunnel::Hbone => "HBONE",
            Tunnel::None => "TCP",
        },
        "name": w.name,
        "namespace": w.namespace,
        "trustDomain": w.identity.trust_domain,
        "serviceAccount": w.identity.service_account,
        "workloadName": if w.workload_name.is_empty() { &w.name } else { &w.workload_name },
        "workloadType": "pod",
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "node": w.node,
        "status": if w.healthy { "Healthy" } else { "Unhealthy" },
        "clusterId": w.cluster_id,
        "services": services,
    });
    if !w.authorization_policies.is_empty() {
        v["authorizationPolicies"] = json!(w.authorization_policies);
    }
    v
}

fn string_match(m: &StrMatch) -> Value {
    match m {
        StrMatch::Exact(s) => json!({ "Exact": s }),
        StrMatch::Prefix(s) => json!({ "Prefix": s }),
        StrMatch::Suffix(s) => json!({ "Suffix": s }),
        StrMatch::Presence => json!({ "Presence": {} }),
    }
}

/// One match in ztunnel's field names; an empty list is left out.
fn policy_match(m: &Match) -> Value {
    let mut out = Map::new();
    let mut put = |k: &str, v: Vec<Value>| {
        if !v.is_empty() {
            out.insert(k.to_string(), Value::Array(v));
        }
    };
    put("namespaces", m.namespaces.any_of.iter().map(string_match).collect());
    put("notNamespaces", m.namespaces.none_of.iter().map(string_match).collect());
    put("principals", m.principals.any_of.iter().map(string_match).collect());
    put("notPrincipals", m.principals.none_of.iter().map(string_match).collect());
    let sa = |s: &crate::authz::ServiceAccount| json!({ "namespace": s.namespace, "serviceAccount": s.name });
    put("serviceAccounts", m.service_accounts.any_of.iter().map(sa).collect());
    put("notServiceAccounts", m.service_accounts.none_of.iter().map(sa).collect());
    let cidr = |c: &crate::authz::Cidr| json!(format!("{}/{}", c.addr, c.len));
    put("sourceIps", m.source_ips.any_of.iter().map(cidr).collect());
    put("notSourceIps", m.source_ips.none_of.iter().map(cidr).collect());
    put("destinationIps", m.destination_ips.any_of.iter().map(cidr).collect());
    put("notDestinationIps", m.destination_ips.none_of.iter().map(cidr).collect());
    put("destinationPorts", m.destination_ports.any_of.iter().map(|p| json!(p)).collect());
    put("notDestinationPorts", m.destination_ports.none_of.iter().map(|p| json!(p)).collect());
    Value::Object(out)
}
