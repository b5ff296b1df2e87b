//! The node proxy's data path: accept loops on the in-pod listeners, the outbound and inbound
//! handlers, and the byte relay.

mod authorize;
pub mod hbone;
mod inbound;
mod outbound;
mod relay;
mod upstream;

use std::{io, net::IpAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    capture::OrigDstTable,
    identity::{Identity, IdentityManager},
    inpod::{netns::Netns, Direction},
    metrics::Metrics,
    state::StateStore,
};

pub use relay::{Counters as RelayCounters, Transfer};

/// A pod as the data path sees it.
#[derive(Debug)]
pub struct PodCtx {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// Its SPIFFE identity, when the mesh has a CA (mTLS); `None` without one.
    pub identity: Option<Identity>,
    /// `app.kubernetes.io/name` or `app` label, else the pod name (telemetry).
    pub app: String,
    /// Canonical (IPv4-mapped addresses as IPv4).
    pub ips: Vec<IpAddr>,
    pub netns: Arc<Netns>,
}

impl PodCtx {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn app_name(&self) -> &str {
        &self.app
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
    pub hbone_port: u16,
    pub hbone: hbone::HboneSettings,
    /// What to do with a connection to an address the mesh does not know.
    pub unknown: UnknownDestination,
}

/// Connections to addresses outside the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDestination {
    /// Connect directly, in plaintext (Istio's default).
    Passthrough,
    /// Refuse (reset) the connection.
    Refuse,
}

/// What an access-log line and a refusal say about a connection.
pub struct ConnRecord<'a> {
    pub direction: Direction,
    pub pod: &'a PodCtx,
    /// Where the connection comes from, as the network sees it.
    pub src: std::net::SocketAddr,
    pub dst: Option<std::net::SocketAddr>,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    /// The service the destination was chosen for, when the client dialled a service address.
    pub dst_service: Option<String>,
    /// Whether it travelled (or arrived) over mutual TLS.
    pub mtls: bool,
}

impl<'a> ConnRecord<'a> {
    pub fn outbound(pod: &'a PodCtx, src: std::net::SocketAddr, dst: Option<std::net::SocketAddr>) -> Self {
        ConnRecord {
            direction: Direction::Outbound,
            pod,
            src,
            dst,
            src_identity: pod.identity.as_ref().map(ToString::to_string),
            dst_identity: None,
            dst_service: None,
            mtls: false,
        }
    }

    pub fn inbound(
        pod: &'a PodCtx,
        src: std::net::SocketAddr,
        dst: Option<std::net::SocketAddr>,
        peer: Option<&Identity>,
        mtls: bool,
    ) -> Self {
        ConnRecord {
            direction: Direction::Inbound,
            pod,
            src,
            dst,
            src_identity: peer.map(ToString::to_string),
            dst_identity: pod.identity.as_ref().map(ToString::to_string),
            dst_service: None,
            mtls,
        }
    }
}

pub struct Inner {
    settings: ProxySettings,
    orig: OrigDstTable,
    metrics: Arc<Metrics>,
    identities: IdentityManager,
    hbone: hbone::client::HboneClient,
    state: Arc<StateStore>,
    /// Every connection task, so that shutdown can wait for them (drain).
    connections: TaskTracker,
    /// Inbound connections open under authorization, re-checked on state changes.
    open: authorize::OpenConnections,
}

#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl Proxy {
    /// Call inside the runtime (the HBONE pool starts its reaper).
    pub fn new(
        settings: ProxySettings,
        orig: OrigDstTable,
        metrics: Arc<Metrics>,
        identities: IdentityManager,
        state: Arc<StateStore>,
    ) -> Proxy {
        let hbone =
            hbone::client::HboneClient::new(settings.hbone.clone(), identities.clone(), settings.mark);
        let inner = Arc::new(Inner {
            settings,
            orig,
            metrics,
            identities,
            hbone,
            state,
            connections: TaskTracker::new(),
            open: authorize::OpenConnections::default(),
        });
        authorize::spawn_rechecks(&inner);
        Proxy { inner }
    }

    /// Inbound connections open under authorization (config dump).
    pub fn authorized_connections(&self) -> usize {
        self.inner.open.len()
    }

    /// The HBONE connection pool (config dump).
    pub fn hbone_pools(&self) -> Vec<hbone::pool::PoolDump> {
        self.inner.hbone.dump()
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
        if direction == Direction::Hbone {
            let identity =
                pod.identity.clone().ok_or_else(|| io::Error::other("HBONE listener without identity"))?;
            let tls =
                crate::tls::server_config(&self.inner.identities, &identity).map_err(io::Error::other)?;
            return Ok(hbone::server::serve(self.inner.clone(), pod, listener, tls, stop));
        }
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
                                Direction::Hbone => unreachable!("HBONE listeners are served above"),
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
fn refuse(
    inner: &Inner,
    record: &ConnRecord<'_>,
    client: tokio::net::TcpStream,
    reason: &'static str,
    detail: &str,
) {
    inner.metrics.connection_failed(record.direction, record.pod, reason);
    crate::telemetry::access_log_refused(record, reason, detail);
    relay::linger_zero(&client);
}

/// Relays an established plaintext pair to its end (or until `close` fires: a reset both
/// ways), with metrics and the access log.
async fn finish(
    inner: &Inner,
    record: ConnRecord<'_>,
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    started: std::time::Instant,
    close: &CancellationToken,
) {
    let counters = inner.metrics.connection_opened(record.direction, record.pod);
    let transfer = relay::relay(client, upstream, &counters, close).await;
    inner.metrics.connection_closed(record.direction, record.pod);
    crate::telemetry::access_log(&record, &transfer, started.elapsed());
}
