//! `istio.security.Authorization` → [`Policy`], refusing what cannot be enforced as written
//! (the message names the field: it becomes the NACK's detail).

use std::net::IpAddr;

use super::{Action, Cidr, Field, Match, Policy, Rule, Scope, ServiceAccount, StrMatch};
use crate::{
    errors::{Invalid, Problem},
    pb::istio::security::{self as pb, string_match::MatchType, Address, ServiceAccountMatch, StringMatch},
};

fn strings(v: &[StringMatch], at: &str) -> Result<Vec<StrMatch>, Invalid> {
    v.iter()
        .enumerate()
        .map(|(i, m)| match &m.match_type {
            Some(MatchType::Exact(s)) => Ok(StrMatch::Exact(s.clone())),
            Some(MatchType::Prefix(s)) => Ok(StrMatch::Prefix(s.clone())),
            Some(MatchType::Suffix(s)) => Ok(StrMatch::Suffix(s.clone())),
            Some(MatchType::Presence(_)) => Ok(StrMatch::Presence),
            None => Err(Problem::NoMatchType.at(format!("{at}[{i}]"))),
        })
        .collect()
}

fn cidrs(v: &[Address], at: &str) -> Result<Vec<Cidr>, Invalid> {
    v.iter()
        .enumerate()
        .map(|(i, a)| {
            let (addr, max) = match a.address.len() {
                4 => (IpAddr::from(<[u8; 4]>::try_from(a.address.as_slice()).expect("length checked")), 32),
                16 => {
                    (IpAddr::from(<[u8; 16]>::try_from(a.address.as_slice()).expect("length checked")), 128)
                }
                n => return Err(Problem::IpLength(n).at(format!("{at}[{i}]"))),
            };
            if a.length > max {
                return Err(Problem::PrefixLength { len: a.length, max }.at(format!("{at}[{i}]")));
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

fn ports(v: &[u32], at: &str) -> Result<Vec<u16>, Invalid> {
    v.iter()
        .enumerate()
        .map(|(i, p)| {
            u16::try_from(*p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| Problem::NotAPort(*p).at(format!("{at}[{i}]")))
        })
        .collect()
}

fn accounts(v: &[ServiceAccountMatch], at: &str) -> Result<Vec<ServiceAccount>, Invalid> {
    v.iter()
        .enumerate()
        .map(|(i, sa)| {
            if sa.namespace.is_empty() || sa.service_account.is_empty() {
                return Err(Problem::ServiceAccountIncomplete.at(format!("{at}[{i}]")));
            }
            Ok(ServiceAccount { namespace: sa.namespace.clone(), name: sa.service_account.clone() })
        })
        .collect()
}

fn field<T>(pos: Result<Vec<T>, Invalid>, neg: Result<Vec<T>, Invalid>) -> Result<Field<T>, Invalid> {
    Ok(Field { any_of: pos?, none_of: neg? })
}

fn one_match(m: &pb::Match, at: &str) -> Result<Match, Invalid> {
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
pub fn compile(p: &pb::Authorization) -> Result<Policy, Invalid> {
    if p.name.is_empty() {
        return Err(Problem::Missing { of: "policy" }.at("name"));
    }
    let scope = match pb::Scope::try_from(p.scope) {
        Ok(pb::Scope::Global) => Scope::Global,
        Ok(pb::Scope::Namespace) => Scope::Namespace,
        Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(Problem::UnknownEnum(p.scope).at("scope")),
    };
    if scope != Scope::Global && p.namespace.is_empty() {
        return Err(Problem::Missing { of: "a namespace or workload-selector policy" }.at("namespace"));
    }
    let action = match pb::Action::try_from(p.action) {
        Ok(pb::Action::Allow) => Action::Allow,
        Ok(pb::Action::Deny) => Action::Deny,
        Err(_) => return Err(Problem::UnknownEnum(p.action).at("action")),
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
        .collect::<Result<Vec<_>, Invalid>>()?;
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
