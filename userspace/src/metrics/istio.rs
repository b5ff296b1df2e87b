//! Istio's TCP metrics, with the labels Istio's dashboards and Kiali key on
//! (`../shared/reference/wire.md`): one label set per connection and reporter.

use prometheus::{IntCounterVec, Registry};

use crate::{identity::Identity, state::Workload};

pub const UNKNOWN: &str = "unknown";

/// The labels, in the order [`TcpLabels::values`] gives them.
pub const LABELS: [&str; 19] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
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
    /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
    pub principal: String,
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
            principal: w.identity.to_string(),
            app: or_unknown(if w.canonical_name.is_empty() { workload } else { &w.canonical_name }),
            version: or_unknown(&w.canonical_revision),
            cluster: or_unknown(&w.cluster_id),
        }
    }

    /// A peer known only by its verified identity.
    pub fn of_identity(id: &Identity) -> Side {
        Side { namespace: id.namespace.clone(), principal: id.to_string(), ..Side::unknown() }
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
    pub source: Side,
    pub destination: Side,
    pub service: Option<ServiceLabel>,
    pub mtls: bool,
}

/// `response_flags`: no flag, denied by policy, upstream connect failed (ztunnel's values).
pub const FLAGS_NONE: &str = "-";
pub const FLAGS_DENY: &str = "DENY";
pub const FLAGS_CONNECT: &str = "CONNECT";

impl TcpLabels {
    pub fn values<'a>(&'a self, response_flags: &'a str) -> [&'a str; 19] {
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
            &s.namespace,
            &s.principal,
            &s.app,
            &s.version,
            &s.cluster,
            host,
            ns,
            name,
            &d.workload,
            &d.namespace,
            &d.principal,
            &d.app,
            &d.version,
            &d.cluster,
            "tcp",
            response_flags,
            if self.mtls { "mutual_tls" } else { "none" },
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
