//! Outbound: a connection an enrolled pod made, steered to the pod-local 15001 listener by the
//! connect hook. The original destination comes from the eBPF map; the mesh state routes it:
//! a service address goes to one of the service's healthy endpoints, a workload address to
//! that workload; a workload in the mesh (on this node or another) is reached through an
//! HBONE tunnel to its 15008 as this pod's identity, anything else directly; an address the
//! mesh does not know is passed through or refused (`--unknown-destination`). The proxy's
//! socket is made in the pod's netns, so the network sees the pod's address.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use futures::future::Either;
use tokio::net::TcpStream;

use super::{refuse, upstream, ConnRecord, Inner, UnknownDestination};
use crate::pod::{PodCtx, Refusal};
use crate::{
    capture::addr,
    identity::Identity,
    state::{Route, Tunnel, Workload},
};

/// The connection's far side, once set up.
enum Leg {
    Plain(TcpStream),
    Tunnel(super::hbone::client::Tunnel),
}

/// What a relayed connection holds while its bytes flow: every idle connection keeps this
/// (and the relay's state), so what only the setup needs stays in the setup's allocation.
struct Ready<'p> {
    record: ConnRecord<'p>,
    client: TcpStream,
    leg: Leg,
    started: Instant,
}

/// A connection as accepted on a pod's outbound listener.
pub(super) struct Accepted {
    pub inner: Arc<Inner>,
    pub pod: Arc<PodCtx>,
    pub client: TcpStream,
    pub peer: SocketAddr,
    /// The listener's address, which is the accepted socket's local address.
    pub local: SocketAddr,
}

/// The task's future itself (no wrapping block). One boxed argument: an async fn keeps its
/// arguments' slots for its whole life, even after they were moved out, so separate
/// arguments (a socket and two addresses) would size every connection's task for them.
pub(super) async fn handle(accepted: Box<Accepted>) {
    // Moved out in a block of its own: the box is freed at the end of the scope that owns
    // it, which would otherwise be the connection's whole life.
    let Accepted { inner, pod, client, peer, local } = {
        let accepted = accepted;
        *accepted
    };
    // Boxed: routing, connecting and handshakes are freed before the relay starts instead
    // of sizing the task for the connection's whole life.
    let Some(Ready { record, client, leg, started }) =
        Box::pin(set_up(&inner, &pod, client, peer, local)).await
    else {
        return;
    };
    let open = inner.opened(&record);
    let counters = &open.counters;
    // The far side is taken apart in a block that ends before the relay runs: a local
    // matched by parts keeps its whole slot in the task until its scope ends, so the socket
    // and stream halves the relay took would be kept twice.
    let (transfer, lease) = {
        let (client, leg) = (client, leg);
        match leg {
            // Boxed: the plain relay's future is almost four times the tunnel's, and a task
            // is sized for its largest state; unboxed, every tunnelled connection (the
            // common case) would carry it.
            Leg::Plain(upstream) => {
                (Either::Left(Box::pin(super::relay::relay(client, upstream, counters, None))), None)
            }
            Leg::Tunnel(t) => {
                let early = t.early;
                let (send, recv, lease) = t.into_parts();
                let end = super::hbone::End::Connecting;
                let relay = super::hbone::relay(client, send, recv, counters, end, None).sent_early(early);
                (Either::Right(relay), Some(lease))
            }
        }
    };
    let transfer = transfer.await;
    // The tunnel's place in its pooled connection is given back once its bytes are done.
    drop(lease);
    inner.closed(&record, &open, &transfer, started);
}

/// Refuses (see [`refuse`]): no relay follows.
fn refused<'p>(
    inner: &Inner,
    record: &ConnRecord<'_>,
    client: TcpStream,
    reason: Refusal,
    detail: &str,
) -> Option<Ready<'p>> {
    refuse(inner, record, client, reason, detail);
    None
}

/// Routes the connection and connects it (directly or through a tunnel); `None` when it
/// was refused (counted, logged and reset here).
async fn set_up<'p>(
    inner: &Inner,
    pod: &'p PodCtx,
    client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Option<Ready<'p>> {
    let started = Instant::now();
    let dst = match inner.orig.take(&addr::conn_key(pod.netns.cookie(), peer, local)) {
        Ok(Some(orig)) => addr::orig_dst_addr(&orig),
        Ok(None) => None,
        Err(e) => {
            return refused(
                inner,
                &ConnRecord::outbound(pod, peer, None),
                client,
                Refusal::MapError,
                &e.to_string(),
            )
        }
    };
    let Some(dst) = dst else {
        // A process in the pod connected to 127.0.0.1:15001 itself, or the record was lost.
        let detail = "no original destination recorded for this connection";
        return refused(
            inner,
            &ConnRecord::outbound(pod, peer, None),
            client,
            Refusal::NoOriginalDestination,
            detail,
        );
    };
    if (dst.ip().is_loopback() && inner.settings.loopback_is_loop)
        || (pod.ips.contains(&dst.ip()) && inner.settings.own_ports.contains(&dst.port()))
    {
        let record = ConnRecord::outbound(pod, peer, Some(dst));
        return refused(inner, &record, client, Refusal::Loop, "destination is the proxy itself");
    }
    let route = inner.state.read().route(dst);
    match route {
        Route::Workload { workload, target, service } => {
            to_workload(inner, pod, client, peer, &workload, target, service, started).await
        }
        Route::Resolve { workload, hostname, port, service } => {
            match inner.lookup.lookup(&pod.netns, &*inner.sockets, inner.settings.mark, &hostname).await {
                Ok(addresses) => {
                    // Of the family the client used, else any.
                    let ip = addresses.iter().find(|a| a.is_ipv4() == dst.is_ipv4()).unwrap_or(&addresses[0]);
                    let target = SocketAddr::new(*ip, port);
                    to_workload(inner, pod, client, peer, &workload, target, Some(service), started).await
                }
                Err(e) => {
                    let mut record = ConnRecord::outbound(pod, peer, Some(dst));
                    record.dst_service = Some(service.as_str().into());
                    let detail = format!("endpoint {hostname} of service {service}: {e}");
                    refused(inner, &record, client, Refusal::UnresolvedEndpoint, &detail)
                }
            }
        }
        Route::NoEndpoint { service, reason } => {
            let mut record = ConnRecord::outbound(pod, peer, Some(dst));
            record.dst_service = Some(service.as_str().into());
            refused(inner, &record, client, reason, &format!("service {service} has no endpoint for {dst}"))
        }
        Route::NotSynced => {
            let record = ConnRecord::outbound(pod, peer, Some(dst));
            refused(
                inner,
                &record,
                client,
                Refusal::NotSynced,
                "no complete view of the mesh yet (first xDS sync pending)",
            )
        }
        Route::Unknown => match inner.settings.unknown {
            UnknownDestination::Passthrough => {
                passthrough(inner, pod, client, peer, dst, None, started).await
            }
            UnknownDestination::Refuse => {
                let record = ConnRecord::outbound(pod, peer, Some(dst));
                refused(
                    inner,
                    &record,
                    client,
                    Refusal::UnknownDestination,
                    "the destination is not part of the mesh",
                )
            }
        },
    }
}

/// Connects to a workload chosen by the route: through HBONE when it is in the mesh and this
/// proxy has identities, directly otherwise.
#[allow(clippy::too_many_arguments)]
async fn to_workload<'p>(
    inner: &Inner,
    pod: &'p PodCtx,
    client: TcpStream,
    peer: SocketAddr,
    workload: &Arc<Workload>,
    target: SocketAddr,
    service: Option<String>,
    started: Instant,
) -> Option<Ready<'p>> {
    let service = service.map(String::into_boxed_str);
    let mtls = workload.tunnel == Tunnel::Hbone && inner.identities.enabled();
    match (mtls, pod.identity.as_ref()) {
        (true, Some(src_identity)) => {
            let mut record = ConnRecord::outbound(pod, peer, Some(target));
            // Formatted once per workload version, in the metrics' side cache.
            record.dst_identity = Some(inner.metrics.sides.of_workload(workload).principal.clone());
            record.dst_service = service;
            record.mtls = true;
            hbone(inner, pod, client, record, target, src_identity, &workload.identity, started).await
        }
        _ => passthrough(inner, pod, client, peer, target, service, started).await,
    }
}

async fn passthrough<'p>(
    inner: &Inner,
    pod: &'p PodCtx,
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    service: Option<Box<str>>,
    started: Instant,
) -> Option<Ready<'p>> {
    let s = &inner.settings;
    match upstream::connect(&*inner.sockets, &pod.netns, dst, s.mark, s.connect_timeout).await {
        Ok(upstream) => {
            let mut record = ConnRecord::outbound(pod, upstream.local_addr().unwrap_or(peer), Some(dst));
            record.dst_service = service;
            record.leg = crate::os::netns::socket_cookie(&upstream).ok();
            Some(Ready { record, client, leg: Leg::Plain(upstream), started })
        }
        Err(e) => {
            let mut record = ConnRecord::outbound(pod, peer, Some(dst));
            record.dst_service = service;
            refused(inner, &record, client, Refusal::ConnectFailed, &e.to_string())
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn hbone<'p>(
    inner: &Inner,
    pod: &'p PodCtx,
    client: TcpStream,
    mut record: ConnRecord<'p>,
    dst: SocketAddr,
    src_identity: &Identity,
    dst_identity: &Identity,
    started: Instant,
) -> Option<Ready<'p>> {
    let peer = record.src;
    // The source as the network sees it (the pod's address of the destination's family), in
    // the refusal's record too: the accepted socket's peer is the capture's loopback.
    if let Some(ip) = pod.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()) {
        record.src = SocketAddr::new(*ip, peer.port());
    }
    // The service key is `<namespace>/<hostname>`.
    let service = record.dst_service.as_deref().and_then(|k| k.split_once('/')).map(|(_, host)| host);
    let open =
        inner.hbone.open(pod, &client, src_identity, dst, dst_identity, inner.settings.hbone_port, service);
    let tunnel = match open.await {
        Ok(t) => t,
        Err(e) => return refused(inner, &record, client, e.reason(), &e.to_string()),
    };
    record.leg = tunnel.socket_cookie;
    Some(Ready { record, client, leg: Leg::Tunnel(tunnel), started })
}
