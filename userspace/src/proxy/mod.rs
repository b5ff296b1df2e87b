//! The node proxy's data path: accept loops on the in-pod listeners, the outbound and inbound
//! handlers, and the byte relay.

mod inbound;
mod outbound;
mod relay;
mod upstream;

use std::{io, net::IpAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    capture::OrigDstTable,
    inpod::{netns::Netns, Direction},
    metrics::Metrics,
};

pub use relay::{Counters as RelayCounters, Transfer};

/// A pod as the data path sees it.
#[derive(Debug)]
pub struct PodCtx {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// Canonical (IPv4-mapped addresses as IPv4).
    pub ips: Vec<IpAddr>,
    pub netns: Arc<Netns>,
}

impl PodCtx {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// SO_MARK on every upstream socket; the connect hooks let marked sockets through.
    pub mark: u32,
    pub connect_timeout: Duration,
    /// Ports the proxy serves itself; a captured connection to one of them is refused, as it
    /// would loop back into the proxy.
    pub own_ports: Vec<u16>,
}

struct Inner {
    settings: ProxySettings,
    orig: OrigDstTable,
    metrics: Arc<Metrics>,
    /// Every connection task, so that shutdown can wait for them (drain).
    connections: TaskTracker,
}

#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl Proxy {
    pub fn new(settings: ProxySettings, orig: OrigDstTable, metrics: Arc<Metrics>) -> Proxy {
        Proxy { inner: Arc::new(Inner { settings, orig, metrics, connections: TaskTracker::new() }) }
    }

    /// Original-destination records waiting for an accept (diagnostics).
    pub fn pending_records(&self) -> usize {
        self.inner.orig.len()
    }

    /// Connections being proxied right now.
    pub fn active_connections(&self) -> usize {
        self.inner.connections.len()
    }

    /// Waits until every proxied connection has finished (call after the accept loops
    /// stopped), or `deadline` passes; returns how many were still open then.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.inner.connections.close();
        match tokio::time::timeout(deadline, self.inner.connections.wait()).await {
            Ok(()) => 0,
            Err(_) => self.inner.connections.len(),
        }
    }

    /// Starts the accept loop of one in-pod listener; it ends (closing the listener) when
    /// `stop` is cancelled. Connections it accepted live on independently.
    pub fn serve(
        &self,
        pod: Arc<PodCtx>,
        listener: crate::inpod::PodListener,
        stop: CancellationToken,
    ) -> io::Result<JoinHandle<()>> {
        let direction = listener.direction;
        let listener = TcpListener::from_std(std::net::TcpListener::from(listener.socket))?;
        let inner = self.inner.clone();
        Ok(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let inner = inner.clone();
                        let pod = pod.clone();
                        inner.connections.clone().spawn(async move {
                            match direction {
                                Direction::Outbound => outbound::handle(&inner, &pod, stream, peer).await,
                                Direction::Inbound => inbound::handle(&inner, &pod, stream, peer).await,
                            }
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning on the error.
                        tracing::warn!(pod = %pod.key(), ?direction, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }))
    }
}

/// Refuses a captured connection: counted, logged, and closed with a reset.
#[allow(clippy::too_many_arguments)]
fn refuse(
    inner: &Inner,
    pod: &PodCtx,
    direction: Direction,
    client: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    dst: Option<std::net::SocketAddr>,
    reason: &'static str,
    detail: &str,
) {
    inner.metrics.connection_failed(direction, pod, reason);
    crate::telemetry::access_log_refused(direction, pod, peer, dst, reason, detail);
    relay::linger_zero(&client);
}

/// Relays an established pair to its end, with metrics and the access log.
#[allow(clippy::too_many_arguments)]
async fn finish(
    inner: &Inner,
    pod: &PodCtx,
    direction: Direction,
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    started: std::time::Instant,
) {
    // What the network sees as the source: the pod's address for outbound, the client's
    // for inbound.
    let src = match direction {
        Direction::Outbound => upstream.local_addr().unwrap_or(peer),
        Direction::Inbound => peer,
    };
    let counters = inner.metrics.connection_opened(direction, pod);
    let transfer = relay::relay(client, upstream, &counters).await;
    inner.metrics.connection_closed(direction, pod);
    crate::telemetry::access_log(direction, pod, src, dst, &transfer, started.elapsed());
}
