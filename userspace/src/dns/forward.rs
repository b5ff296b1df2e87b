//! Names the mesh does not have go to the pod's resolvers as they were asked, and their answers
//! come back unchanged. Over UDP, each server in turn until one answers in time; over TCP
//! (a client retrying a truncated answer) the same, one message per connection.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use super::wire;
use crate::os::{netns::Netns, socket::SocketFactory};

/// glibc reads at most three `nameserver` lines; so do we.
const MAX_SERVERS: usize = 3;

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoServers,
    #[error("upstream {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("no upstream of {servers} answered within {timeout:?} each")]
    Timeout { servers: usize, timeout: Duration },
}

/// The nameservers of a resolv.conf (port 53), in order, at most three. Lines that are not
/// `nameserver <ip>` are ignored: the pod's search list and options are its resolver's.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        // A zone index (`fe80::1%eth0`) is the pod's interface, meaningless here.
        .filter_map(|ip| ip.split('%').next()?.parse().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(MAX_SERVERS)
        .collect()
}

/// Where forwarded queries go, and how long each server is given.
#[derive(Clone, Debug)]
pub struct Upstreams {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
}

impl Upstreams {
    /// Forwards a UDP query: the first answer with the query's ID from the server asked.
    /// `socket` makes the socket for a server (in the pod's namespace, marked, in the node).
    pub async fn udp(
        &self,
        query: &[u8],
        socket: impl Fn(SocketAddr) -> io::Result<UdpSocket>,
    ) -> Result<Vec<u8>, ForwardError> {
        let id = wire::id_of(query);
        for &server in self.servers.iter() {
            let io = |source| ForwardError::Io { server, source };
            let sock = socket(server).map_err(io)?;
            sock.connect(server).await.map_err(io)?;
            sock.send(query).await.map_err(io)?;
            let mut buf = vec![0u8; u16::MAX as usize];
            let answered = tokio::time::timeout(self.timeout, async {
                loop {
                    let n = sock.recv(&mut buf).await?;
                    // A stray datagram (a late answer to an earlier query) is not this one's.
                    if n >= wire::HEADER_LEN && wire::id_of(&buf[..n]) == id {
                        return Ok::<_, io::Error>(n);
                    }
                }
            })
            .await;
            match answered {
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                // Refused (ICMP unreachable) or timed out: the next server.
                Ok(Err(e)) => tracing::debug!(%server, error = %e, "upstream resolver failed"),
                Err(_) => tracing::debug!(%server, "upstream resolver timed out"),
            }
        }
        match self.servers.len() {
            0 => Err(ForwardError::NoServers),
            n => Err(ForwardError::Timeout { servers: n, timeout: self.timeout }),
        }
    }

    /// Forwards a query over TCP (two-byte length, then the message).
    pub async fn tcp<F: Future<Output = io::Result<TcpStream>>>(
        &self,
        query: &[u8],
        connect: impl Fn(SocketAddr) -> F,
    ) -> Result<Vec<u8>, ForwardError> {
        for &server in self.servers.iter() {
            match tokio::time::timeout(self.timeout, exchange_tcp(server, query, &connect)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => tracing::debug!(%server, error = %e, "upstream resolver failed over TCP"),
                Err(_) => tracing::debug!(%server, "upstream resolver timed out over TCP"),
            }
        }
        match self.servers.len() {
            0 => Err(ForwardError::NoServers),
            n => Err(ForwardError::Timeout { servers: n, timeout: self.timeout }),
        }
    }
}

async fn exchange_tcp<F: Future<Output = io::Result<TcpStream>>>(
    server: SocketAddr,
    query: &[u8],
    connect: &impl Fn(SocketAddr) -> F,
) -> Result<Vec<u8>, ForwardError> {
    let io = |source| ForwardError::Io { server, source };
    // Queries arrive in a UDP datagram or a TCP frame: they always fit a frame.
    let len = u16::try_from(query.len())
        .map_err(|_| io(io::Error::new(io::ErrorKind::InvalidInput, "a query over 65535 bytes")))?;
    let mut stream = connect(server).await.map_err(io)?;
    let mut out = Vec::with_capacity(2 + query.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    stream.write_all(&out).await.map_err(io)?;
    let n = stream.read_u16().await.map_err(io)? as usize;
    let mut answer = vec![0u8; n];
    stream.read_exact(&mut answer).await.map_err(io)?;
    Ok(answer)
}

/// A UDP socket for `server` in the pod's namespace, marked so that the capture lets it pass.
pub(super) fn udp_in(
    sockets: &dyn SocketFactory,
    netns: &Netns,
    mark: u32,
    server: SocketAddr,
) -> io::Result<UdpSocket> {
    UdpSocket::from_std(sockets.udp(netns, server, mark)?.into())
}

/// A TCP connection to `server` from the pod's namespace, marked likewise.
pub(super) async fn tcp_in(
    sockets: &dyn SocketFactory,
    netns: &Netns,
    mark: u32,
    server: SocketAddr,
) -> io::Result<TcpStream> {
    let sock = sockets.tcp(netns, server, mark)?;
    tokio::net::TcpSocket::from_std_stream(sock.into()).connect(server).await
}

#[cfg(test)]
#[path = "forward_tests.rs"]
mod tests;
