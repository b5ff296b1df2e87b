//! Upstream connections, made from inside the pod's network namespace (so the network sees
//! the pod's own address) and marked so the capture hooks let them through.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use socket2::Socket;
use tokio::net::{TcpSocket, TcpStream};

use crate::os::{netns::Netns, socket::SocketFactory};

pub async fn connect(
    sockets: &dyn SocketFactory,
    netns: &Netns,
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = socket(sockets, netns, dst, mark)?;
    connect_socket(sock, dst, timeout).await
}

/// Connects to the pod's own application to deliver an inbound connection: from `from` (the
/// client's address, with a transparent socket: the pod's namespace routes the replies back,
/// see `inpod::delivery`), or else from the destination's own address. `mark` must be the
/// delivery mark with `from`. `announce` is called just before the connect and returns what
/// is told the socket's local address right after it, with no await in between: kernel
/// events of the socket are attributed to the client it serves, and over loopback the
/// handshake may be done before the connect returns (see `trace::Tracer::delivering`).
///
/// The port is chosen by the connect, not by a bind to port 0 (`IP_BIND_ADDRESS_NO_PORT`):
/// a bind must find a port no other socket holds, TIME_WAIT ones included, and under a
/// stream of short connections to one pod that search grew until every connection cost
/// milliseconds of kernel time (and would end in EADDRINUSE). The connect only needs the
/// 4-tuple to be unique.
pub async fn deliver<A: FnOnce(SocketAddr)>(
    sockets: &dyn SocketFactory,
    netns: &Netns,
    dst: SocketAddr,
    from: Option<IpAddr>,
    mark: u32,
    timeout: Duration,
    announce: impl FnOnce() -> A,
) -> io::Result<TcpStream> {
    let sock = socket(sockets, netns, dst, mark)?;
    if from.is_some() {
        // Binding an address that is not local to the pod.
        if dst.is_ipv4() {
            sock.set_ip_transparent_v4(true)?;
        } else {
            sock.set_ip_transparent_v6(true)?;
        }
    }
    start_delivery(&sock, dst, from.unwrap_or(dst.ip()), announce)?;
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    match tokio::time::timeout(timeout, stream.writable()).await {
        Ok(ready) => ready?,
        Err(_) => return Err(timed_out(dst)),
    }
    // Writable also when the connect failed: the socket's error says which.
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    Ok(stream)
}

/// The non-blocking connect of [`deliver`], announced. Not async: what `announce` returns
/// may hold a lock that must not be held across an await.
fn start_delivery<A: FnOnce(SocketAddr)>(
    sock: &Socket,
    dst: SocketAddr,
    from: IpAddr,
    announce: impl FnOnce() -> A,
) -> io::Result<()> {
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
    sock.bind(&SocketAddr::new(from, 0).into())?;
    let connected = announce();
    match sock.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    if let Some(local) = sock.local_addr()?.as_socket() {
        connected(local);
    }
    Ok(())
}

fn socket(sockets: &dyn SocketFactory, netns: &Netns, dst: SocketAddr, mark: u32) -> io::Result<Socket> {
    let sock = sockets.tcp(netns, dst, mark)?;
    sock.set_tcp_nodelay(true)?;
    Ok(sock)
}

async fn connect_socket(sock: Socket, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let sock = TcpSocket::from_std_stream(sock.into());
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(dst)),
    }
}

fn timed_out(dst: SocketAddr) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out"))
}
