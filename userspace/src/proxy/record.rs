//! What the proxy says about one connection — the access-log line, the refusal, the metrics'
//! labels — gathered in one record.

use std::sync::Arc;

use crate::{
    identity::Identity,
    metrics::{Reporter, ServiceLabel, Side, SideCache, TcpLabels},
    pod::Direction,
    state::MeshState,
};

use crate::pod::PodCtx;

/// What an access-log line and a refusal say about a connection.
pub struct ConnRecord<'a> {
    pub direction: Direction,
    pub pod: &'a PodCtx,
    /// Where the connection comes from, as the network sees it.
    pub src: std::net::SocketAddr,
    pub dst: Option<std::net::SocketAddr>,
    /// Shared, not copied: an open connection keeps its record until it closes.
    pub src_identity: Option<Arc<str>>,
    pub dst_identity: Option<Arc<str>>,
    /// The service the destination was chosen for, when the client dialled a service address.
    pub dst_service: Option<Box<str>>,
    /// Whether it travelled (or arrived) over mutual TLS.
    pub mtls: bool,
    /// `SO_COOKIE` of the socket that carries it over the network (the upstream, the
    /// accepted client, or the HBONE connection), for the kernel's figures.
    pub leg: Option<crate::os::cookie::SocketCookie>,
    /// Delivered from the client's address: counted in the pod's `deliveries` until this
    /// record (which lives as long as the connection) is dropped. A flag, not a guard: every
    /// open connection keeps its record, and the tunnel task has no 8 bytes to spare.
    delivered_from_client: bool,
}

impl ConnRecord<'_> {
    /// Counts the connection as delivered from the client's address, until the record goes.
    pub fn count_delivery(&mut self) {
        if !self.delivered_from_client {
            self.pod.deliveries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.delivered_from_client = true;
        }
    }
}

impl Drop for ConnRecord<'_> {
    fn drop(&mut self) {
        if self.delivered_from_client {
            self.pod.deliveries.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl<'a> ConnRecord<'a> {
    pub fn outbound(pod: &'a PodCtx, src: std::net::SocketAddr, dst: Option<std::net::SocketAddr>) -> Self {
        ConnRecord {
            direction: Direction::Outbound,
            pod,
            src,
            dst,
            src_identity: pod.identity_uri.clone(),
            dst_identity: None,
            dst_service: None,
            mtls: false,
            leg: None,
            delivered_from_client: false,
        }
    }

    pub fn inbound(
        pod: &'a PodCtx,
        src: std::net::SocketAddr,
        dst: Option<std::net::SocketAddr>,
        peer: Option<&Arc<str>>,
        mtls: bool,
    ) -> Self {
        ConnRecord {
            direction: Direction::Inbound,
            pod,
            src,
            dst,
            src_identity: peer.cloned(),
            dst_identity: pod.identity_uri.clone(),
            dst_service: None,
            mtls,
            leg: None,
            delivered_from_client: false,
        }
    }
}

impl ConnRecord<'_> {
    /// The local pod's side, with what the mesh says about its workload.
    fn own_side(&self, state: &MeshState, sides: &SideCache) -> Arc<Side> {
        let pod = self.pod;
        match pod.ips.iter().find_map(|ip| state.workload_by_ip(*ip)) {
            Some(w) => sides.of_workload(&w),
            None => Arc::new(Side {
                workload: pod.name.clone(),
                namespace: pod.namespace.clone(),
                principal: pod.identity_uri.clone().unwrap_or_else(|| "unknown".into()),
                app: pod.app.clone(),
                ..Side::unknown()
            }),
        }
    }

    /// The other end: the workload at `addr` if the mesh knows it, else what its identity says.
    fn peer_side(
        state: &MeshState,
        sides: &SideCache,
        addr: Option<std::net::SocketAddr>,
        identity: Option<&str>,
    ) -> Arc<Side> {
        if let Some(w) = addr.and_then(|a| state.workload_by_ip(a.ip())) {
            return sides.of_workload(&w);
        }
        Arc::new(match identity.and_then(|i| i.parse::<Identity>().ok()) {
            Some(id) => Side::of_identity(&id),
            None => Side::unknown(),
        })
    }

    /// Istio's metric labels for this connection, as its reporter (this proxy) sees it.
    pub fn labels(&self, state: &MeshState, sides: &SideCache) -> TcpLabels {
        let service = self.dst_service.as_deref().and_then(|key| {
            state.service(key).map(|s| ServiceLabel {
                hostname: s.hostname.clone(),
                name: s.name.clone(),
                namespace: s.namespace.clone(),
            })
        });
        match self.direction {
            Direction::Outbound => TcpLabels {
                reporter: Reporter::Source,
                source: self.own_side(state, sides),
                destination: Self::peer_side(state, sides, self.dst, self.dst_identity.as_deref()),
                service,
                mtls: self.mtls,
            },
            Direction::Inbound | Direction::Hbone => TcpLabels {
                reporter: Reporter::Destination,
                source: Self::peer_side(state, sides, Some(self.src), self.src_identity.as_deref()),
                destination: self.own_side(state, sides),
                service,
                mtls: self.mtls,
            },
        }
    }
}
