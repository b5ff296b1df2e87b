//! Where the proxy's sockets for a pod come from: the seam between the data path and the
//! kernel's namespaces and marks.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

use super::netns::Netns;

/// Makes a TCP socket for connecting to `dst` on behalf of a pod.
pub trait SocketFactory: Send + Sync + 'static {
    /// A non-blocking, unconnected TCP socket of `dst`'s family, in `netns`, carrying `mark`.
    fn tcp(&self, netns: &Netns, dst: SocketAddr, mark: u32) -> io::Result<Socket>;
    /// The same for UDP (a pod's forwarded DNS query).
    fn udp(&self, netns: &Netns, dst: SocketAddr, mark: u32) -> io::Result<Socket>;
}

/// The node proxy's: the socket is made inside the pod's network namespace (the network
/// sees the pod's own address) and marked so the capture hooks let it through. Needs
/// CAP_SYS_ADMIN (setns) and CAP_NET_ADMIN (SO_MARK).
#[derive(Clone, Copy, Debug, Default)]
pub struct InPodSockets;

impl SocketFactory for InPodSockets {
    fn tcp(&self, netns: &Netns, dst: SocketAddr, mark: u32) -> io::Result<Socket> {
        let sock = netns.run(|| new_tcp(dst))??;
        // Without the mark the connect hook would send this socket straight back to the proxy.
        sock.set_mark(mark)?;
        Ok(sock)
    }

    fn udp(&self, netns: &Netns, dst: SocketAddr, mark: u32) -> io::Result<Socket> {
        let sock = netns.run(|| new_udp(dst))??;
        // Without the mark the DNS hooks would send this query straight back to the proxy.
        sock.set_mark(mark)?;
        Ok(sock)
    }
}

/// Sockets in the calling thread's own network namespace, unmarked: for running the proxy
/// without privileges where nothing is captured (the in-process tests, where every "pod" is
/// an address on the test's loopback). `netns` and `mark` are ignored.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalSockets;

impl SocketFactory for LocalSockets {
    fn tcp(&self, _netns: &Netns, dst: SocketAddr, _mark: u32) -> io::Result<Socket> {
        new_tcp(dst)
    }

    fn udp(&self, _netns: &Netns, dst: SocketAddr, _mark: u32) -> io::Result<Socket> {
        new_udp(dst)
    }
}

fn new_tcp(dst: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), Some(Protocol::TCP))
}

fn new_udp(dst: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(dst), Type::DGRAM.nonblocking(), Some(Protocol::UDP))
}
