//! Upstream connections, made from inside the pod's network namespace (so the network sees
//! the pod's own address) and marked so the capture hooks let them through.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::inpod::netns::Netns;

pub async fn connect(netns: &Netns, dst: SocketAddr, mark: u32, timeout: Duration) -> io::Result<TcpStream> {
    let sock = socket(netns, dst, mark)?;
    connect_socket(sock, dst, timeout).await
}

/// Connects to the pod's own application to deliver an inbound connection. The socket is
/// bound first (the destination's address, an ephemeral port) and `before` is told its
/// address before the connection exists, so kernel events of it can be attributed to the
/// client it serves.
pub async fn deliver(
    netns: &Netns,
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
    before: impl FnOnce(SocketAddr),
) -> io::Result<TcpStream> {
    let sock = socket(netns, dst, mark)?;
    sock.bind(&SocketAddr::new(dst.ip(), 0).into())?;
    if let Some(local) = sock.local_addr()?.as_socket() {
        before(local);
    }
    connect_socket(sock, dst, timeout).await
}

fn socket(netns: &Netns, dst: SocketAddr, mark: u32) -> io::Result<Socket> {
    let sock = netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), Some(Protocol::TCP)))??;
    // Without the mark the connect hook would send this socket straight back to the proxy.
    sock.set_mark(mark)?;
    sock.set_tcp_nodelay(true)?;
    Ok(sock)
}

async fn connect_socket(sock: Socket, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let sock = TcpSocket::from_std_stream(sock.into());
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out"))),
    }
}
