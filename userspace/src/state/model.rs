//! The proxy's view of the mesh, decoded and checked from the Istio workload API.

use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    errors::{Invalid, Problem},
    identity::Identity,
    pb::istio::workload::{self as pb, address},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tunnel {
    /// Not in the mesh: reached directly, in plaintext.
    None,
    /// In the mesh: reached through HBONE (its node proxy's 15008 on its IP).
    Hbone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortMap {
    pub service_port: u16,
    pub target_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    /// A workload known by name only (the endpoint of a ServiceEntry with `resolution: DNS`):
    /// connections to it resolve the name first. Set only when it has no address.
    pub hostname: Option<String>,
    pub node: String,
    pub identity: Identity,
    pub tunnel: Tunnel,
    pub healthy: bool,
    /// Services it is an endpoint of (`<namespace>/<hostname>`), with its port mappings.
    pub services: BTreeMap<String, Vec<PortMap>>,
    /// Authorization policies selecting it by name.
    pub authorization_policies: Vec<String>,
    pub canonical_name: String,
    pub canonical_revision: String,
    /// The owning workload (a Deployment's name, say); telemetry's `*_workload`.
    pub workload_name: String,
    pub cluster_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    /// `<namespace>/<hostname>`.
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortMap>,
}

/// A decoded `istio.workload.Address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    Workload(Box<Workload>),
    Service(Service),
}

fn ip(bytes: &[u8], field: String) -> Result<IpAddr, Invalid> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).expect("length checked"))),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(bytes).expect("length checked"))),
        n => Err(Problem::IpLength(n).at(field)),
    }
}

fn port_map(p: &pb::Port, at: &str) -> Result<PortMap, Invalid> {
    // A service port must be one; a target port of 0 means "the service port".
    let service_port = u16::try_from(p.service_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Problem::NotAPort(p.service_port).at(format!("{at}.service_port")))?;
    let target_port = u16::try_from(p.target_port)
        .map_err(|_| Problem::NotAPort(p.target_port).at(format!("{at}.target_port")))?;
    Ok(PortMap { service_port, target_port })
}

fn name_part(s: &str, field: &str) -> Result<(), Invalid> {
    if s.is_empty() || s.contains('/') || s.chars().any(char::is_whitespace) {
        Err(Problem::NotAName(s.to_string()).at(field))
    } else {
        Ok(())
    }
}

impl Decoded {
    /// Checks and converts an Address; the error says what is wrong, for the NACK.
    pub fn from_proto(a: &pb::Address) -> Result<Decoded, Invalid> {
        match &a.r#type {
            Some(address::Type::Workload(w)) => Ok(Decoded::Workload(Box::new(workload(w)?))),
            Some(address::Type::Service(s)) => Ok(Decoded::Service(service(s)?)),
            None => Err(Problem::Unset { expected: "a workload or a service" }.at("type")),
        }
    }

    /// The resource name it must be served under.
    pub fn name(&self) -> &str {
        match self {
            Decoded::Workload(w) => &w.uid,
            Decoded::Service(s) => &s.key,
        }
    }

    /// The fields [`Decoded::name`] comes from, for an error about it.
    pub fn name_field(&self) -> &'static str {
        match self {
            Decoded::Workload(_) => "uid",
            Decoded::Service(_) => "namespace/hostname",
        }
    }
}

fn workload(w: &pb::Workload) -> Result<Workload, Invalid> {
    if w.uid.is_empty() {
        return Err(Problem::Missing { of: "workload" }.at("uid"));
    }
    name_part(&w.name, "name")?;
    name_part(&w.namespace, "namespace")?;
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip(a, format!("addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let hostname = if w.hostname.is_empty() || !addresses.is_empty() {
        None
    } else if is_hostname(&w.hostname) {
        Some(w.hostname.trim_end_matches('.').to_ascii_lowercase())
    } else {
        return Err(Problem::NotAHostname(w.hostname.clone()).at("hostname"));
    };
    let trust_domain = if w.trust_domain.is_empty() { "cluster.local" } else { &w.trust_domain };
    let sa = if w.service_account.is_empty() { "default" } else { &w.service_account };
    name_part(trust_domain, "trust_domain")?;
    name_part(sa, "service_account")?;
    let tunnel = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::Hbone) => Tunnel::Hbone,
        Ok(_) => Tunnel::None,
        Err(_) => return Err(Problem::UnknownEnum(w.tunnel_protocol).at("tunnel_protocol")),
    };
    let healthy = match pb::WorkloadStatus::try_from(w.status) {
        Ok(pb::WorkloadStatus::Healthy) => true,
        Ok(pb::WorkloadStatus::Unhealthy) => false,
        Err(_) => return Err(Problem::UnknownEnum(w.status).at("status")),
    };
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        if !key.contains('/') {
            return Err(Problem::NotAServiceKey(key.clone()).at("services"));
        }
        let ports = list
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| port_map(p, &format!("services[{key}].ports[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        services.insert(key.clone(), ports);
    }
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses,
        hostname,
        node: w.node.clone(),
        identity: Identity::new(trust_domain, &w.namespace, sa),
        tunnel,
        healthy,
        services,
        authorization_policies: w.authorization_policies.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_name: w.workload_name.clone(),
        cluster_id: w.cluster_id.clone(),
    })
}

/// A name the resolvers can be asked: dotted labels of letters, digits, `-` and `_`, each 1 to
/// 63 bytes, 253 in all (a trailing dot allowed).
fn is_hostname(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn service(s: &pb::Service) -> Result<Service, Invalid> {
    name_part(&s.name, "name")?;
    name_part(&s.namespace, "namespace")?;
    name_part(&s.hostname, "hostname")?;
    let vips = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip(&a.address, format!("addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = s
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| port_map(p, &format!("ports[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Service {
        key: format!("{}/{}", s.namespace, s.hostname),
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
    })
}
