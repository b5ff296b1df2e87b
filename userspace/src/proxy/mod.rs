//! The node proxy's data path: accept loops on the in-pod listeners, the outbound and inbound
//! handlers, and the byte relay.

mod access_log;
mod authorize;
pub mod hbone;
mod inbound;
mod outbound;
mod record;
mod relay;
mod upstream;

use std::{io, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    capture::OrigDstSource,
    dns::lookup::HostLookup,
    identity::IdentityManager,
    metrics::Metrics,
    metrics::RelayCounters,
    os::socket::SocketFactory,
    pod::{Direction, PodCtx, PodRegistry, Refusal},
    state::StateStore,
    trace::Tracer,
};

pub use access_log::{set_access_log_format, AccessLogFormat, Kernel};
pub use record::ConnRecord;
pub use relay::Transfer;

#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// SO_MARK on every upstream socket; the connect hooks let marked sockets through.
    pub mark: u32,
    /// SO_MARK of the sockets that deliver inbound connections from the client's address.
    pub delivery_mark: u32,
    pub connect_timeout: Duration,
    /// Ports the proxy serves itself; a captured connection to one of them is refused, as it
    /// would loop back into the proxy.
    pub own_ports: Vec<u16>,
    pub hbone_port: u16,
    pub hbone: hbone::HboneSettings,
    /// What to do with a connection to an address the mesh does not know.
    pub unknown: UnknownDestination,
    /// Refuse an outbound destination on loopback as a loop: capture never records one, so
    /// it can only be the proxy's own listener. Off only where pods are loopback addresses
    /// (the in-process tests).
    pub loopback_is_loop: bool,
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

pub struct Inner {
    settings: ProxySettings,
    orig: Arc<dyn OrigDstSource>,
    metrics: Arc<Metrics>,
    identities: IdentityManager,
    hbone: hbone::client::HboneClient,
    state: Arc<StateStore>,
    /// Every connection task, so that shutdown can wait for them (drain).
    connections: TaskTracker,
    /// Inbound connections open under authorization, re-checked on state changes.
    open: authorize::OpenConnections,
    /// Enrolled pods by netns cookie (kernel events carry only the cookie).
    pods: Arc<PodRegistry>,
    /// Kernel-level tracing: per-socket figures for the access log; `None` when off.
    tracer: Option<Tracer>,
    sockets: Arc<dyn SocketFactory>,
    lookup: Arc<HostLookup>,
}

/// What the proxy works with besides its settings.
pub struct ProxyDeps {
    /// Original destinations of captured connections (the kernel's map).
    pub orig: Arc<dyn OrigDstSource>,
    /// How sockets for a pod are made (in its netns, marked).
    pub sockets: Arc<dyn SocketFactory>,
    pub metrics: Arc<Metrics>,
    pub identities: IdentityManager,
    pub state: Arc<StateStore>,
    pub pods: Arc<PodRegistry>,
    pub tracer: Option<Tracer>,
    /// Resolves endpoints known by hostname only, with the connecting pod's resolvers.
    pub lookup: Arc<HostLookup>,
}

#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl Proxy {
    /// Call inside the runtime (the HBONE pool starts its reaper).
    pub fn new(settings: ProxySettings, deps: ProxyDeps) -> Proxy {
        let ProxyDeps { orig, sockets, metrics, identities, state, pods, tracer, lookup } = deps;
        let hbone = hbone::client::HboneClient::new(
            settings.hbone.clone(),
            identities.clone(),
            sockets.clone(),
            settings.mark,
        );
        let inner = Arc::new(Inner {
            settings,
            orig,
            metrics,
            identities,
            hbone,
            state,
            connections: TaskTracker::new(),
            open: authorize::OpenConnections::default(),
            pods,
            tracer,
            sockets,
            lookup,
        });
        authorize::spawn_rechecks(&inner);
        Proxy { inner }
    }

    /// Enrolled pods by netns cookie.
    pub fn pods(&self) -> &Arc<PodRegistry> {
        &self.inner.pods
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
        self.inner.orig.pending()
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
        listener: crate::pod::PodListener,
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
        // Every connection accepted on an outbound listener has the listener's address as
        // its local one (the connect hook rewrote it to exactly that): asked once here, not
        // with a getsockname per connection.
        let local = listener.local_addr()?;
        let inner = self.inner.clone();
        Ok(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    biased;
                    // Connects the hook rewrote before the pod left the maps may still wait in
                    // the backlog, and closing the listener would reset them: serve those, then
                    // stop.
                    () = stop.cancelled() => match accept_queued(&listener) {
                        Some(accepted) => Ok(accepted),
                        None => return,
                    },
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        // The proxy forwards what it reads at once: Nagle would only hold small
                        // writes back (requests, responses) waiting for ACKs.
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(error = %e, "TCP_NODELAY on an accepted socket");
                        }
                        let inner = inner.clone();
                        let tracker = inner.connections.clone();
                        let pod = pod.clone();
                        // One task type per direction: a task is sized for its largest state,
                        // and each idle connection keeps its task.
                        match direction {
                            Direction::Outbound => {
                                let client = stream;
                                let accepted = outbound::Accepted { inner, pod, client, peer, local };
                                let task = outbound::handle(Box::new(accepted));
                                debug_assert_task_size(std::mem::size_of_val(&task));
                                tracker.spawn(task)
                            }
                            Direction::Inbound => tracker.spawn(inbound::handle(inner, pod, stream, peer)),
                            Direction::Hbone => unreachable!("HBONE listeners are served above"),
                        };
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

/// A connection already waiting in `listener`'s backlog, without waiting for one (nor for the
/// runtime to have seen the listener readable); `None` when there is none or accepting fails.
fn accept_queued(listener: &TcpListener) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let (socket, peer) = socket2::SockRef::from(listener).accept().ok()?;
    let peer = peer.as_socket()?;
    let stream = std::net::TcpStream::from(socket);
    stream.set_nonblocking(true).ok()?;
    tokio::net::TcpStream::from_std(stream).ok().map(|s| (s, peer))
}

impl Inner {
    /// Counts a connection that failed (with its metric labels) and logs it.
    fn failed(&self, record: &ConnRecord<'_>, reason: Refusal, detail: &str) {
        let labels = record.labels(&self.state.read(), &self.metrics.sides);
        self.metrics.connection_failed(record.direction, record.pod, reason, &labels);
        access_log::refused(record, &labels, reason, detail);
    }

    /// Connects to the pod's application to deliver an inbound connection, telling the
    /// tracer who the client is first.
    async fn deliver(
        &self,
        record: &mut ConnRecord<'_>,
        dst: std::net::SocketAddr,
    ) -> io::Result<tokio::net::TcpStream> {
        let s = &self.settings;
        let pod = record.pod;
        let hint = self.tracer.as_ref().map(|t| {
            let source = record.labels(&self.state.read(), &self.metrics.sides).source;
            let known = |v: &str| (v != crate::metrics::istio::UNKNOWN).then(|| v.to_string());
            let peer = crate::trace::Peer {
                namespace: known(&source.namespace),
                workload: known(&source.workload),
                identity: known(&source.principal),
                service: None,
                address: None,
            };
            (t, peer)
        });
        let (cookie, client) = (pod.netns.cookie(), record.src);
        // From the client's address when the pod is prepared for it and the families agree
        // (they always do for a client that reached this address); the client's own
        // address needs nothing (a pod calling itself through a service).
        let from = (pod.deliver_from_client && client.is_ipv4() == dst.is_ipv4() && client.ip() != dst.ip())
            .then(|| client.ip());
        let mark = if from.is_some() { s.delivery_mark } else { s.mark };
        // Counted from before the connect: the settings must outlive every reply.
        if from.is_some() {
            record.count_delivery();
        }
        upstream::deliver(&*self.sockets, &pod.netns, dst, from, mark, s.connect_timeout, move || {
            let delivering = hint.map(|(tracer, peer)| tracer.delivering(cookie, peer, client));
            move |local: std::net::SocketAddr| {
                if let Some(d) = delivering {
                    d.connected(local.port());
                }
            }
        })
        .await
    }

    /// A connection starts being relayed: its labels, byte counters, and where its network
    /// leg's retransmission count stands.
    fn opened(&self, record: &ConnRecord<'_>) -> Opened {
        let labels = record.labels(&self.state.read(), &self.metrics.sides);
        let counters = self.metrics.connection_opened(record.direction, record.pod, &labels);
        let retransmits_before = self.leg_stats(record).map(|l| l.retransmits);
        Opened { counters, retransmits_before }
    }

    fn leg_stats(&self, record: &ConnRecord<'_>) -> Option<crate::trace::LegStats> {
        self.tracer.as_ref().zip(record.leg).and_then(|(t, cookie)| t.leg(cookie))
    }

    /// A relayed connection ended: metrics and the access-log line, with what the kernel
    /// measured on its network leg while it was open.
    fn closed(
        &self,
        record: &ConnRecord<'_>,
        open: &Opened,
        transfer: &Transfer,
        started: std::time::Instant,
    ) {
        self.metrics.connection_closed(&open.counters);
        // At the end, events the reader has not drained yet count too.
        let now = self.tracer.as_ref().zip(record.leg).and_then(|(t, cookie)| t.leg_now(cookie));
        let kernel = match now {
            Some(now) => Kernel {
                rtt_us: (now.srtt_us > 0).then_some(now.srtt_us),
                retransmits: Some(u64::from(
                    now.retransmits.saturating_sub(open.retransmits_before.unwrap_or(0)),
                )),
            },
            None => Kernel::default(),
        };
        access_log::finished(record, open.counters.labels(), transfer, started.elapsed(), kernel);
    }
}

/// A connection being relayed, as [`Inner::opened`] starts it.
struct Opened {
    /// With the labels, shared by the connections of one label set.
    counters: RelayCounters,
    retransmits_before: Option<u32>,
}

/// The largest future of a connection's task that still fits tokio's 512-byte task
/// allocation (tokio adds 112 bytes around it and aligns to 128). Every idle connection
/// keeps its task, so one field more across this line costs each of them 128 bytes: debug
/// builds (the tests) check it where the tasks are spawned.
const CONNECTION_FUTURE_MAX: usize = 400;

#[track_caller]
pub(crate) fn debug_assert_task_size(bytes: usize) {
    debug_assert!(
        bytes <= CONNECTION_FUTURE_MAX,
        "a connection's future is {bytes} bytes, over {CONNECTION_FUTURE_MAX}: its task would take \
         tokio's next 128-byte allocation step (see `-Zprint-type-sizes` for what it holds)"
    );
}

/// Refuses a captured connection: counted, logged, and closed with a reset.
fn refuse(
    inner: &Inner,
    record: &ConnRecord<'_>,
    client: tokio::net::TcpStream,
    reason: Refusal,
    detail: &str,
) {
    inner.failed(record, reason, detail);
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
    close: &authorize::Revocation,
) {
    let open = inner.opened(&record);
    let transfer = relay::relay(client, upstream, &open.counters, Some(close)).await;
    inner.closed(&record, &open, &transfer, started);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_connection_waiting_in_the_backlog_is_taken_without_waiting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(accept_queued(&listener).is_none(), "nothing queued: no wait, no connection");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut accepted, peer) = accept_queued(&listener).expect("the queued connection");
        assert_eq!(peer, client.local_addr().unwrap());
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping", "the socket works with the runtime");
        assert!(accept_queued(&listener).is_none());
    }
}
