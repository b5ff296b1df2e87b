//! Istio's TCP metrics, with the labels Istio's dashboards and Kiali key on
//! (docs/observability.md): one label set per connection and reporter.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use prometheus::{IntCounterVec, Registry};

use crate::{identity::Identity, state::Workload};

pub const UNKNOWN: &str = "unknown";

/// The labels, in the order [`TcpLabels::values`] gives them: ztunnel's set and order. The
/// canonical service and revision are what Kiali's graph groups by (it drops a series that
/// lacks one); `*_app` and `*_version` carry the same values, as in ztunnel.
pub const LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// One end of a connection as the metrics describe it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Side {
    pub workload: String,
    pub namespace: String,
    /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>`; shared with the connection records that
    /// name the workload's identity.
    pub principal: Arc<str>,
    pub app: String,
    pub version: String,
    pub cluster: String,
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_string()
    } else {
        s.to_string()
    }
}

impl Side {
    pub fn unknown() -> Side {
        Side {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }

    /// A workload the mesh describes.
    pub fn of_workload(w: &Workload) -> Side {
        let workload = if w.workload_name.is_empty() { &w.name } else { &w.workload_name };
        Side {
            workload: or_unknown(workload),
            namespace: or_unknown(&w.namespace),
            principal: w.identity.to_string().into(),
            app: or_unknown(if w.canonical_name.is_empty() { workload } else { &w.canonical_name }),
            version: or_unknown(&w.canonical_revision),
            cluster: or_unknown(&w.cluster_id),
        }
    }

    /// A peer known only by its verified identity.
    pub fn of_identity(id: &Identity) -> Side {
        Side { namespace: id.namespace.clone(), principal: id.to_string().into(), ..Side::unknown() }
    }
}

/// Each mesh workload's [`Side`], made once per version of the workload instead of once per
/// connection: six strings and a formatted SPIFFE URI per side and connection were, with the
/// copies made to look the counters up, a tenth of the proxy's instructions per new
/// connection (callgrind, connection storm).
#[derive(Default)]
pub struct SideCache {
    /// Keyed by the workload's address. The `Weak` keeps that allocation from being reused
    /// while the entry exists, so an address match is the same (immutable) workload version.
    sides: Mutex<HashMap<usize, CachedSide>>,
}

/// A workload version (held weakly) and its side.
type CachedSide = (Weak<Workload>, Arc<Side>);

/// Entries kept before the cache starts over (stale versions are dropped that way).
const SIDE_CACHE_MAX: usize = 4096;

impl SideCache {
    pub fn of_workload(&self, w: &Arc<Workload>) -> Arc<Side> {
        let key = Arc::as_ptr(w) as usize;
        let mut sides = self.sides.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((held, side)) = sides.get(&key) {
            if held.as_ptr() == Arc::as_ptr(w) {
                return side.clone();
            }
        }
        if sides.len() >= SIDE_CACHE_MAX {
            sides.clear();
        }
        let side = Arc::new(Side::of_workload(w));
        sides.insert(key, (Arc::downgrade(w), side.clone()));
        side
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sides.lock().unwrap().len()
    }
}

/// Who reports a connection: the proxy of its source, or of its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// The service a client dialled.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceLabel {
    pub hostname: String,
    pub name: String,
    pub namespace: String,
}

/// Everything but `response_flags`, which is known only at the end.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source: Arc<Side>,
    pub destination: Arc<Side>,
    pub service: Option<ServiceLabel>,
    pub mtls: bool,
}

impl TcpLabels {
    pub fn values<'a>(&'a self, response_flags: &'a str) -> [&'a str; 23] {
        let (host, name, ns) = match &self.service {
            Some(s) => (s.hostname.as_str(), s.name.as_str(), s.namespace.as_str()),
            None => (UNKNOWN, UNKNOWN, UNKNOWN),
        };
        let (s, d) = (&self.source, &self.destination);
        [
            match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            &s.workload,
            &s.app,
            &s.version,
            &s.namespace,
            &s.principal,
            &s.app,
            &s.version,
            &s.cluster,
            host,
            ns,
            name,
            &d.workload,
            &d.app,
            &d.version,
            &d.namespace,
            &d.principal,
            &d.app,
            &d.version,
            &d.cluster,
            "tcp",
            response_flags,
            // ztunnel's value for a connection without mTLS.
            if self.mtls { "mutual_tls" } else { UNKNOWN },
        ]
    }
}

/// The `istio_tcp_*` families.
pub struct IstioTcp {
    pub opened: IntCounterVec,
    pub closed: IntCounterVec,
    pub failed: IntCounterVec,
    /// Request direction: source → destination.
    pub received: IntCounterVec,
    /// Response direction: destination → source.
    pub sent: IntCounterVec,
}

impl IstioTcp {
    pub fn register(registry: &Registry) -> IstioTcp {
        let counter = |name: &str, help: &str| super::counter(registry, name, help, &LABELS);
        IstioTcp {
            opened: counter("istio_tcp_connections_opened_total", "TCP connections opened."),
            closed: counter("istio_tcp_connections_closed_total", "TCP connections closed."),
            failed: counter(
                "istio_tcp_connections_failed_total",
                "TCP connections that failed: refused by policy (response_flags=DENY) or not connected upstream (CONNECT).",
            ),
            received: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received during the request (source to destination).",
            ),
            sent: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent during the response (destination to source).",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::Tunnel;

    fn workload(name: &str, version: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: format!("k/demo/{name}"),
            name: name.into(),
            namespace: "demo".into(),
            addresses: vec![],
            hostname: None,
            node: "n1".into(),
            identity: Identity {
                trust_domain: "td".into(),
                namespace: "demo".into(),
                service_account: "sa".into(),
            },
            tunnel: Tunnel::Hbone,
            healthy: true,
            services: BTreeMap::new(),
            authorization_policies: vec![],
            canonical_name: String::new(),
            canonical_revision: version.into(),
            workload_name: String::new(),
            cluster_id: String::new(),
        })
    }

    #[test]
    fn a_workload_s_side_is_made_once_per_version_of_it() {
        let cache = SideCache::default();
        let a = workload("a", "v1");
        let first = cache.of_workload(&a);
        assert_eq!(*first, Side::of_workload(&a), "the cached side says what a fresh one says");
        assert_eq!(&*first.principal, "spiffe://td/ns/demo/sa/sa");
        assert!(Arc::ptr_eq(&first, &cache.of_workload(&a)), "the same version: the same side");

        // An xDS update replaces the workload: a new version, new labels.
        let a2 = workload("a", "v2");
        let second = cache.of_workload(&a2);
        assert_eq!(second.version, "v2");
        assert_eq!(first.version, "v1", "sides already handed out keep their labels");

        // A version dropped from the state can't be confused with whatever is made next.
        drop(a);
        let b = workload("b", "v1");
        assert_eq!(cache.of_workload(&b).workload, "b");
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn the_side_cache_is_bounded() {
        let cache = SideCache::default();
        let held: Vec<_> = (0..SIDE_CACHE_MAX + 10).map(|i| workload(&format!("w{i}"), "v1")).collect();
        for w in &held {
            cache.of_workload(w);
        }
        assert!(cache.len() <= SIDE_CACHE_MAX, "{}", cache.len());
    }
}
