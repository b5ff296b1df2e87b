//! What the proxy knows of the mesh: workloads by uid and by IP, services by VIP and hostname
//! with their endpoints, authorization policies — from xDS (or the local mesh file, through
//! the same translation) — and the routing decision for an outbound connection.

pub mod model;
mod resources;
mod ztunnel;

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
};

use serde::Serialize;

pub use model::{Decoded, PortMap, Service, Tunnel, Workload};
pub use resources::{version_of, Resources};

use crate::{
    authz::{self, Policy},
    capture::addr,
    errors::{Invalid, Problem},
    pb::istio::security::Authorization,
    pb::istio::workload::Address,
};

/// The first disagreement between the state's indexes and what it holds: a bug, which the
/// property tests and the fuzzer look for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvariantBroken(String);

struct ServiceEntry {
    service: Service,
    /// Round-robin position.
    next: AtomicUsize,
}

/// Where an outbound connection goes.
#[derive(Debug)]
pub enum Route {
    /// A workload: connect to `target` (through HBONE when the workload is in the mesh).
    Workload { workload: Arc<Workload>, target: SocketAddr, service: Option<String> },
    /// A service endpoint known by name only: connect to `hostname`'s address on `port`.
    Resolve { workload: Arc<Workload>, hostname: String, port: u16, service: String },
    /// A service address with no endpoint to take the connection.
    NoEndpoint { service: String, reason: crate::pod::Refusal },
    /// Not an address of the mesh.
    Unknown,
    /// Not known yet: the first sync has not completed, so this may be a mesh address.
    NotSynced,
}

#[derive(Default)]
pub struct MeshState {
    workloads: HashMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, String>,
    services: HashMap<String, Arc<ServiceEntry>>,
    by_vip: HashMap<IpAddr, String>,
    /// Hostname → keys of the services of that name (one per namespace that defines it).
    by_host: HashMap<String, BTreeSet<String>>,
    /// Service key → uids of the workloads listing it.
    endpoints: HashMap<String, BTreeSet<String>>,
    /// Resource name → compiled policy.
    policies: HashMap<String, Arc<Policy>>,
    /// The same, indexed for evaluation: global ones, by namespace, and by `<ns>/<name>` (how
    /// workloads select them). Rebuilt on every policy change.
    global_policies: Vec<Arc<Policy>>,
    namespace_policies: HashMap<String, Vec<Arc<Policy>>>,
    selectable_policies: HashMap<String, Arc<Policy>>,
    /// Type URL → resource name → version: what `initial_resource_versions` reports.
    versions: HashMap<&'static str, HashMap<String, String>>,
    /// The source has delivered a complete first view (xDS: both types once; the mesh file:
    /// its first load). Before that, no address can be called unknown.
    synced: bool,
}

impl MeshState {
    fn unindex_workload(&mut self, uid: &str) {
        if let Some(old) = self.workloads.remove(uid) {
            for ip in old.addresses.iter().map(|ip| addr::canonical(*ip)) {
                if self.by_ip.get(&ip).is_some_and(|u| u == uid) {
                    // Another workload may hold the same address (host-network pods share
                    // their node's): it is reachable by it again, not lost with the index.
                    let heir = self
                        .workloads
                        .values()
                        .filter(|w| w.addresses.iter().any(|a| addr::canonical(*a) == ip))
                        .map(|w| w.uid.clone())
                        .min();
                    match heir {
                        Some(h) => self.by_ip.insert(ip, h),
                        None => self.by_ip.remove(&ip),
                    };
                }
            }
            for key in old.services.keys() {
                if let Some(set) = self.endpoints.get_mut(key) {
                    set.remove(uid);
                    if set.is_empty() {
                        self.endpoints.remove(key);
                    }
                }
            }
        }
    }

    fn unindex_service(&mut self, key: &str) {
        if let Some(old) = self.services.remove(key) {
            if let Some(keys) = self.by_host.get_mut(&old.service.hostname) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_host.remove(&old.service.hostname);
                }
            }
            for ip in old.service.vips.iter().map(|ip| addr::canonical(*ip)) {
                if self.by_vip.get(&ip).is_some_and(|k| k == key) {
                    let heir = self
                        .services
                        .values()
                        .filter(|e| e.service.vips.iter().any(|v| addr::canonical(*v) == ip))
                        .map(|e| e.service.key.clone())
                        .min();
                    match heir {
                        Some(h) => self.by_vip.insert(ip, h),
                        None => self.by_vip.remove(&ip),
                    };
                }
            }
        }
    }

    /// Checks that every index agrees with the resources held: each entry names a live
    /// resource that has the key, each address of a live resource is indexed, endpoints are
    /// live workloads of their service, and `route` agrees with `workload_by_ip`. The error
    /// names the first disagreement. (The property tests and the fuzzer call it after every
    /// change.)
    pub fn check_invariants(&self) -> Result<(), InvariantBroken> {
        for (ip, uid) in &self.by_ip {
            let w = self
                .workloads
                .get(uid)
                .ok_or_else(|| InvariantBroken(format!("by_ip {ip} -> {uid}: no such workload")))?;
            if !w.addresses.iter().any(|a| addr::canonical(*a) == *ip) {
                return Err(InvariantBroken(format!(
                    "by_ip {ip} -> {uid}, which does not have that address"
                )));
            }
        }
        for (ip, key) in &self.by_vip {
            let e = self
                .services
                .get(key)
                .ok_or_else(|| InvariantBroken(format!("by_vip {ip} -> {key}: no such service")))?;
            if !e.service.vips.iter().any(|a| addr::canonical(*a) == *ip) {
                return Err(InvariantBroken(format!(
                    "by_vip {ip} -> {key}, which does not have that address"
                )));
            }
        }
        for w in self.workloads.values() {
            for ip in &w.addresses {
                if !self.by_ip.contains_key(&addr::canonical(*ip)) {
                    return Err(InvariantBroken(format!("workload {} address {ip} is not indexed", w.uid)));
                }
            }
            for key in w.services.keys() {
                if !self.endpoints.get(key).is_some_and(|s| s.contains(&w.uid)) {
                    return Err(InvariantBroken(format!("workload {} is not an endpoint of {key}", w.uid)));
                }
            }
        }
        for (host, keys) in &self.by_host {
            if keys.is_empty() {
                return Err(InvariantBroken(format!("by_host {host}: an empty set is kept")));
            }
            for key in keys {
                if self.services.get(key).is_none_or(|e| e.service.hostname != *host) {
                    return Err(InvariantBroken(format!(
                        "by_host {host} lists {key}, which is not that host"
                    )));
                }
            }
        }
        for e in self.services.values() {
            if !self.by_host.get(&e.service.hostname).is_some_and(|k| k.contains(&e.service.key)) {
                return Err(InvariantBroken(format!(
                    "service {} is not indexed by its hostname",
                    e.service.key
                )));
            }
            for ip in &e.service.vips {
                if !self.by_vip.contains_key(&addr::canonical(*ip)) {
                    return Err(InvariantBroken(format!(
                        "service {} address {ip} is not indexed",
                        e.service.key
                    )));
                }
            }
        }
        for (key, uids) in &self.endpoints {
            if uids.is_empty() {
                return Err(InvariantBroken(format!("endpoints of {key}: an empty set is kept")));
            }
            for uid in uids {
                if !self.workloads.get(uid).is_some_and(|w| w.services.contains_key(key)) {
                    return Err(InvariantBroken(format!("endpoints of {key} list {uid}, which is not one")));
                }
            }
        }
        let indexed = self.global_policies.len()
            + self.namespace_policies.values().map(Vec::len).sum::<usize>()
            + self.selectable_policies.len();
        if indexed != self.policies.len()
            || self
                .global_policies
                .iter()
                .chain(self.namespace_policies.values().flatten())
                .chain(self.selectable_policies.values())
                .any(|p| !self.policies.get(&p.key).is_some_and(|q| Arc::ptr_eq(p, q)))
        {
            return Err(InvariantBroken(format!(
                "policy indexes hold {indexed} entries for {} policies",
                self.policies.len()
            )));
        }
        for (ip, uid) in &self.by_ip {
            if self.by_vip.contains_key(ip) {
                continue;
            }
            match self.route(SocketAddr::new(*ip, 8080)) {
                Route::Workload { workload, service: None, .. } if workload.uid == *uid => {}
                other => {
                    return Err(InvariantBroken(format!(
                        "route to {ip} is {other:?}, workload_by_ip says {uid}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Applies one `istio.workload.Address`. On error nothing changes: the previous version
    /// of the resource (if any) stays in force.
    pub fn apply_address(&mut self, name: &str, version: &str, a: &Address) -> Result<(), Invalid> {
        let decoded = Decoded::from_proto(a)?;
        if decoded.name() != name {
            let own = decoded.name().to_string();
            return Err(Problem::NameMismatch { served: name.to_string(), own }.at(decoded.name_field()));
        }
        self.unindex_workload(name);
        self.unindex_service(name);
        match decoded {
            Decoded::Workload(w) => {
                for ip in &w.addresses {
                    self.by_ip.insert(addr::canonical(*ip), w.uid.clone());
                }
                for key in w.services.keys() {
                    self.endpoints.entry(key.clone()).or_default().insert(w.uid.clone());
                }
                self.workloads.insert(w.uid.clone(), Arc::new(*w));
            }
            Decoded::Service(s) => {
                for ip in &s.vips {
                    self.by_vip.insert(addr::canonical(*ip), s.key.clone());
                }
                self.by_host.entry(s.hostname.clone()).or_default().insert(s.key.clone());
                self.services
                    .insert(s.key.clone(), Arc::new(ServiceEntry { service: s, next: AtomicUsize::new(0) }));
            }
        }
        self.versions
            .entry(crate::pb::ADDRESS_TYPE)
            .or_default()
            .insert(name.to_string(), version.to_string());
        Ok(())
    }

    /// Applies one `istio.security.Authorization`, compiled for evaluation. On error nothing
    /// changes: the previous version of the policy (if any) stays in force.
    pub fn apply_authorization(
        &mut self,
        name: &str,
        version: &str,
        a: &Authorization,
    ) -> Result<(), Invalid> {
        let policy = authz::compile(a)?;
        // Indexed by what the policy calls itself: a second name for it would shadow it.
        if policy.key != name {
            let own = policy.key.clone();
            return Err(Problem::NameMismatch { served: name.to_string(), own }.at("namespace/name"));
        }
        self.policies.insert(name.to_string(), Arc::new(policy));
        self.reindex_policies();
        self.versions
            .entry(crate::pb::AUTHORIZATION_TYPE)
            .or_default()
            .insert(name.to_string(), version.to_string());
        Ok(())
    }

    fn reindex_policies(&mut self) {
        self.global_policies.clear();
        self.namespace_policies.clear();
        self.selectable_policies.clear();
        let mut all: Vec<&Arc<Policy>> = self.policies.values().collect();
        // Evaluation order does not change decisions, but a stable one keeps logs stable.
        all.sort_by(|a, b| a.key.cmp(&b.key));
        for p in all {
            match p.scope {
                authz::Scope::Global => self.global_policies.push(p.clone()),
                authz::Scope::Namespace => {
                    self.namespace_policies.entry(p.namespace.clone()).or_default().push(p.clone());
                }
                authz::Scope::WorkloadSelector => {
                    self.selectable_policies.insert(p.key.clone(), p.clone());
                }
            }
        }
    }

    /// The policies that apply to a workload of `namespace` selecting `selected`.
    pub fn policies_for(&self, namespace: &str, selected: &[String]) -> Vec<Arc<Policy>> {
        let mut out = self.global_policies.clone();
        out.extend(self.namespace_policies.get(namespace).into_iter().flatten().cloned());
        out.extend(selected.iter().filter_map(|k| self.selectable_policies.get(k)).cloned());
        out
    }

    pub fn remove(&mut self, type_url: &str, name: &str) {
        if type_url == crate::pb::ADDRESS_TYPE {
            self.unindex_workload(name);
            self.unindex_service(name);
        } else if self.policies.remove(name).is_some() {
            self.reindex_policies();
        }
        if let Some(v) = self.versions.get_mut(type_url) {
            v.remove(name);
        }
    }

    pub fn mark_synced(&mut self) {
        self.synced = true;
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Resource versions held for `type_url`.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.versions.get(type_url).cloned().unwrap_or_default()
    }

    /// The service one of whose addresses `ip` is.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.by_vip.get(&addr::canonical(ip)).and_then(|k| self.service(k))
    }

    /// A service by key (`<namespace>/<hostname>`).
    pub fn service(&self, key: &str) -> Option<&Service> {
        self.services.get(key).map(|e| &e.service)
    }

    /// The addresses a DNS name of the mesh resolves to, asked from `namespace`: the service
    /// of that hostname in the asker's namespace if there is one, else the first by key; its
    /// VIPs, or for a service without any (headless) its healthy endpoints' addresses.
    /// `None`: no service has that hostname.
    pub fn host_addresses(&self, hostname: &str, namespace: &str) -> Option<Vec<IpAddr>> {
        let keys = self.by_host.get(hostname)?;
        let own = format!("{namespace}/{hostname}");
        let key = if keys.contains(&own) { &own } else { keys.first()? };
        let service = &self.services.get(key)?.service;
        if !service.vips.is_empty() {
            return Some(service.vips.clone());
        }
        let endpoints = self.endpoints.get(key).into_iter().flatten();
        Some(
            endpoints
                .filter_map(|uid| self.workloads.get(uid))
                .filter(|w| w.healthy)
                .flat_map(|w| w.addresses.iter().copied())
                .collect(),
        )
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.by_ip.get(&addr::canonical(ip)).and_then(|uid| self.workloads.get(uid)).cloned()
    }

    /// The service an inbound connection to `dst` was for, as ztunnel guesses it: among the
    /// services of the workload at `dst`, the one named `host` (the client's `forwarded`
    /// `host=`), else the first one that sends its traffic to `dst`'s port. Only for naming
    /// `destination_service`: a service the workload is not part of is never named.
    pub fn inbound_service(&self, dst: std::net::SocketAddr, host: Option<&str>) -> Option<&str> {
        let w = self.workload_by_ip(dst.ip())?;
        let named = host.and_then(|h| {
            w.services.keys().find(|k| k.split_once('/').is_some_and(|(_, hostname)| hostname == h))
        });
        let key = named.or_else(|| {
            w.services
                .iter()
                .find(|(_, ports)| ports.iter().any(|p| p.target_port == dst.port()))
                .map(|(k, _)| k)
        })?;
        // The workload's own list names keys; the state's entry outlives this borrow.
        self.services.get_key_value(key.as_str()).map(|(k, _)| k.as_str())
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (self.workloads.len(), self.services.len(), self.policies.len())
    }

    /// Index sizes, to check that updates never leave entries behind.
    pub fn index_sizes(&self) -> (usize, usize, usize) {
        (self.by_ip.len(), self.by_vip.len(), self.endpoints.values().map(BTreeSet::len).sum())
    }

    /// Where a connection to `dst` goes: a workload address is itself; a service address
    /// (VIP and one of its ports) is one of its healthy endpoints, round robin, on the
    /// endpoint's target port. Before the first sync an address not (yet) known is
    /// [`Route::NotSynced`], never unknown.
    pub fn route(&self, dst: SocketAddr) -> Route {
        let ip = addr::canonical(dst.ip());
        if let Some(key) = self.by_vip.get(&ip) {
            let Some(entry) = self.services.get(key) else { return Route::Unknown };
            let svc = &entry.service;
            let Some(port) = svc.ports.iter().find(|p| p.service_port == dst.port()) else {
                return Route::NoEndpoint { service: key.clone(), reason: crate::pod::Refusal::NoSuchPort };
            };
            let candidates: Vec<&Arc<Workload>> = self
                .endpoints
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|uid| self.workloads.get(uid))
                .filter(|w| w.healthy && (!w.addresses.is_empty() || w.hostname.is_some()))
                .collect();
            if candidates.is_empty() {
                return Route::NoEndpoint {
                    service: key.clone(),
                    reason: crate::pod::Refusal::NoHealthyEndpoint,
                };
            }
            let w = candidates[entry.next.fetch_add(1, Ordering::Relaxed) % candidates.len()];
            let target_port = w
                .services
                .get(key)
                .and_then(|ports| ports.iter().find(|p| p.service_port == port.service_port))
                .map(|p| p.target_port)
                .filter(|p| *p != 0)
                .or(Some(port.target_port).filter(|p| *p != 0))
                .unwrap_or(port.service_port);
            if let (true, Some(hostname)) = (w.addresses.is_empty(), &w.hostname) {
                return Route::Resolve {
                    workload: w.clone(),
                    hostname: hostname.clone(),
                    port: target_port,
                    service: key.clone(),
                };
            }
            // The endpoint's address of the family the client used, else any.
            let target_ip =
                w.addresses.iter().find(|a| a.is_ipv4() == ip.is_ipv4()).unwrap_or(&w.addresses[0]);
            return Route::Workload {
                workload: w.clone(),
                target: SocketAddr::new(*target_ip, target_port),
                service: Some(key.clone()),
            };
        }
        match self.workload_by_ip(ip) {
            Some(w) => {
                Route::Workload { workload: w, target: SocketAddr::new(ip, dst.port()), service: None }
            }
            None if !self.synced => Route::NotSynced,
            None => Route::Unknown,
        }
    }

    pub fn dump(&self) -> StateDump {
        let mut workloads: Vec<Workload> = self.workloads.values().map(|w| (**w).clone()).collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<ServiceDump> = self
            .services
            .values()
            .map(|e| ServiceDump {
                service: e.service.clone(),
                endpoints: self
                    .endpoints
                    .get(&e.service.key)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
            })
            .collect();
        services.sort_by(|a, b| a.service.key.cmp(&b.service.key));
        let mut policies: Vec<Policy> = self.policies.values().map(|p| (**p).clone()).collect();
        policies.sort_by(|a, b| a.key.cmp(&b.key));
        StateDump { workloads, services, policies }
    }
}

#[derive(Debug, Serialize)]
pub struct ServiceDump {
    #[serde(flatten)]
    pub service: Service,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct StateDump {
    pub workloads: Vec<Workload>,
    pub services: Vec<ServiceDump>,
    pub policies: Vec<Policy>,
}

/// The shared state: read on every connection, written by the xDS client (or the mesh file).
pub struct StateStore {
    state: RwLock<MeshState>,
    /// Bumped after each batch of changes, so open connections can be re-checked.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for StateStore {
    fn default() -> Self {
        StateStore { state: RwLock::default(), changes: tokio::sync::watch::Sender::new(0) }
    }
}

impl StateStore {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, MeshState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, MeshState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the subscribers that a batch of changes was applied.
    pub fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Wakes on every [`StateStore::changed`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Makes the state exactly `resources` (the local mesh file's translation): changed
    /// resources applied, vanished ones removed. Returns errors per resource.
    pub fn replace_all(&self, resources: &Resources) -> Vec<(String, Invalid)> {
        use prost::Message;
        let mut errors = Vec::new();
        let mut st = self.write();
        let held = st.versions(crate::pb::ADDRESS_TYPE);
        for name in held.keys().filter(|n| !resources.addresses.contains_key(*n)).cloned().collect::<Vec<_>>()
        {
            st.remove(crate::pb::ADDRESS_TYPE, &name);
        }
        for (name, a) in &resources.addresses {
            let version = version_of(&a.encode_to_vec());
            if held.get(name) == Some(&version) {
                continue;
            }
            if let Err(e) = st.apply_address(name, &version, a) {
                errors.push((name.clone(), e));
            }
        }
        let held = st.versions(crate::pb::AUTHORIZATION_TYPE);
        for name in
            held.keys().filter(|n| !resources.authorizations.contains_key(*n)).cloned().collect::<Vec<_>>()
        {
            st.remove(crate::pb::AUTHORIZATION_TYPE, &name);
        }
        for (name, a) in &resources.authorizations {
            let version = version_of(&a.encode_to_vec());
            if held.get(name) != Some(&version) {
                if let Err(e) = st.apply_authorization(name, &version, a) {
                    errors.push((name.clone(), e));
                }
            }
        }
        st.mark_synced();
        drop(st);
        self.changed();
        errors
    }
}

#[cfg(test)]
mod tests;
