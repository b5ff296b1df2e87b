//! Inbound HBONE: the 15008 listener on each enrolled pod's IP, inside the pod's netns.
//!
//! mTLS (any client certificate of our trust domain, chained to the mesh root), then HTTP/2;
//! each CONNECT stream is answered as ztunnel does: 400 when `:authority` is malformed or not
//! this pod's address the tunnel arrived on, 503 when it names one of the proxy's own ports
//! or the application cannot be reached, 401 when the workload's authorization policies deny
//! the client, 200 and raw bytes otherwise.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Request, Response, StatusCode};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::head::{connect_target, forwarded_host};
use crate::{
    capture::addr,
    pod::{Direction, Refusal},
    proxy::{
        authorize::{self, Subject, VerifiedPeer},
        ConnRecord, Inner, PodCtx,
    },
    sparse::ShrinkIfSparse as _,
};

/// Open connections per peer address on one pod's listener: one peer cannot hold all the
/// proxy's descriptors.
#[derive(Default)]
struct PeerConnections(Mutex<HashMap<IpAddr, u32>>);

/// One admitted connection; gives its place back when dropped.
struct PeerSlot {
    peers: Arc<PeerConnections>,
    ip: IpAddr,
}

impl PeerConnections {
    fn admit(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<PeerSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot { peers: self.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.peers.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
                m.shrink_if_sparse();
            }
        }
    }
}

/// Accepts HBONE connections for `pod` until `stop`; connections accepted live on.
pub fn serve(
    inner: Arc<Inner>,
    pod: Arc<PodCtx>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let peers = Arc::new(PeerConnections::default());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let max = inner.settings.hbone.max_connections_per_peer;
                    let Some(slot) = peers.admit(peer.ip(), max) else {
                        let record = ConnRecord::inbound(&pod, peer, tcp.local_addr().ok(), None, false);
                        let detail =
                            format!("{} has {max} HBONE connections open to this pod already", peer.ip());
                        inner.failed(&record, Refusal::HbonePeerLimit, &detail);
                        continue;
                    };
                    let (inner, pod, acceptor) = (inner.clone(), pod.clone(), acceptor.clone());
                    inner.connections.clone().spawn(async move {
                        connection(&inner, pod, acceptor, tcp, peer).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(pod = %pod.key(), error = %e, "HBONE accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}

async fn connection(
    inner: &Arc<Inner>,
    pod: Arc<PodCtx>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let s = &inner.settings.hbone;
    let Ok(local) = tcp.local_addr() else { return };
    let leg = crate::os::netns::socket_cookie(&tcp).ok();
    // HEADERS frames and small records must not wait for ACKs (Nagle).
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY on an HBONE connection");
    }
    let tcp = super::read_buffer::ReadBuffered::new(tcp, super::TLS_READ_BUFFER);
    let tls = match tokio::time::timeout(s.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(pod = %pod.key(), %peer, error = %e, "HBONE TLS handshake refused");
            inner.failed(
                &ConnRecord::inbound(&pod, peer, Some(local), None, false),
                Refusal::HboneTlsRefused,
                &e.to_string(),
            );
            return;
        }
        Err(_) => {
            let record = ConnRecord::inbound(&pod, peer, Some(local), None, false);
            inner.failed(&record, Refusal::HboneTlsTimeout, "the TLS handshake did not complete in time");
            return;
        }
    };
    let peer_identity = crate::tls::peer_identity(tls.get_ref().1).map(|i| Arc::new(VerifiedPeer::new(i)));
    let handshake = h2::server::Builder::new()
        .initial_window_size(s.stream_window)
        .initial_connection_window_size(s.connection_window)
        .max_frame_size(s.max_frame_size)
        .max_concurrent_streams(s.max_streams)
        .max_header_list_size(s.max_header_bytes)
        .handshake::<_, Bytes>(tls);
    // The preface counts as handshake too: a peer that stops after TLS holds nothing long.
    let mut conn = match tokio::time::timeout(s.handshake_timeout, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(pod = %pod.key(), %peer, error = %e, "HBONE HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            let record = ConnRecord::inbound(&pod, peer, Some(local), peer_uri(&peer_identity), true);
            inner.failed(&record, Refusal::HboneHttp2Timeout, "the HTTP/2 preface did not arrive in time");
            return;
        }
    };
    // Accepting drives the connection (and answers PINGs); each stream runs on its own.
    while let Some(stream) = conn.accept().await {
        match stream {
            Ok((req, respond)) => {
                let (inner, pod, peer_identity) = (inner.clone(), pod.clone(), peer_identity.clone());
                let tracker = inner.connections.clone();
                // One box for the stream's arguments: the task itself stays small.
                let args = Box::new(TunnelArgs {
                    inner,
                    pod,
                    conn: (peer, local, leg),
                    peer_identity,
                    req,
                    respond,
                });
                let task = tunnel(args);
                crate::proxy::debug_assert_task_size(std::mem::size_of_val(&task));
                tracker.spawn(task);
            }
            Err(e) => {
                tracing::debug!(pod = %pod.key(), %peer, error = %e, "HBONE connection ended");
                return;
            }
        }
    }
}

fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder().status(status).body(()).expect("a status-only response");
    if let Err(e) = respond.send_response(resp, true) {
        tracing::debug!(error = %e, "answering a CONNECT");
    }
}

fn peer_uri(peer: &Option<Arc<VerifiedPeer>>) -> Option<&Arc<str>> {
    peer.as_ref().map(|p| &p.uri)
}

/// A CONNECT stream as accepted: its head is only read while the tunnel is set up.
struct TunnelArgs {
    inner: Arc<Inner>,
    pod: Arc<PodCtx>,
    /// `(peer, local, leg)`: the HBONE connection's addresses and `SO_COOKIE`.
    conn: (SocketAddr, SocketAddr, Option<crate::os::cookie::SocketCookie>),
    peer_identity: Option<Arc<VerifiedPeer>>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
}

/// What an open tunnel holds while its bytes flow: every idle tunnel keeps this (and the
/// relay's state), so what only the setup needs stays in the setup's own allocation.
struct Served<'p> {
    record: ConnRecord<'p>,
    registration: authorize::Registration<'p>,
    open: crate::proxy::Opened,
    upstream: tokio::net::TcpStream,
    send: h2::SendStream<Bytes>,
    body: RecvStream,
    started: Instant,
}

/// One CONNECT stream, from its head to the end of its bytes.
async fn tunnel(args: Box<TunnelArgs>) {
    let (inner, pod) = (args.inner.clone(), args.pod.clone());
    // Boxed: the setup's state (request head, TLS identities, the connect) is freed before
    // the relay starts instead of sizing the task for the tunnel's whole life.
    // Taken apart into locals: a struct whose socket and stream halves were moved into the
    // relay would keep its whole slot in the task while the relay holds them too.
    let Some(Served { record, registration, open, upstream, send, body, started }) =
        Box::pin(set_up(&inner, &pod, args)).await
    else {
        return;
    };
    let counters = &open.counters;
    // The application's side of the tunnel sends the response and receives the request.
    let transfer =
        super::relay(upstream, send, body, counters, super::End::Answering, Some(registration.closed()))
            .await;
    // As the other directions report it: sent is the request (what the tunnel delivered).
    let transfer =
        crate::proxy::Transfer { sent: transfer.received, received: transfer.sent, error: transfer.error };
    inner.closed(&record, &open, &transfer, started);
}

/// Checks the CONNECT, authorizes it, connects to the application and answers 200; `None`
/// when it was refused (answered, counted and logged here).
async fn set_up<'p>(
    inner: &'p Arc<Inner>,
    pod: &'p Arc<PodCtx>,
    args: Box<TunnelArgs>,
) -> Option<Served<'p>> {
    let TunnelArgs { conn: (peer, local, leg), peer_identity, req, mut respond, .. } = *args;
    let started = Instant::now();
    // The client is the tunnel's peer: the source pod's address (tunnels leave from the pod's
    // network namespace). A `forwarded` header is the client's claim and is never trusted for
    // authorization, logs or metrics; Istio's ztunnel trusts it only from its own waypoints,
    // which ambit does not run.
    let src = peer;
    let mut fail = |status: StatusCode, dst: Option<SocketAddr>, reason: Refusal, detail: &str| {
        answer(&mut respond, status);
        inner.failed(&ConnRecord::inbound(pod, src, dst, peer_uri(&peer_identity), true), reason, detail);
        None
    };
    let dst = match connect_target(req.method(), req.uri().authority().map(http::uri::Authority::as_str)) {
        Ok(dst) => dst,
        Err((status, reason, detail)) => return fail(status, None, reason, detail),
    };
    if dst.ip() != addr::canonical(local.ip()) {
        let detail = format!("the tunnel arrived on {}, not {}", local.ip(), dst.ip());
        return fail(StatusCode::BAD_REQUEST, Some(dst), Refusal::WrongDestination, &detail);
    }
    if inner.settings.own_ports.contains(&dst.port()) {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(dst),
            Refusal::Loop,
            "the target is one of the proxy's own ports",
        );
    }
    // The service the client dialled, as it named it (ztunnel's `forwarded` `host=`) or
    // guessed from the port, so that both ends report the same `destination_service`.
    let host = req.headers().get(http::header::FORWARDED).and_then(|v| forwarded_host(v.as_bytes()));
    let service: Option<Box<str>> = inner.state.read().inbound_service(dst, host).map(Into::into);
    let subject = Subject { peer: peer_identity.clone(), src, dst, mtls: true };
    if authorize::check(inner, pod, &subject).is_err() {
        // Logged and counted by the check.
        answer(&mut respond, StatusCode::UNAUTHORIZED);
        let mut record = ConnRecord::inbound(pod, src, Some(dst), peer_uri(&peer_identity), true);
        record.dst_service = service;
        inner.metrics.connection_failed(
            Direction::Inbound,
            pod,
            Refusal::AuthorizationDenied,
            &record.labels(&inner.state.read(), &inner.metrics.sides),
        );
        return None;
    }
    let registration = inner.open.register(pod.clone(), subject);
    let mut record = ConnRecord::inbound(pod, src, Some(dst), peer_uri(&peer_identity), true);
    record.dst_service = service;
    // The HBONE connection's socket carries it over the network.
    record.leg = leg;
    let upstream = match inner.deliver(&mut record, dst).await {
        Ok(u) => u,
        Err(e) => {
            return fail(StatusCode::SERVICE_UNAVAILABLE, Some(dst), Refusal::ConnectFailed, &e.to_string())
        }
    };
    let ok = Response::builder().status(StatusCode::OK).body(()).expect("a status-only response");
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(pod = %pod.key(), error = %e, "the client went away before the tunnel opened");
            return None;
        }
    };
    let open = inner.opened(&record);
    Some(Served { record, registration, open, upstream, send, body: req.into_body(), started })
}
