//! Kernel-level tracing, userspace side: reads the sock_ops program's events from the
//! `AMBIT_EVENTS` ring buffer, attributes each to its pod (by network namespace cookie) and
//! to the peer (by address, through the mesh state), and feeds three outlets:
//!
//! - a live stream of [`Event`]s (admin `GET /trace`, which `ambit trace` reads);
//! - Prometheus: `ambit_tcp_rtt_seconds` and `ambit_tcp_retransmits_total` per
//!   source/destination workload pair, for sockets that cross the network;
//! - per-socket figures (smoothed RTT, retransmissions) the access log reads for the socket
//!   that carried a connection ([`Tracer::leg`]).

mod cli;
pub mod event;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    sync::{Arc, Mutex, RwLock, RwLockReadGuard},
    time::{Duration, Instant},
};

use ambit_common::{trace as k, AF_INET};
use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use tokio::{io::unix::AsyncFd, sync::broadcast};
use tokio_util::sync::CancellationToken;

pub use cli::{run, TraceArgs};
pub use event::{Event, Filter, Peer};

use crate::{
    metrics::Metrics,
    os::cookie::{NetnsCookie, SocketCookie},
    pod::{Leg, PodRegistry},
    sparse::ShrinkIfSparse as _,
    state::StateStore,
};

/// Events a slow `/trace` subscriber may fall behind by before it loses some.
const STREAM_BACKLOG: usize = 4096;
/// How long a closed socket's figures stay readable (the access log line of a connection is
/// written just after its sockets close).
const CLOSED_KEPT: Duration = Duration::from_secs(10);

/// What the access log wants of a socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LegStats {
    pub srtt_us: u32,
    pub retransmits: u32,
}

/// Figures of the sockets that carry connections over the network, and when those that
/// closed did (oldest first), so they are forgotten in order.
#[derive(Default)]
struct Sockets {
    stats: HashMap<u64, LegStats>,
    closed: std::collections::VecDeque<(Instant, u64)>,
}

/// Who is at the other end of a socket the proxy made to deliver an inbound connection (the
/// kernel only sees the proxy there): registered by the proxy around its connect, kept while
/// that socket or the pod's end of it (the accepted socket) is open, whichever closes last.
/// Every open inbound connection has one, so the part its client shares with the client's
/// other connections (namespace, workload, identity) is stored once.
struct Hint {
    peer: Arc<Peer>,
    /// The client's own address (the peer's `address` in events).
    address: SocketAddr,
    /// Sockets of the pair seen open and not yet closed: the delivering one, and the
    /// accepted one once established.
    open: u8,
}

/// Delivery hints by (netns cookie, the delivering socket's local port), and the distinct
/// peers they name.
#[derive(Default)]
struct Hints {
    by_socket: HashMap<(u64, u16), Hint>,
    peers: HashSet<Arc<Peer>>,
}

impl Hints {
    fn insert(&mut self, key: (u64, u16), peer: Peer, address: SocketAddr) {
        let peer = match self.peers.get(&peer) {
            Some(shared) => shared.clone(),
            None => {
                let shared = Arc::new(peer);
                self.peers.insert(shared.clone());
                shared
            }
        };
        if let Some(old) = self.by_socket.insert(key, Hint { peer, address, open: 1 }) {
            self.release(old);
        }
    }

    /// The pod accepted the delivery: the hint now also lasts for the accepted socket.
    /// `false` when there is no hint (yet).
    fn adopt(&mut self, key: (u64, u16)) -> bool {
        self.by_socket.get_mut(&key).map(|h| h.open = h.open.saturating_add(1)).is_some()
    }

    /// One socket of the pair closed; the hint goes with the last.
    fn close(&mut self, key: (u64, u16)) {
        let Some(h) = self.by_socket.get_mut(&key) else { return };
        h.open = h.open.saturating_sub(1);
        if h.open == 0 {
            if let Some(old) = self.by_socket.remove(&key) {
                self.release(old);
            }
            self.by_socket.shrink_if_sparse();
        }
    }

    /// The peer as an event names it. Under the lock: the shared peers' counts only change
    /// here, so `release` can tell the last user.
    fn peer(&self, key: (u64, u16)) -> Option<Peer> {
        self.by_socket
            .get(&key)
            .map(|h| Peer { address: Some(h.address.to_string()), ..Peer::clone(&h.peer) })
    }

    fn release(&mut self, hint: Hint) {
        // The set's reference and this one: no other hint names this peer.
        if Arc::strong_count(&hint.peer) == 2 {
            self.peers.remove(&hint.peer);
            self.peers.shrink_if_sparse();
        }
    }
}

struct Inner {
    node: String,
    hbone_port: u16,
    pods: Arc<PodRegistry>,
    state: Arc<StateStore>,
    sockets: Mutex<Sockets>,
    /// (netns cookie, the delivering socket's local port) → the original client.
    hints: Mutex<Hints>,
    /// Held (shared) by each delivery from its `connect` until its hint is in: the kernel
    /// assigns the port during `connect`, and over loopback the whole handshake may be in the
    /// ring buffer before the proxy knows the port. A reader that finds no hint for a
    /// delivery's socket takes it exclusively, which waits those deliveries out.
    delivering: RwLock<()>,
    tx: broadcast::Sender<Arc<Event>>,
    rtt: HistogramVec,
    retransmits: IntCounterVec,
    events: IntCounterVec,
    /// The ring buffer, once reading started, and the start (events older than it were left
    /// from before this process and are skipped). Drained by the reader, and by `leg` when
    /// it misses (a socket's events may still be waiting for the reader's next drain).
    ring: std::sync::OnceLock<(Mutex<RingBuf<MapData>>, u64)>,
}

/// The tracing outlets; cheap to clone.
#[derive(Clone)]
pub struct Tracer(Arc<Inner>);

/// A delivery between its `connect` and its hint (see [`Tracer::delivering`]). Not `Send`:
/// it must not be held across an await.
pub struct Delivering<'a> {
    _held: RwLockReadGuard<'a, ()>,
    hints: &'a Mutex<Hints>,
    netns_cookie: u64,
    peer: Peer,
    client: SocketAddr,
}

impl Delivering<'_> {
    /// The delivering socket has its port: name the client behind it.
    pub fn connected(self, local_port: u16) {
        let Delivering { _held, hints, netns_cookie, peer, client } = self;
        hints.lock().unwrap_or_else(|p| p.into_inner()).insert((netns_cookie, local_port), peer, client);
    }
}

const PAIR: [&str; 4] = [
    "source_workload",
    "source_workload_namespace",
    "destination_workload",
    "destination_workload_namespace",
];

fn ip(family: u16, b: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        let v6 = Ipv6Addr::from(*b);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

fn kind_name(kind: u16) -> &'static str {
    match kind {
        k::EV_CONNECT => "connect",
        k::EV_ESTABLISHED => "established",
        k::EV_STATE => "state",
        k::EV_RTT => "rtt",
        k::EV_RETRANSMIT => "retransmit",
        k::EV_CLOSE => "close",
        k::EV_RESET => "reset",
        _ => "unknown",
    }
}

fn state_name(s: u8) -> String {
    k::TCP_STATES.get(usize::from(s)).copied().unwrap_or("UNKNOWN").to_string()
}

/// The monotonic clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl Tracer {
    pub fn new(
        node: &str,
        hbone_port: u16,
        pods: Arc<PodRegistry>,
        state: Arc<StateStore>,
        metrics: &Metrics,
    ) -> Tracer {
        let rtt = HistogramVec::new(
            HistogramOpts::new(
                "ambit_tcp_rtt_seconds",
                "Smoothed TCP round-trip time of connections crossing the network, sampled by the kernel \
                 (at most once a second per connection), per source and destination workload.",
            )
            .buckets(vec![
                50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
            ]),
            &PAIR,
        )
        .expect("valid metric");
        let retransmits = IntCounterVec::new(
            Opts::new(
                "ambit_tcp_retransmits_total",
                "TCP segments retransmitted on connections crossing the network, per source and destination workload.",
            ),
            &PAIR,
        )
        .expect("valid metric");
        let events = IntCounterVec::new(
            Opts::new("ambit_trace_events_total", "Kernel trace events read, by kind."),
            &["kind"],
        )
        .expect("valid metric");
        metrics.register(Box::new(rtt.clone()));
        metrics.register(Box::new(retransmits.clone()));
        metrics.register(Box::new(events.clone()));
        let (tx, _) = broadcast::channel(STREAM_BACKLOG);
        Tracer(Arc::new(Inner {
            node: node.to_string(),
            hbone_port,
            pods,
            state,
            sockets: Mutex::new(Sockets::default()),
            hints: Mutex::new(Hints::default()),
            delivering: RwLock::new(()),
            tx,
            rtt,
            retransmits,
            events,
            ring: std::sync::OnceLock::new(),
        }))
    }

    /// Reads the ring buffer until `stop`. Events older than this call (left in the pinned
    /// buffer while no proxy ran) are dropped.
    pub fn spawn_reader(&self, ring: RingBuf<MapData>, stop: CancellationToken) -> anyhow::Result<()> {
        // Readiness through a duplicate of the map's descriptor (same open file, same
        // wakeups); the ring itself is shared with `leg`.
        let dup =
            ring.as_fd().try_clone_to_owned().context("duplicating the trace ring buffer's descriptor")?;
        // SAFETY: the AsyncFd owns the duplicate descriptor, so it stays open (and means the
        // same file) for as long as it is registered.
        let mut fd = unsafe { AsyncFd::register(dup) }.context("registering the trace ring buffer")?;
        if self.0.ring.set((Mutex::new(ring), monotonic_ns())).is_err() {
            anyhow::bail!("the trace ring buffer is already being read");
        }
        let me = self.clone();
        tokio::spawn(async move {
            // The kernel wakes the reader only for a batch (`WAKEUP_BYTES`); the rest is
            // drained on this tick.
            let mut tick = tokio::time::interval(Duration::from_millis(k::DRAIN_INTERVAL_MS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => me.drain(),
                    g = fd.readable_mut() => match g {
                        Ok(mut guard) => {
                            me.drain();
                            guard.clear_ready();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "trace ring buffer: no longer readable; tracing stops");
                            return;
                        }
                    },
                }
            }
        });
        Ok(())
    }

    /// Handles every event waiting in the ring buffer.
    fn drain(&self) {
        let Some((ring, since)) = self.0.ring.get() else { return };
        self.drain_locked(ring.lock().unwrap_or_else(|p| p.into_inner()), *since);
    }

    fn drain_locked(&self, mut ring: std::sync::MutexGuard<'_, RingBuf<MapData>>, since: u64) {
        while let Some(item) = ring.next() {
            match k::TraceEvent::from_bytes(&item) {
                Some(raw) if raw.ts_ns >= since => self.handle(&raw),
                Some(_) => {}
                None => tracing::warn!(len = item.len(), "trace ring buffer: short record skipped"),
            }
        }
    }

    /// A live stream of events.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.0.tx.subscribe()
    }

    /// The kernel's figures for a socket (by `SO_COOKIE`), while traced or shortly after.
    pub fn leg(&self, cookie: SocketCookie) -> Option<LegStats> {
        self.0.sockets.lock().unwrap_or_else(|p| p.into_inner()).stats.get(&cookie.get()).copied()
    }

    /// As [`Tracer::leg`], but a socket not seen yet makes it read the events waiting in the
    /// ring buffer first (a connection shorter than the reader's drain interval, on a new
    /// socket). Skipped while the reader is at it: it is handling them right now.
    pub fn leg_now(&self, cookie: SocketCookie) -> Option<LegStats> {
        self.leg(cookie).or_else(|| {
            let (ring, since) = self.0.ring.get()?;
            let ring = ring.try_lock().ok()?;
            self.drain_locked(ring, *since);
            self.leg(cookie)
        })
    }

    /// Starts delivering an inbound connection from `client` (`peer`'s `address` is ignored)
    /// into the pod of `netns_cookie`: call before the delivering socket's `connect`, and
    /// [`Delivering::connected`] right after it, without awaiting in between. Events of the
    /// socket (and of the pod's accepted one) then name the client until the socket closes.
    pub fn delivering(&self, netns_cookie: NetnsCookie, peer: Peer, client: SocketAddr) -> Delivering<'_> {
        Delivering {
            _held: self.0.delivering.read().unwrap_or_else(|p| p.into_inner()),
            hints: &self.0.hints,
            netns_cookie: netns_cookie.0,
            peer: Peer { address: None, ..peer },
            client,
        }
    }

    /// `f` on the hints, again after waiting for the deliveries in flight if it found
    /// nothing (`None`, `false`): a miss may be a delivery whose `connect` has not returned.
    fn with_hints<T: Default + PartialEq>(&self, f: impl Fn(&mut Hints) -> T) -> T {
        let i = &self.0;
        let attempt = || f(&mut i.hints.lock().unwrap_or_else(|e| e.into_inner()));
        let found = attempt();
        if found != T::default() {
            return found;
        }
        drop(i.delivering.write().unwrap_or_else(|e| e.into_inner()));
        attempt()
    }

    /// The hint naming the client behind a delivery's socket, or the pod's accepted end of it.
    fn hint_for(&self, key: (u64, u16)) -> Option<Peer> {
        self.with_hints(|h| h.peer(key))
    }

    /// The delivery hint a socket's event belongs to: (netns cookie, the delivering socket's
    /// port). The proxy's delivering socket by its local port, the pod's accepted end of it
    /// (passive, both ends on one address) by its remote port.
    fn hint_key(raw: &k::TraceEvent, leg: Leg) -> Option<(u64, u16)> {
        let same_host = raw.local == raw.remote;
        // The pod's accepted end of a delivery: from the client's address it carries the
        // delivery mark (taken from the proxy's SYN), from the pod's own it is on one address.
        let delivered = raw.proxy == k::PROXY_DELIVERY || same_host;
        match leg {
            Leg::Delivery => Some((raw.netns_cookie, raw.local_port)),
            Leg::App if raw.passive != 0 && delivered => Some((raw.netns_cookie, raw.remote_port)),
            _ => None,
        }
    }

    fn handle(&self, raw: &k::TraceEvent) {
        let i = &self.0;
        let kind = kind_name(raw.kind);
        i.events.with_label_values(&[kind]).inc();
        let leg = self.leg_of(raw);
        let crosses = leg.crosses_network();
        self.account(raw, crosses);
        let hint = Self::hint_key(raw, leg);
        if let (Some(key), k::EV_ESTABLISHED, true) = (hint, raw.kind, raw.passive != 0) {
            // Not a delivery (a pod dialling its own address) when there is none.
            let _delivered = self.with_hints(|h| h.adopt(key));
        }
        // Attribution (state lookups, strings) only when someone uses it: a subscriber, or
        // the per-pair metrics.
        let pair_metric = crosses && matches!(raw.kind, k::EV_RTT | k::EV_RETRANSMIT);
        let subscribed = i.tx.receiver_count() > 0;
        if pair_metric || subscribed {
            let event = self.attribute(raw, kind, leg);
            if pair_metric {
                self.pair_metrics(raw, &event);
            }
            if subscribed {
                // A subscriber may have gone since: not an error.
                let _gone = i.tx.send(Arc::new(event));
            }
        }
        // After the attribution: a socket's last event still names the client.
        if let (Some(key), k::EV_CLOSE | k::EV_RESET) = (hint, raw.kind) {
            i.hints.lock().unwrap_or_else(|p| p.into_inner()).close(key);
        }
    }

    /// What the socket is (see [`Event::leg`]), from the event alone.
    fn leg_of(&self, raw: &k::TraceEvent) -> Leg {
        let passive = raw.passive != 0;
        let same_host = raw.local == raw.remote;
        if raw.local_port == self.0.hbone_port || (!passive && raw.remote_port == self.0.hbone_port) {
            Leg::Tunnel
        } else if raw.proxy == k::PROXY_DELIVERY {
            // The proxy's socket delivering from the client's address, or the application's
            // accepted end of it.
            if passive {
                Leg::App
            } else {
                Leg::Delivery
            }
        } else if raw.proxy == k::PROXY_OWN && same_host {
            Leg::Delivery
        } else if raw.proxy == k::PROXY_OWN {
            Leg::Upstream
        } else if passive && !same_host {
            Leg::Inbound
        } else {
            Leg::App
        }
    }

    /// The pod, the peer and the socket's role.
    fn attribute(&self, raw: &k::TraceEvent, kind: &str, leg: Leg) -> Event {
        let i = &self.0;
        let local = SocketAddr::new(ip(raw.family, &raw.local), raw.local_port);
        let remote = SocketAddr::new(ip(raw.family, &raw.remote), raw.remote_port);
        let orig =
            (raw.orig_port != 0).then(|| SocketAddr::new(ip(raw.orig_family, &raw.orig), raw.orig_port));
        let passive = raw.passive != 0;
        // Who is at the other end: the client a delivery serves (both the proxy's socket and
        // the pod's accepted one), else whatever the mesh has at the address dialled.
        // Before taking the state: a miss may wait for deliveries in flight.
        let hint = Self::hint_key(raw, leg).and_then(|key| self.hint_for(key));
        let pod = i.pods.get(NetnsCookie(raw.netns_cookie));
        let state = i.state.read();
        let own_workload = pod.as_ref().and_then(|p| p.ips.iter().find_map(|ip| state.workload_by_ip(*ip)));
        let peer = match hint {
            Some(peer) => peer,
            None => {
                let addr = orig.unwrap_or(remote);
                let service = state.service_by_vip(addr.ip()).map(|s| s.key.clone());
                match state.workload_by_ip(addr.ip()) {
                    Some(w) => Peer {
                        namespace: Some(w.namespace.clone()),
                        workload: Some(if w.workload_name.is_empty() {
                            w.name.clone()
                        } else {
                            w.workload_name.clone()
                        }),
                        identity: Some(w.identity.to_string()),
                        service,
                        address: None,
                    },
                    None => Peer { service, ..Peer::default() },
                }
            }
        };
        drop(state);
        let (namespace, pod_name, identity) = match &pod {
            Some(p) => (p.namespace.clone(), p.name.clone(), p.identity.as_ref().map(ToString::to_string)),
            None => ("unknown".into(), format!("netns-{}", raw.netns_cookie), None),
        };
        let workload = own_workload
            .map(|w| if w.workload_name.is_empty() { w.name.clone() } else { w.workload_name.clone() })
            .unwrap_or_else(|| pod_name.clone());
        let states = matches!(raw.kind, k::EV_STATE | k::EV_CLOSE | k::EV_RESET | k::EV_ESTABLISHED);
        Event {
            time: crate::trace::cli::now_rfc3339(),
            node: i.node.clone(),
            kind: kind.to_string(),
            leg,
            direction: if passive { "inbound" } else { "outbound" }.to_string(),
            namespace,
            pod: pod_name,
            workload,
            identity,
            local: local.to_string(),
            remote: remote.to_string(),
            original_destination: orig.map(|o| o.to_string()),
            peer,
            old_state: states.then(|| state_name(raw.old_state)),
            new_state: states.then(|| state_name(raw.new_state)),
            srtt_us: raw.srtt_us,
            retransmits: raw.total_retrans,
            segments: (raw.kind == k::EV_RETRANSMIT).then_some(raw.segments),
            bytes_received: raw.bytes_received,
            bytes_acked: raw.bytes_acked,
            socket_cookie: raw.socket_cookie,
        }
    }

    /// Per-socket figures for the access log (sockets that cross the network only).
    fn account(&self, raw: &k::TraceEvent, crosses: bool) {
        let i = &self.0;
        let closing = matches!(raw.kind, k::EV_CLOSE | k::EV_RESET);
        if !crosses {
            return;
        }
        let mut sockets = i.sockets.lock().unwrap_or_else(|p| p.into_inner());
        let s = sockets.stats.entry(raw.socket_cookie).or_default();
        if raw.srtt_us > 0 {
            s.srtt_us = raw.srtt_us;
        }
        s.retransmits = s.retransmits.max(raw.total_retrans);
        if closing {
            let now = Instant::now();
            sockets.closed.push_back((now, raw.socket_cookie));
            while let Some(&(t, cookie)) = sockets.closed.front() {
                if now.duration_since(t) < CLOSED_KEPT {
                    break;
                }
                sockets.closed.pop_front();
                sockets.stats.remove(&cookie);
            }
            sockets.stats.shrink_if_sparse();
            sockets.closed.shrink_if_sparse();
        }
    }

    /// RTT and retransmits per source/destination workload pair.
    fn pair_metrics(&self, raw: &k::TraceEvent, e: &Event) {
        let i = &self.0;
        let me = (e.workload.as_str(), e.namespace.as_str());
        let them = (
            e.peer.workload.as_deref().unwrap_or("unknown"),
            e.peer.namespace.as_deref().unwrap_or("unknown"),
        );
        let (src, dst) = if e.direction == "outbound" { (me, them) } else { (them, me) };
        let labels = [src.0, src.1, dst.0, dst.1];
        if raw.kind == k::EV_RTT {
            i.rtt.with_label_values(&labels).observe(f64::from(raw.srtt_us) / 1e6);
        } else {
            i.retransmits.with_label_values(&labels).inc_by(u64::from(raw.segments.max(1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ns: &str) -> Peer {
        Peer { namespace: Some(ns.into()), workload: Some("client".into()), ..Peer::default() }
    }

    #[test]
    fn hints_share_a_peer_and_forget_it_with_its_last_socket() {
        let mut h = Hints::default();
        let (a, b): (SocketAddr, SocketAddr) =
            ("10.0.0.1:4000".parse().unwrap(), "10.0.0.1:4001".parse().unwrap());
        h.insert((1, 100), client("x"), a);
        h.insert((1, 101), client("x"), b);
        h.insert((2, 100), client("y"), a);
        assert_eq!(h.peers.len(), 2, "one copy per distinct peer");
        let seen = h.peer((1, 101)).expect("hinted");
        assert_eq!(seen, Peer { address: Some(b.to_string()), ..client("x") });
        h.close((1, 100));
        assert_eq!(h.peers.len(), 2, "x is still named by (1, 101)");
        h.close((1, 101));
        h.close((2, 100));
        assert!(h.peers.is_empty() && h.by_socket.is_empty());
        assert_eq!(h.peer((1, 101)), None);
        // A port reused before its close was seen: the old hint's peer is released.
        h.insert((3, 1), client("x"), a);
        h.insert((3, 1), client("y"), a);
        assert_eq!(h.peers.len(), 1);
    }

    #[test]
    fn a_miss_waits_for_the_delivery_still_between_its_connect_and_its_hint() {
        let tracer = Tracer::new("n", 15008, Arc::default(), Arc::default(), &Metrics::new());
        let client_addr: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let (in_connect, go) = (std::sync::Barrier::new(2), Duration::from_millis(100));
        std::thread::scope(|s| {
            s.spawn(|| {
                let d = tracer.delivering(NetnsCookie(7), client("x"), client_addr);
                in_connect.wait();
                // The events are being read while the connect has not returned.
                std::thread::sleep(go);
                d.connected(4242);
            });
            in_connect.wait();
            let seen = tracer.hint_for((7, 4242));
            assert_eq!(seen, Some(Peer { address: Some(client_addr.to_string()), ..client("x") }));
        });
        // No delivery in flight: a miss is a miss, at once.
        assert_eq!(tracer.hint_for((7, 4243)), None);
    }

    /// A socket event in the pod of netns 7 at 10.2.0.2: the proxy's delivering socket from
    /// port 40000 to the application's 8080, or the application's accepted end of it.
    fn delivery_event(kind: u16, accepted: bool) -> k::TraceEvent {
        let mut ip = [0; 16];
        ip[..4].copy_from_slice(&[10, 2, 0, 2]);
        let (local_port, remote_port) = if accepted { (8080, 40000) } else { (40000, 8080) };
        k::TraceEvent {
            kind,
            family: AF_INET,
            netns_cookie: 7,
            socket_cookie: if accepted { 2 } else { 1 },
            local: ip,
            remote: ip,
            local_port,
            remote_port,
            passive: u8::from(accepted),
            proxy: u8::from(!accepted),
            ..k::TraceEvent::default()
        }
    }

    #[test]
    fn both_ends_of_a_delivery_name_the_client_until_the_last_one_closes() {
        let tracer = Tracer::new("n", 15008, Arc::default(), Arc::default(), &Metrics::new());
        let mut events = tracer.subscribe();
        let client_addr: SocketAddr = "10.1.0.2:5000".parse().unwrap();
        tracer.delivering(NetnsCookie(7), client("x"), client_addr).connected(40000);
        // The proxy closes its end first (the client half-closed); the application's end
        // closes after it.
        for (kind, accepted) in [
            (k::EV_CONNECT, false),
            (k::EV_ESTABLISHED, false),
            (k::EV_ESTABLISHED, true),
            (k::EV_CLOSE, false),
            (k::EV_CLOSE, true),
        ] {
            tracer.handle(&delivery_event(kind, accepted));
            let e = events.try_recv().expect("an event per kernel event");
            assert_eq!(
                (e.kind.as_str(), e.leg.as_str(), e.peer.workload.as_deref()),
                (kind_name(kind), if accepted { "app" } else { "delivery" }, Some("client")),
                "{e:?}"
            );
            assert_eq!(e.peer.address, Some(client_addr.to_string()));
        }
        let hints = tracer.0.hints.lock().unwrap();
        assert!(hints.by_socket.is_empty() && hints.peers.is_empty(), "gone with the last socket");
    }
}
