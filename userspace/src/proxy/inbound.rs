//! Inbound plaintext: a connection to an enrolled pod from outside the mesh (mesh clients
//! arrive over HBONE on 15008), assigned to the pod-local 15006 listener by the TC program.
//! The accepted socket's local address is the original destination (the pod's IP and the
//! application's port); the proxy connects to it from inside the pod's netns, once the
//! workload's authorization policies allow a client without identity.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    authorize::{self, Subject},
    finish, refuse, relay, ConnRecord, Inner,
};
use crate::{
    capture::addr,
    pod::{PodCtx, Refusal},
};

/// What a relayed connection holds while its bytes flow (see `outbound::Ready`).
struct Ready<'p> {
    record: ConnRecord<'p>,
    registration: authorize::Registration<'p>,
    client: TcpStream,
    upstream: TcpStream,
    started: std::time::Instant,
}

/// The task's future itself, like `outbound::handle` (a wrapping block would keep a copy of
/// the arguments for the connection's whole life).
pub(super) async fn handle(inner: Arc<Inner>, pod: Arc<PodCtx>, client: TcpStream, peer: SocketAddr) {
    let (inner, pod) = (&*inner, &pod);
    // Boxed: checks and the connect are freed before the relay starts.
    let Some(r) = Box::pin(set_up(inner, pod, client, peer)).await else { return };
    finish(inner, r.record, r.client, r.upstream, r.started, r.registration.closed()).await;
}

/// Checks, authorizes and connects; `None` when refused (counted, logged and reset here).
async fn set_up<'p>(
    inner: &'p Inner,
    pod: &'p Arc<PodCtx>,
    client: TcpStream,
    peer: SocketAddr,
) -> Option<Ready<'p>> {
    let refuse = |record: &ConnRecord<'_>, client, reason, detail: &str| {
        refuse(inner, record, client, reason, detail);
        None
    };
    let started = std::time::Instant::now();
    let dst = match client.local_addr() {
        Ok(a) => SocketAddr::new(addr::canonical(a.ip()), a.port()),
        Err(e) => {
            return refuse(
                &ConnRecord::inbound(pod, peer, None, None, false),
                client,
                Refusal::SocketError,
                &e.to_string(),
            )
        }
    };
    let record = ConnRecord::inbound(pod, peer, Some(dst), None, false);
    if !pod.ips.contains(&dst.ip()) {
        // Reached the loopback listener directly from inside the pod, not through capture.
        return refuse(&record, client, Refusal::NotThisPod, "destination is not this pod's address");
    }
    if inner.settings.own_ports.contains(&dst.port()) {
        return refuse(&record, client, Refusal::Loop, "destination is the proxy itself");
    }
    let subject = Subject { peer: None, src: peer, dst, mtls: false };
    if authorize::check(inner, pod, &subject).is_err() {
        // Logged and counted by the check; the client sees a reset.
        inner.metrics.connection_failed(
            record.direction,
            pod,
            Refusal::AuthorizationDenied,
            &record.labels(&inner.state.read(), &inner.metrics.sides),
        );
        relay::linger_zero(&client);
        return None;
    }
    let registration = inner.open.register(pod.clone(), subject);
    let mut record = record;
    // The client's own socket carries the connection over the network.
    record.leg = crate::os::netns::socket_cookie(&client).ok();
    match inner.deliver(&mut record, dst).await {
        Ok(upstream) => Some(Ready { record, registration, client, upstream, started }),
        Err(e) => refuse(&record, client, Refusal::ConnectFailed, &e.to_string()),
    }
}
