//! `istio.security.Authorization` → [`Policy`], refusing what cannot be enforced as written
//! (the message names the field: it becomes the NACK's detail).

use std::net::IpAddr;

use super::{Action, Cidr, Field, Match, Policy, Rule, Scope, ServiceAccount, StrMatch};
use crate::pb::istio::security::{
    self as pb, string_match::MatchType, Address, ServiceAccountMatch, StringMatch,
};

fn strings(v: &[StringMatch], at: &str) -> Result<Vec<StrMatch>, String> {
    v.iter()
        .enumerate()
        .map(|(i, m)| match &m.match_type {
            Some(MatchType::Exact(s)) => Ok(StrMatch::Exact(s.clone())),
            Some(MatchType::Prefix(s)) => Ok(StrMatch::Prefix(s.clone())),
            Some(MatchType::Suffix(s)) => Ok(StrMatch::Suffix(s.clone())),
            Some(MatchType::Presence(_)) => Ok(StrMatch::Presence),
            None => Err(format!("{at}[{i}] sets no match (exact, prefix, suffix or presence)")),
        })
        .collect()
}

fn cidrs(v: &[Address], at: &str) -> Result<Vec<Cidr>, String> {
    v.iter()
        .enumerate()
        .map(|(i, a)| {
            let (addr, max) = match a.address.len() {
                4 => (IpAddr::from(<[u8; 4]>::try_from(a.address.as_slice()).expect("length checked")), 32),
                16 => {
                    (IpAddr::from(<[u8; 16]>::try_from(a.address.as_slice()).expect("length checked")), 128)
                }
                n => return Err(format!("{at}[{i}] has {n} bytes (an IP address has 4 or 16)")),
            };
            if a.length > max {
                return Err(format!("{at}[{i}] has prefix length {} (at most {max})", a.length));
            }
            // Connections are matched with IPv4-mapped addresses as IPv4: blocks too.
            if let IpAddr::V6(v6) = addr {
                if let (Some(v4), true) = (v6.to_ipv4_mapped(), a.length >= 96) {
                    return Ok(Cidr { addr: IpAddr::V4(v4), len: (a.length - 96) as u8 });
                }
            }
            Ok(Cidr { addr, len: a.length as u8 })
        })
        .collect()
}

fn ports(v: &[u32], at: &str) -> Result<Vec<u16>, String> {
    v.iter()
        .enumerate()
        .map(|(i, p)| {
            u16::try_from(*p).ok().filter(|p| *p != 0).ok_or_else(|| format!("{at}[{i}] = {p} is not a port"))
        })
        .collect()
}

fn accounts(v: &[ServiceAccountMatch], at: &str) -> Result<Vec<ServiceAccount>, String> {
    v.iter()
        .enumerate()
        .map(|(i, sa)| {
            if sa.namespace.is_empty() || sa.service_account.is_empty() {
                return Err(format!("{at}[{i}] needs both namespace and serviceAccount"));
            }
            Ok(ServiceAccount { namespace: sa.namespace.clone(), name: sa.service_account.clone() })
        })
        .collect()
}

fn field<T>(pos: Result<Vec<T>, String>, neg: Result<Vec<T>, String>) -> Result<Field<T>, String> {
    Ok(Field { any_of: pos?, none_of: neg? })
}

fn one_match(m: &pb::Match, at: &str) -> Result<Match, String> {
    let a = |f: &str| format!("{at}.{f}");
    Ok(Match {
        namespaces: field(
            strings(&m.namespaces, &a("namespaces")),
            strings(&m.not_namespaces, &a("not_namespaces")),
        )?,
        principals: field(
            strings(&m.principals, &a("principals")),
            strings(&m.not_principals, &a("not_principals")),
        )?,
        service_accounts: field(
            accounts(&m.service_accounts, &a("service_accounts")),
            accounts(&m.not_service_accounts, &a("not_service_accounts")),
        )?,
        source_ips: field(
            cidrs(&m.source_ips, &a("source_ips")),
            cidrs(&m.not_source_ips, &a("not_source_ips")),
        )?,
        destination_ips: field(
            cidrs(&m.destination_ips, &a("destination_ips")),
            cidrs(&m.not_destination_ips, &a("not_destination_ips")),
        )?,
        destination_ports: field(
            ports(&m.destination_ports, &a("destination_ports")),
            ports(&m.not_destination_ports, &a("not_destination_ports")),
        )?,
    })
}

/// Checks and compiles a policy. Every field is validated; nothing is dropped silently.
pub fn compile(p: &pb::Authorization) -> Result<Policy, String> {
    if p.name.is_empty() {
        return Err("policy without a name".into());
    }
    let scope = match pb::Scope::try_from(p.scope) {
        Ok(pb::Scope::Global) => Scope::Global,
        Ok(pb::Scope::Namespace) => Scope::Namespace,
        Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(format!("unknown scope {}", p.scope)),
    };
    if scope != Scope::Global && p.namespace.is_empty() {
        return Err("a namespace or workload-selector policy without a namespace".into());
    }
    let action = match pb::Action::try_from(p.action) {
        Ok(pb::Action::Allow) => Action::Allow,
        Ok(pb::Action::Deny) => Action::Deny,
        Err(_) => return Err(format!("unknown action {}", p.action)),
    };
    let rules = p
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let clauses = r
                .clauses
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    c.matches
                        .iter()
                        .enumerate()
                        .map(|(k, m)| one_match(m, &format!("rules[{i}].clauses[{j}].matches[{k}]")))
                        .collect::<Result<Vec<_>, _>>()
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Rule { clauses })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Policy {
        key: format!("{}/{}", p.namespace, p.name),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope,
        action,
        dry_run: p.dry_run,
        rules,
    })
}
