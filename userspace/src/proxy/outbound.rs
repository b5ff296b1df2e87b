//! Outbound: a connection an enrolled pod made, steered to the pod-local 15001 listener by the
//! connect hook. The original destination comes from the eBPF map; the proxy connects there
//! from inside the pod's netns.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{finish, refuse, upstream, Inner, PodCtx};
use crate::{capture::addr, inpod::Direction};

pub(super) async fn handle(inner: &Inner, pod: &PodCtx, client: TcpStream, peer: SocketAddr) {
    let started = std::time::Instant::now();
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            return refuse(
                inner,
                pod,
                Direction::Outbound,
                client,
                peer,
                None,
                "socket_error",
                &e.to_string(),
            )
        }
    };
    let key = addr::conn_key(pod.netns.cookie(), peer, local);
    let orig = match inner.orig.take(&key) {
        Ok(Some(orig)) => addr::orig_dst_addr(&orig),
        Ok(None) => None,
        Err(e) => {
            return refuse(
                inner,
                pod,
                Direction::Outbound,
                client,
                peer,
                None,
                "map_error",
                &e.to_string(),
            );
        }
    };
    let Some(dst) = orig else {
        // A process in the pod connected to 127.0.0.1:15001 itself, or the record was lost.
        return refuse(
            inner,
            pod,
            Direction::Outbound,
            client,
            peer,
            None,
            "no_original_destination",
            "no original destination recorded for this connection",
        );
    };
    if dst.ip().is_loopback()
        || (pod.ips.contains(&dst.ip()) && inner.settings.own_ports.contains(&dst.port()))
    {
        return refuse(
            inner,
            pod,
            Direction::Outbound,
            client,
            peer,
            Some(dst),
            "loop",
            "destination is the proxy itself",
        );
    }
    let upstream = match upstream::connect(
        &pod.netns,
        dst,
        inner.settings.mark,
        inner.settings.connect_timeout,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                inner,
                pod,
                Direction::Outbound,
                client,
                peer,
                Some(dst),
                "connect_failed",
                &e.to_string(),
            );
        }
    };
    finish(
        inner,
        pod,
        Direction::Outbound,
        client,
        upstream,
        peer,
        dst,
        started,
    )
    .await;
}
