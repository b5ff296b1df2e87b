//! Inbound HBONE: the 15008 listener on each enrolled pod's IP, inside the pod's netns.
//!
//! mTLS (any client certificate of our trust domain, chained to the mesh root), then HTTP/2;
//! each CONNECT stream is answered as ztunnel does: 400 when `:authority` is malformed or not
//! this pod's address the tunnel arrived on, 503 when it names one of the proxy's own ports
//! or the application cannot be reached, 401 when the workload's authorization policies deny
//! the client, 200 and raw bytes otherwise.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Request, Response, StatusCode};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    authz::Peer,
    capture::addr,
    identity::Identity,
    inpod::Direction,
    proxy::{
        authorize::{self, Subject},
        upstream, ConnRecord, Inner, PodCtx,
    },
};

/// Accepts HBONE connections for `pod` until `stop`; connections accepted live on.
pub fn serve(
    inner: Arc<Inner>,
    pod: Arc<PodCtx>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let (inner, pod, acceptor) = (inner.clone(), pod.clone(), acceptor.clone());
                    inner.connections.clone().spawn(async move {
                        connection(&inner, pod, acceptor, tcp, peer).await;
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
    let tls = match tokio::time::timeout(s.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            inner.metrics.connection_failed(Direction::Inbound, &pod, "hbone_tls_refused");
            tracing::warn!(pod = %pod.key(), %peer, error = %e, "HBONE TLS handshake refused");
            return;
        }
        Err(_) => {
            inner.metrics.connection_failed(Direction::Inbound, &pod, "hbone_tls_timeout");
            tracing::warn!(pod = %pod.key(), %peer, "HBONE TLS handshake timed out");
            return;
        }
    };
    let peer_identity = crate::tls::peer_identity(tls.get_ref().1);
    let mut conn = match h2::server::Builder::new()
        .initial_window_size(s.stream_window)
        .initial_connection_window_size(s.connection_window)
        .max_frame_size(s.max_frame_size)
        .max_concurrent_streams(s.max_streams)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(pod = %pod.key(), %peer, error = %e, "HBONE HTTP/2 handshake failed");
            return;
        }
    };
    // Accepting drives the connection (and answers PINGs); each stream runs on its own.
    while let Some(stream) = conn.accept().await {
        match stream {
            Ok((req, respond)) => {
                let (inner, pod, peer_identity) = (inner.clone(), pod.clone(), peer_identity.clone());
                inner.connections.clone().spawn(async move {
                    tunnel(&inner, &pod, peer, local, peer_identity, req, respond).await;
                });
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

/// The original client's address from `forwarded: for="..."`, if the header carries one.
fn forwarded_for(req: &Request<RecvStream>) -> Option<std::net::IpAddr> {
    let v = req.headers().get("forwarded")?.to_str().ok()?;
    let f = v.split(';').find_map(|p| p.trim().strip_prefix("for="))?;
    f.trim_matches('"').trim_start_matches('[').trim_end_matches(']').parse().ok()
}

async fn tunnel(
    inner: &Arc<Inner>,
    pod: &Arc<PodCtx>,
    peer: SocketAddr,
    local: SocketAddr,
    peer_identity: Option<Identity>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let src = forwarded_for(&req).map_or(peer, |ip| SocketAddr::new(ip, peer.port()));
    let mut fail = |status: StatusCode, dst: Option<SocketAddr>, reason: &'static str, detail: &str| {
        answer(&mut respond, status);
        inner.metrics.connection_failed(Direction::Inbound, pod, reason);
        let record = ConnRecord::inbound(pod, src, dst, peer_identity.as_ref(), true);
        crate::telemetry::access_log_refused(&record, reason, detail);
    };
    if req.method() != Method::CONNECT {
        return fail(StatusCode::METHOD_NOT_ALLOWED, None, "not_connect", "only CONNECT is served");
    }
    let Some(dst) = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()) else {
        return fail(StatusCode::BAD_REQUEST, None, "bad_authority", "the :authority is not an IP:port");
    };
    let dst = SocketAddr::new(addr::canonical(dst.ip()), dst.port());
    if dst.ip() != addr::canonical(local.ip()) {
        let detail = format!("the tunnel arrived on {}, not {}", local.ip(), dst.ip());
        return fail(StatusCode::BAD_REQUEST, Some(dst), "wrong_destination", &detail);
    }
    if inner.settings.own_ports.contains(&dst.port()) {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(dst),
            "loop",
            "the target is one of the proxy's own ports",
        );
    }
    let subject = Subject { peer: peer_identity.clone().map(Peer::new), src, dst, mtls: true };
    if authorize::check(inner, pod, &subject).is_err() {
        // Logged and counted by the check.
        answer(&mut respond, StatusCode::UNAUTHORIZED);
        inner.metrics.connection_failed(Direction::Inbound, pod, "authorization_denied");
        return;
    }
    let registration = inner.open.register(pod.clone(), subject);
    let s = &inner.settings;
    let upstream = match upstream::connect(&pod.netns, dst, s.mark, s.connect_timeout).await {
        Ok(u) => u,
        Err(e) => return fail(StatusCode::SERVICE_UNAVAILABLE, Some(dst), "connect_failed", &e.to_string()),
    };
    let ok = Response::builder().status(StatusCode::OK).body(()).expect("a status-only response");
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(pod = %pod.key(), error = %e, "the client went away before the tunnel opened");
            return;
        }
    };
    let record = ConnRecord::inbound(pod, src, Some(dst), peer_identity.as_ref(), true);
    let counters = inner.metrics.connection_opened(Direction::Inbound, pod);
    let transfer = super::relay(upstream, send, req.into_body(), &counters, &registration.closed).await;
    inner.metrics.connection_closed(Direction::Inbound, pod);
    // From the application's side: it received what the tunnel delivered.
    let transfer =
        crate::proxy::Transfer { sent: transfer.received, received: transfer.sent, error: transfer.error };
    crate::telemetry::access_log(&record, &transfer, started.elapsed());
}
