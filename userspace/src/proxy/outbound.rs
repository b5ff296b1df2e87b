//! Outbound: a connection an enrolled pod made, steered to the pod-local 15001 listener by the
//! connect hook. The original destination comes from the eBPF map; the mesh state routes it:
//! a service address goes to one of the service's healthy endpoints, a workload address to
//! that workload; a workload in the mesh (on this node or another) is reached through an
//! HBONE tunnel to its 15008 as this pod's identity, anything else directly; an address the
//! mesh does not know is passed through or refused (`--unknown-destination`). The proxy's
//! socket is made in the pod's netns, so the network sees the pod's address.

use std::{net::SocketAddr, time::Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{finish, refuse, upstream, ConnRecord, Inner, PodCtx, UnknownDestination};
use crate::{
    capture::addr,
    identity::Identity,
    state::{Route, Tunnel},
};

pub(super) async fn handle(inner: &Inner, pod: &PodCtx, client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            return refuse(
                inner,
                &ConnRecord::outbound(pod, peer, None),
                client,
                "socket_error",
                &e.to_string(),
            )
        }
    };
    let dst = match inner.orig.take(&addr::conn_key(pod.netns.cookie(), peer, local)) {
        Ok(Some(orig)) => addr::orig_dst_addr(&orig),
        Ok(None) => None,
        Err(e) => {
            return refuse(inner, &ConnRecord::outbound(pod, peer, None), client, "map_error", &e.to_string())
        }
    };
    let Some(dst) = dst else {
        // A process in the pod connected to 127.0.0.1:15001 itself, or the record was lost.
        let detail = "no original destination recorded for this connection";
        return refuse(
            inner,
            &ConnRecord::outbound(pod, peer, None),
            client,
            "no_original_destination",
            detail,
        );
    };
    if dst.ip().is_loopback()
        || (pod.ips.contains(&dst.ip()) && inner.settings.own_ports.contains(&dst.port()))
    {
        let record = ConnRecord::outbound(pod, peer, Some(dst));
        return refuse(inner, &record, client, "loop", "destination is the proxy itself");
    }
    let route = inner.state.read().route(dst);
    match route {
        Route::Workload { workload, target, service } => {
            let mtls = workload.tunnel == Tunnel::Hbone && inner.identities.enabled();
            match (mtls, pod.identity.as_ref()) {
                (true, Some(src_identity)) => {
                    let mut record = ConnRecord::outbound(pod, peer, Some(target));
                    record.dst_identity = Some(workload.identity.to_string());
                    record.dst_service = service;
                    record.mtls = true;
                    hbone(inner, pod, client, record, target, src_identity, &workload.identity, started).await
                }
                _ => passthrough(inner, pod, client, peer, target, service, started).await,
            }
        }
        Route::NoEndpoint { service, reason } => {
            let mut record = ConnRecord::outbound(pod, peer, Some(dst));
            record.dst_service = Some(service.clone());
            refuse(inner, &record, client, reason, &format!("service {service} has no endpoint for {dst}"))
        }
        Route::NotSynced => {
            let record = ConnRecord::outbound(pod, peer, Some(dst));
            refuse(
                inner,
                &record,
                client,
                "not_synced",
                "no complete view of the mesh yet (first xDS sync pending)",
            )
        }
        Route::Unknown => match inner.settings.unknown {
            UnknownDestination::Passthrough => {
                passthrough(inner, pod, client, peer, dst, None, started).await
            }
            UnknownDestination::Refuse => {
                let record = ConnRecord::outbound(pod, peer, Some(dst));
                refuse(
                    inner,
                    &record,
                    client,
                    "unknown_destination",
                    "the destination is not part of the mesh",
                )
            }
        },
    }
}

async fn passthrough(
    inner: &Inner,
    pod: &PodCtx,
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    service: Option<String>,
    started: Instant,
) {
    let s = &inner.settings;
    match upstream::connect(&pod.netns, dst, s.mark, s.connect_timeout).await {
        Ok(upstream) => {
            let mut record = ConnRecord::outbound(pod, upstream.local_addr().unwrap_or(peer), Some(dst));
            record.dst_service = service;
            record.leg = crate::inpod::netns::socket_cookie(&upstream).ok();
            finish(inner, record, client, upstream, started, &CancellationToken::new()).await
        }
        Err(e) => {
            let mut record = ConnRecord::outbound(pod, peer, Some(dst));
            record.dst_service = service;
            refuse(inner, &record, client, "connect_failed", &e.to_string())
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn hbone(
    inner: &Inner,
    pod: &PodCtx,
    client: TcpStream,
    mut record: ConnRecord<'_>,
    dst: SocketAddr,
    src_identity: &Identity,
    dst_identity: &Identity,
    started: Instant,
) {
    let peer = record.src;
    let tunnel = match inner.hbone.open(pod, src_identity, dst, dst_identity, inner.settings.hbone_port).await
    {
        Ok(t) => t,
        Err(e) => return refuse(inner, &record, client, e.reason(), &e.to_string()),
    };
    record.leg = tunnel.socket_cookie;
    // The source as the network sees it: the pod's address of the destination's family.
    if let Some(ip) = pod.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()) {
        record.src = SocketAddr::new(*ip, peer.port());
    }
    let open = inner.opened(&record);
    let counters = &open.counters;
    let never = CancellationToken::new();
    let transfer = super::hbone::relay(
        client,
        tunnel.send,
        tunnel.recv,
        (&counters.request, &counters.response),
        &never,
    )
    .await;
    inner.closed(&record, &open, &transfer, started);
}
