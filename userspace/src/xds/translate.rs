//! A mesh file as the Istio workload API: one `Workload` per pod (uid
//! `<cluster>//Pod/<namespace>/<name>`), one `Service` per service (`<namespace>/<hostname>`),
//! endpoints expressed the Istio way — in each workload's `services` map — and the policies
//! (`super::authorization`), which selected workloads list in `authorization_policies`.

use super::CLUSTER_ID;
use crate::{
    meshfile::{Mesh, PodSpec},
    pb::istio::workload::{
        address, Address, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, WorkloadStatus,
        WorkloadType,
    },
    state::Resources,
};

pub fn workload_uid(cluster_id: &str, namespace: &str, name: &str) -> String {
    format!("{cluster_id}//Pod/{namespace}/{name}")
}

fn ip_bytes(ip: &std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn workload(mesh: &Mesh, pod: &PodSpec, origin: &Origin<'_>, policies: &[String]) -> Workload {
    let services = mesh
        .services
        .iter()
        .filter(|s| s.selects(pod))
        .map(|s| {
            let ports = s
                .ports
                .iter()
                .map(|p| Port {
                    service_port: p.port.into(),
                    target_port: p.target_port.into(),
                    app_protocol: 0,
                })
                .collect();
            (s.key(), PortList { ports })
        })
        .collect();
    Workload {
        uid: workload_uid(origin.cluster_id, &pod.namespace, &pod.name),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        addresses: pod.ips.iter().map(ip_bytes).collect(),
        tunnel_protocol: if mesh.is_enrolled(pod) { TunnelProtocol::Hbone } else { TunnelProtocol::None }
            as i32,
        trust_domain: origin.trust_domain.to_string(),
        service_account: pod.service_account.clone(),
        node: pod.node.clone().unwrap_or_default(),
        canonical_name: pod.canonical_name().to_string(),
        canonical_revision: pod.canonical_revision().to_string(),
        workload_type: WorkloadType::Pod as i32,
        workload_name: pod.name.clone(),
        services,
        authorization_policies: policies.to_vec(),
        status: if pod.healthy { WorkloadStatus::Healthy } else { WorkloadStatus::Unhealthy } as i32,
        cluster_id: origin.cluster_id.to_string(),
        ..Default::default()
    }
}

/// Where the workloads live: their identities' trust domain and their cluster's name (the
/// `cluster` of metrics and baggage, and the prefix of workload uids).
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    pub trust_domain: &'a str,
    pub cluster_id: &'a str,
}

/// The resources a mesh file describes, in Istio's default cluster.
pub fn translate(mesh: &Mesh, trust_domain: &str) -> Resources {
    translate_in(mesh, &Origin { trust_domain, cluster_id: CLUSTER_ID })
}

/// The resources a mesh file describes.
pub fn translate_in(mesh: &Mesh, origin: &Origin<'_>) -> Resources {
    let mut r = Resources::default();
    let policies = super::authorization::convert(mesh);
    for pod in &mesh.pods {
        let selected = policies.selected.get(&pod.key()).map(Vec::as_slice).unwrap_or_default();
        let w = workload(mesh, pod, origin, selected);
        r.addresses.insert(w.uid.clone(), Address { r#type: Some(address::Type::Workload(w)) });
    }
    for s in &mesh.services {
        let svc = Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            addresses: s
                .addresses
                .iter()
                .map(|ip| NetworkAddress { network: String::new(), address: ip_bytes(ip), length: None })
                .collect(),
            ports: s
                .ports
                .iter()
                .map(|p| Port {
                    service_port: p.port.into(),
                    target_port: p.target_port.into(),
                    app_protocol: 0,
                })
                .collect(),
            ..Default::default()
        };
        r.addresses.insert(s.key(), Address { r#type: Some(address::Type::Service(svc)) });
    }
    r.authorizations = policies.resources;
    r
}
