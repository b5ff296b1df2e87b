//! What the proxy knows of the mesh beyond its own node: every workload by IP, with its node,
//! identity and whether it is enrolled — which decides how an outbound connection travels.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use crate::{capture::addr, identity::Identity, meshfile::Mesh};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub identity: Identity,
    /// Enrolled in the mesh: reachable through HBONE on its IP, port 15008.
    pub enrolled: bool,
}

#[derive(Debug, Default)]
pub struct Workloads {
    by_ip: HashMap<IpAddr, Workload>,
}

impl Workloads {
    pub fn from_mesh(mesh: &Mesh, trust_domain: &str) -> Workloads {
        let mut by_ip = HashMap::new();
        for pod in &mesh.pods {
            let w = Workload {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                node: pod.node.clone(),
                identity: Identity::new(trust_domain, &pod.namespace, &pod.service_account),
                enrolled: mesh.is_enrolled(pod),
            };
            for ip in &pod.ips {
                by_ip.insert(addr::canonical(*ip), w.clone());
            }
        }
        Workloads { by_ip }
    }

    pub fn get(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&addr::canonical(ip))
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// The current workload set, replaced as a whole on every mesh change.
#[derive(Debug, Default)]
pub struct WorkloadStore(RwLock<Arc<Workloads>>);

impl WorkloadStore {
    pub fn load(&self) -> Arc<Workloads> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn store(&self, w: Workloads) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(w);
    }
}
