//! Upstream connections, made from inside the pod's network namespace (so the network sees
//! the pod's own address) and marked so the capture hooks let them through.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::inpod::netns::Netns;

pub async fn connect(netns: &Netns, dst: SocketAddr, mark: u32, timeout: Duration) -> io::Result<TcpStream> {
    let sock = netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), Some(Protocol::TCP)))??;
    // Without the mark the connect hook would send this socket straight back to the proxy.
    sock.set_mark(mark)?;
    sock.set_tcp_nodelay(true)?;
    let sock = TcpSocket::from_std_stream(sock.into());
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out"))),
    }
}
