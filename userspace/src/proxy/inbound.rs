//! Inbound plaintext: a connection to an enrolled pod, assigned to the pod-local 15006
//! listener by the TC program. The accepted socket's local address is the original
//! destination (the pod's IP and the application's port); the proxy connects to it from
//! inside the pod's netns, so the application sees a local connection.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{finish, refuse, upstream, Inner, PodCtx};
use crate::{capture::addr, inpod::Direction};

pub(super) async fn handle(inner: &Inner, pod: &PodCtx, client: TcpStream, peer: SocketAddr) {
    let started = std::time::Instant::now();
    let fail = |client, dst, reason, detail: &str| {
        refuse(inner, pod, Direction::Inbound, client, peer, dst, reason, detail);
    };
    let dst = match client.local_addr() {
        Ok(a) => SocketAddr::new(addr::canonical(a.ip()), a.port()),
        Err(e) => return fail(client, None, "socket_error", &e.to_string()),
    };
    if !pod.ips.contains(&dst.ip()) {
        // Reached the loopback listener directly from inside the pod, not through capture.
        return fail(client, Some(dst), "not_this_pod", "destination is not this pod's address");
    }
    if inner.settings.own_ports.contains(&dst.port()) {
        return fail(client, Some(dst), "loop", "destination is the proxy itself");
    }
    let s = &inner.settings;
    match upstream::connect(&pod.netns, dst, s.mark, s.connect_timeout).await {
        Ok(upstream) => finish(inner, pod, Direction::Inbound, client, upstream, peer, dst, started).await,
        Err(e) => fail(client, Some(dst), "connect_failed", &e.to_string()),
    }
}
