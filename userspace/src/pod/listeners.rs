//! The proxy's listeners inside a pod's network namespace.
//!
//! Capture listeners bind to loopback: the eBPF programs steer traffic to them (connect
//! rewrite for outbound, `bpf_sk_assign` for inbound), and nothing outside the pod can reach
//! them directly.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ambit_common::{maps::ListenerKey, AF_INET, AF_INET6};
use socket2::{Domain, Protocol, Socket, Type};

use super::Direction;
use crate::os::cookie::NetnsCookie;
use crate::os::netns::Netns;

/// A listening socket created in a pod's netns, not yet handed to the runtime.
pub struct PodListener {
    pub direction: Direction,
    /// What it serves: for inbound, the port is the capture map key's (the socket itself is
    /// bound to an ephemeral loopback port).
    pub addr: SocketAddr,
    pub socket: Socket,
}

impl PodListener {
    /// The capture map entry of this listener; `None` for HBONE (not steered by eBPF).
    pub fn key(&self, netns_cookie: NetnsCookie) -> Option<ListenerKey> {
        if self.direction == Direction::Hbone {
            return None;
        }
        Some(self.capture_key(netns_cookie))
    }

    fn capture_key(&self, netns_cookie: NetnsCookie) -> ListenerKey {
        ListenerKey {
            netns_cookie: netns_cookie.0,
            family: if self.addr.is_ipv4() { AF_INET } else { AF_INET6 },
            port: self.addr.port(),
            _pad: 0,
        }
    }
}

/// Backlog of the capture listeners: bursts of connects queue here while the proxy accepts.
const BACKLOG: i32 = 4096;

fn listen(direction: Direction, addr: SocketAddr) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    let bind = if direction == Direction::Inbound {
        // Reached only through `bpf_sk_assign` by its map entry, never by address: an
        // ephemeral port, so that a successor (`--takeover`) has its own without
        // SO_REUSEPORT, which `bpf_sk_assign` refuses before Linux 6.5.
        SocketAddr::new(addr.ip(), 0)
    } else {
        // Outbound (the connect hook's rewrite target) and HBONE are reached by address: a
        // successor binds the same ones while this proxy drains.
        sock.set_reuse_port(true)?;
        addr
    };
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&bind.into())?;
    sock.listen(BACKLOG)?;
    Ok(sock)
}

/// With SO_REUSEPORT, connections queued on a closing listener are reset unless the netns
/// migrates them to another listener of the group (5.14+): the drain of a proxy that was
/// taken over must not reset what it had not accepted yet. Affects only reuseport groups.
fn migrate_on_close() {
    const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    // Opened from inside the pod's netns, so the file is that namespace's setting.
    if let Err(e) = std::fs::write(SYSCTL, "1") {
        tracing::debug!(error = %e, "{SYSCTL}: queued connections of a closing listener may be reset");
    }
}

/// Creates the pod's capture listeners: outbound on 127.0.0.1 always (it also serves IPv4-mapped
/// connects of dual-stack sockets) and on ::1 for pods with an IPv6 address; inbound on the
/// loopback of each family the pod has an address in.
///
/// With `hbone_port`, also the HBONE listener on each of the pod's own addresses: a real
/// listener the inbound program leaves alone, reached by other proxies over the network.
pub fn create(
    netns: &Netns,
    ips: &[IpAddr],
    outbound_port: u16,
    inbound_port: u16,
    hbone_port: Option<u16>,
) -> io::Result<Vec<PodListener>> {
    let has_v4 = ips.iter().any(IpAddr::is_ipv4);
    let has_v6 = ips.iter().any(IpAddr::is_ipv6);
    let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let mut wanted = vec![(Direction::Outbound, SocketAddr::new(lo4, outbound_port))];
    if has_v6 {
        wanted.push((Direction::Outbound, SocketAddr::new(lo6, outbound_port)));
    }
    if has_v4 {
        wanted.push((Direction::Inbound, SocketAddr::new(lo4, inbound_port)));
    }
    if has_v6 {
        wanted.push((Direction::Inbound, SocketAddr::new(lo6, inbound_port)));
    }
    if let Some(port) = hbone_port {
        wanted.extend(ips.iter().map(|ip| (Direction::Hbone, SocketAddr::new(*ip, port))));
    }
    netns.run(|| {
        migrate_on_close();
        wanted
            .into_iter()
            .map(|(direction, addr)| {
                let socket = listen(direction, addr).map_err(|e| {
                    let hint = if addr.is_ipv6() && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                        " (is the pod's loopback up with IPv6 enabled?)"
                    } else {
                        ""
                    };
                    io::Error::new(e.kind(), format!("listening on {addr}{hint}: {e}"))
                })?;
                Ok(PodListener { direction, addr, socket })
            })
            .collect()
    })?
}
