//! A pod's DNS listener: UDP and TCP on the DNS port of the pod's loopback (IPv4 always, IPv6
//! when the pod has an IPv6 address), where the capture programs steer the pod's port 53.
//! The TCP listener's capture-map entry is what tells the programs a proxy is there: both
//! sockets live and die with the pod's enrolment, so one stands for both.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
};

use ambit_common::{maps::ListenerKey, AF_INET, AF_INET6};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    dns::{
        forward::{nameservers, Upstreams},
        metrics::DnsMetrics,
        server::{serve_tcp, serve_udp, PodDns},
        upstream::{PodResolvConf, Resolvers},
        DnsSettings,
    },
    meshfile::PodSpec,
    os::{cookie::NetnsCookie, netns::Netns, socket::SocketFactory},
    state::StateStore,
};

/// What every pod's DNS listener shares.
pub struct DnsServing {
    pub settings: DnsSettings,
    pub state: Arc<StateStore>,
    pub sockets: Arc<dyn SocketFactory>,
    /// The proxy's mark, carried by forwarded queries.
    pub mark: u32,
    pub metrics: DnsMetrics,
}

/// A pod's DNS sockets, made in its namespace, not yet served.
pub struct DnsListeners {
    udp: Vec<Socket>,
    tcp: Vec<Socket>,
    pub addrs: Vec<SocketAddr>,
}

impl DnsListeners {
    /// The capture-map entries: the TCP listener of each family.
    pub fn keys(&self, netns_cookie: NetnsCookie) -> Vec<(ListenerKey, &Socket)> {
        self.tcp
            .iter()
            .zip(&self.addrs)
            .map(|(sock, addr)| {
                let family = if addr.is_ipv4() { AF_INET } else { AF_INET6 };
                (ListenerKey { netns_cookie: netns_cookie.0, family, port: addr.port(), _pad: 0 }, sock)
            })
            .collect()
    }
}

impl DnsServing {
    /// Binds the pod's DNS sockets inside its namespace.
    pub fn listen(&self, netns: &Netns, ips: &[IpAddr]) -> io::Result<DnsListeners> {
        let port = self.settings.port;
        let mut addrs = vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)];
        if ips.iter().any(IpAddr::is_ipv6) {
            addrs.push(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port));
        }
        netns.run(|| {
            let mut made = DnsListeners { udp: Vec::new(), tcp: Vec::new(), addrs: addrs.clone() };
            for addr in &addrs {
                let named = |e: io::Error| io::Error::new(e.kind(), format!("DNS listener on {addr}: {e}"));
                made.udp.push(bind(*addr, Type::DGRAM, Protocol::UDP).map_err(named)?);
                made.tcp.push(bind(*addr, Type::STREAM, Protocol::TCP).map_err(named)?);
            }
            Ok(made)
        })?
    }

    /// Serves the pod's DNS sockets until `stop`.
    pub fn serve(
        &self,
        spec: &PodSpec,
        netns: Arc<Netns>,
        listeners: DnsListeners,
        stop: &CancellationToken,
    ) -> io::Result<Vec<JoinHandle<()>>> {
        let dns = Arc::new(PodDns {
            namespace: spec.namespace.clone(),
            canonical: (spec.canonical_name().to_string(), spec.canonical_revision().to_string()),
            netns,
            state: self.state.clone(),
            answering: self.settings.answering.clone(),
            upstreams: self.resolvers(&spec.netns),
            sockets: self.sockets.clone(),
            mark: self.mark,
            metrics: self.metrics.clone(),
        });
        let mut tasks = Vec::new();
        for sock in listeners.udp {
            let sock = tokio::net::UdpSocket::from_std(sock.into())?;
            tasks.push(tokio::spawn(serve_udp(sock, dns.clone(), stop.clone())));
        }
        for sock in listeners.tcp {
            let listener = tokio::net::TcpListener::from_std(sock.into())?;
            tasks.push(tokio::spawn(serve_tcp(listener, dns.clone(), stop.clone())));
        }
        Ok(tasks)
    }

    fn resolvers(&self, netns_file: &Path) -> Arc<dyn Resolvers> {
        match PodResolvConf::new(&self.settings.proc_dir, netns_file, self.settings.upstream_timeout) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::warn!(
                    netns = %netns_file.display(),
                    error = %e,
                    "cannot find the pod's resolv.conf; its DNS is forwarded to the node's resolvers"
                );
                let node = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                Arc::new(Upstreams { servers: nameservers(&node), timeout: self.settings.upstream_timeout })
            }
        }
    }
}

/// Backlog of the TCP listener: a pod's TCP queries are few (truncated answers retried).
const BACKLOG: i32 = 128;

fn bind(addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty.nonblocking(), Some(protocol))?;
    sock.set_reuse_address(true)?;
    // A successor (`--takeover`) binds the same port while this proxy drains.
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    if ty == Type::STREAM {
        sock.listen(BACKLOG)?;
    }
    Ok(sock)
}
