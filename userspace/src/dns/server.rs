//! A pod's DNS listener: UDP and TCP on the port its DNS is steered to, in the pod's network
//! namespace. Each message is decided by [`handle`]: answered from the mesh, forwarded to the
//! pod's resolvers (sockets from the [`SocketFactory`], so they leave from the pod, marked),
//! or dropped. Bounded: queries in flight per pod, TCP connections per pod, the time a TCP
//! client may take; a query that finds no room is dropped (the client retries, as it would
//! on loss).

use std::{io, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;

use super::{
    forward::{tcp_in, udp_in, ForwardError},
    handle::{handle, type_label, Answering, Handled, Transport},
    metrics::{Asked, DnsMetrics},
    upstream::Resolvers,
    wire::{self, Rcode},
};
use crate::{
    os::{netns::Netns, socket::SocketFactory},
    state::StateStore,
};

/// Queries of one pod being answered at once (forwarded ones wait on the upstream).
const IN_FLIGHT: usize = 256;
/// TCP clients of one pod at once.
const TCP_CLIENTS: usize = 32;
/// How long a TCP client may take to send a query, and stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What a pod's listener answers with.
pub struct PodDns {
    /// The pod's namespace: short names are completed in it.
    pub namespace: String,
    /// The pod's canonical service and revision, for the metrics' source labels.
    pub canonical: (String, String),
    pub netns: Arc<Netns>,
    pub state: Arc<StateStore>,
    pub answering: Answering,
    pub upstreams: Arc<dyn Resolvers>,
    pub sockets: Arc<dyn SocketFactory>,
    /// Carried by forwarded queries' sockets, so the capture lets them through.
    pub mark: u32,
    pub metrics: DnsMetrics,
}

/// The outcome of one query, for the metrics and the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Answered(Rcode),
    Forwarded,
    ForwardFailed,
    Dropped,
}

impl Outcome {
    fn as_str(&self) -> &'static str {
        match self {
            Outcome::Answered(_) => "answered",
            Outcome::Forwarded => "forwarded",
            Outcome::ForwardFailed => "forward_failed",
            Outcome::Dropped => "dropped",
        }
    }
}

impl PodDns {
    /// Decides and, if need be, forwards one message; the bytes to send back, if any.
    pub async fn answer(&self, message: &[u8], transport: Transport) -> (Option<Vec<u8>>, Outcome) {
        let handled = {
            let state = self.state.read();
            handle(message, transport, &self.namespace, &self.answering, |host| {
                state.host_addresses(host, &self.namespace)
            })
        };
        let query_type = match &handled {
            Handled::Reply { query_type, .. } => query_type.map(type_label),
            Handled::Forward { query_type } => Some(type_label(*query_type)),
            Handled::Drop => None,
        };
        let label = query_type.as_deref().unwrap_or("unknown");
        let asked = Asked {
            query_type: label,
            protocol: transport.as_str(),
            service: &self.canonical.0,
            revision: &self.canonical.1,
        };
        // Like ztunnel, a message that is not a query is not counted as a request.
        if !matches!(handled, Handled::Drop) {
            self.metrics.request(&asked);
        }
        let (answer, outcome) = match handled {
            Handled::Reply { answer, rcode, .. } => (Some(answer), Outcome::Answered(rcode)),
            Handled::Drop => (None, Outcome::Dropped),
            Handled::Forward { .. } => {
                let started = std::time::Instant::now();
                match self.forward(message, transport).await {
                    Ok(answer) => {
                        self.metrics.forwarded(&asked, Some(started.elapsed().as_secs_f64()));
                        (Some(answer), Outcome::Forwarded)
                    }
                    Err(e) => {
                        self.metrics.forwarded(&asked, None);
                        tracing::info!(
                            target: "dns",
                            namespace = %self.namespace,
                            protocol = transport.as_str(),
                            error = %e,
                            "DNS forward failed; answered SERVFAIL"
                        );
                        (wire::error_answer(message, Rcode::ServFail), Outcome::ForwardFailed)
                    }
                }
            }
        };
        tracing::debug!(
            target: "dns",
            namespace = %self.namespace,
            workload = %self.canonical.0,
            query_type = label,
            protocol = transport.as_str(),
            outcome = outcome.as_str(),
            rcode = answer.as_deref().and_then(wire::rcode_of).map_or(-1, i16::from),
            "dns request"
        );
        (answer, outcome)
    }

    async fn forward(&self, message: &[u8], transport: Transport) -> Result<Vec<u8>, ForwardError> {
        let upstreams = self.upstreams.upstreams();
        match transport {
            Transport::Udp => {
                upstreams.udp(message, |server| udp_in(&*self.sockets, &self.netns, self.mark, server)).await
            }
            Transport::Tcp => {
                upstreams.tcp(message, |server| tcp_in(&*self.sockets, &self.netns, self.mark, server)).await
            }
        }
    }
}

/// Serves UDP queries on `sock` until `stop`.
pub async fn serve_udp(sock: UdpSocket, dns: Arc<PodDns>, stop: CancellationToken) {
    let sock = Arc::new(sock);
    let room = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut buf = vec![0u8; u16::MAX as usize];
    loop {
        let (n, client) = tokio::select! {
            () = stop.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(namespace = %dns.namespace, error = %e, "DNS receive failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = room.clone().try_acquire_owned() else {
            tracing::debug!(namespace = %dns.namespace, "DNS queries in flight at the limit; one dropped");
            continue;
        };
        let (sock, dns, message) = (sock.clone(), dns.clone(), buf[..n].to_vec());
        tokio::spawn(async move {
            let (answer, _outcome) = dns.answer(&message, Transport::Udp).await;
            if let Some(answer) = answer {
                if let Err(e) = sock.send_to(&answer, client).await {
                    tracing::debug!(%client, error = %e, "DNS answer not sent");
                }
            }
            drop(permit);
        });
    }
}

/// Serves TCP clients on `listener` until `stop`.
pub async fn serve_tcp(listener: TcpListener, dns: Arc<PodDns>, stop: CancellationToken) {
    let room = Arc::new(Semaphore::new(TCP_CLIENTS));
    loop {
        let (stream, client) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(namespace = %dns.namespace, error = %e, "DNS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = room.clone().try_acquire_owned() else {
            tracing::debug!(namespace = %dns.namespace, %client, "DNS TCP clients at the limit; one closed");
            continue;
        };
        let (dns, stop) = (dns.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = tcp_client(stream, &dns) => if let Err(e) = r {
                    tracing::debug!(%client, error = %e, "DNS TCP client");
                },
                () = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// Queries of one TCP connection, one after the other, until it closes or idles.
async fn tcp_client(mut stream: TcpStream, dns: &PodDns) -> io::Result<()> {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(n)) => n as usize,
            // Closed between queries, or idle: done.
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let mut message = vec![0u8; len];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut message))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "a query not sent in time"))??;
        let (answer, outcome) = dns.answer(&message, Transport::Tcp).await;
        let Some(answer) = answer else {
            // Not a query: a stream that sends such things is not a DNS client.
            debug_assert_eq!(outcome, Outcome::Dropped);
            return Ok(());
        };
        // Ours are built within 65535 bytes, and an upstream's came in a frame or a datagram.
        let len = u16::try_from(answer.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "an answer over 65535 bytes"))?;
        let mut out = Vec::with_capacity(2 + answer.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&answer);
        stream.write_all(&out).await?;
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
