//! Outbound: a connection an enrolled pod made, steered to the pod-local 15001 listener by the
//! connect hook. The original destination comes from the eBPF map; the proxy connects there
//! from inside the pod's netns.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{finish, refuse, upstream, Inner, PodCtx};
use crate::{capture::addr, inpod::Direction};

pub(super) async fn handle(inner: &Inner, pod: &PodCtx, client: TcpStream, peer: SocketAddr) {
    let started = std::time::Instant::now();
    let fail = |client, dst, reason, detail: &str| {
        refuse(inner, pod, Direction::Outbound, client, peer, dst, reason, detail);
    };
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => return fail(client, None, "socket_error", &e.to_string()),
    };
    let dst = match inner.orig.take(&addr::conn_key(pod.netns.cookie(), peer, local)) {
        Ok(Some(orig)) => addr::orig_dst_addr(&orig),
        Ok(None) => None,
        Err(e) => return fail(client, None, "map_error", &e.to_string()),
    };
    let Some(dst) = dst else {
        // A process in the pod connected to 127.0.0.1:15001 itself, or the record was lost.
        let detail = "no original destination recorded for this connection";
        return fail(client, None, "no_original_destination", detail);
    };
    if dst.ip().is_loopback()
        || (pod.ips.contains(&dst.ip()) && inner.settings.own_ports.contains(&dst.port()))
    {
        return fail(client, Some(dst), "loop", "destination is the proxy itself");
    }
    let s = &inner.settings;
    match upstream::connect(&pod.netns, dst, s.mark, s.connect_timeout).await {
        Ok(upstream) => finish(inner, pod, Direction::Outbound, client, upstream, peer, dst, started).await,
        Err(e) => fail(client, Some(dst), "connect_failed", &e.to_string()),
    }
}
