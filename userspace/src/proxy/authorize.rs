//! Authorization at the destination: each inbound connection to a local workload is checked
//! against the policies that apply to that workload — with the client's verified identity
//! over HBONE, with none in plaintext — and stays registered while it is open, so that when
//! the mesh state changes it is checked again and closed if it is now denied.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll},
};

use futures::task::AtomicWaker;

use super::{ConnRecord, Inner};
use crate::pod::PodCtx;
use crate::{
    authz::{self, Conn, Decision, Denial, Peer},
    capture::addr,
    sparse::ShrinkIfSparse as _,
    state::MeshState,
};

/// An HBONE connection's verified peer, shared by the streams it carries.
#[derive(Debug)]
pub struct VerifiedPeer {
    pub peer: Peer,
    /// The identity as a URI (access log, metrics).
    pub uri: Arc<str>,
}

impl VerifiedPeer {
    pub fn new(identity: crate::identity::Identity) -> Self {
        VerifiedPeer { uri: identity.to_string().into(), peer: Peer::new(identity) }
    }
}

/// What a connection is judged by.
#[derive(Clone, Debug)]
pub struct Subject {
    /// The verified peer (HBONE), `None` in plaintext.
    pub peer: Option<Arc<VerifiedPeer>>,
    /// The original client (the tunnel's `forwarded` source for HBONE).
    pub src: SocketAddr,
    /// The local workload's address and port.
    pub dst: SocketAddr,
    pub mtls: bool,
}

impl Subject {
    fn record<'a>(&'a self, pod: &'a PodCtx) -> ConnRecord<'a> {
        ConnRecord::inbound(pod, self.src, Some(self.dst), self.peer.as_ref().map(|p| &p.uri), self.mtls)
    }
}

fn decide(state: &MeshState, pod: &PodCtx, s: &Subject) -> Decision {
    let conn = Conn {
        src: s.peer.as_ref().map(|p| &p.peer),
        src_ip: addr::canonical(s.src.ip()),
        dst_ip: addr::canonical(s.dst.ip()),
        dst_port: s.dst.port(),
    };
    // The destination workload says which selector policies apply; a pod the control plane
    // has not described (yet) still gets the global and namespace ones.
    let policies = match state.workload_by_ip(conn.dst_ip) {
        Some(w) => state.policies_for(&w.namespace, &w.authorization_policies),
        None => state.policies_for(&pod.namespace, &[]),
    };
    authz::evaluate(&policies, &conn)
}

fn report(inner: &Inner, pod: &PodCtx, s: &Subject, d: &Decision, open: bool) {
    let record = s.record(pod);
    if let Some(dry) = &d.dry_run_denied {
        inner.metrics.authorization_denied(pod, dry.policy(), open, true);
        super::access_log::denied(&record, dry, open, true);
    }
    if let Some(denied) = &d.denied {
        inner.metrics.authorization_denied(pod, denied.policy(), open, false);
        super::access_log::denied(&record, denied, open, false);
    }
}

/// Checks a new connection; a denial (and a dry-run one) is logged and counted here.
pub(super) fn check(inner: &Inner, pod: &PodCtx, s: &Subject) -> Result<(), Denial> {
    let d = decide(&inner.state.read(), pod, s);
    report(inner, pod, s, &d, false);
    match d.denied {
        None => Ok(()),
        Some(denial) => Err(denial),
    }
}

/// Set when a re-check denies an open connection; its relay is woken and ends. Every open
/// inbound connection has one, so it is a flag and a waker slot: a `CancellationToken`
/// (a tree node and a waiter list) and the relay's pinned wait on it took ~200 bytes more
/// per idle connection, and locked a mutex on every poll of the relay.
#[derive(Debug, Default)]
pub struct Revocation {
    revoked: AtomicBool,
    waker: AtomicWaker,
}

impl Revocation {
    fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Ready once revoked; otherwise the task is woken when it is.
    pub fn poll_revoked(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_revoked() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Revoked between the check and the registration: the wake went to an old waker.
        if self.is_revoked() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    pub async fn revoked(&self) {
        std::future::poll_fn(|cx| self.poll_revoked(cx)).await;
    }
}

/// One allocation per open connection, shared by the table and the connection's task.
struct Entry {
    pod: Arc<PodCtx>,
    subject: Subject,
    close: Revocation,
}

/// The inbound connections open right now, by their entry's address: the table holds the
/// entry, so no other open connection can have it (and a separate id would cost every
/// connection's task 8 bytes).
#[derive(Default)]
pub struct OpenConnections {
    entries: Mutex<HashMap<usize, Arc<Entry>>>,
}

fn key(entry: &Arc<Entry>) -> usize {
    Arc::as_ptr(entry) as usize
}

/// An open connection's place in the table; leaving it (drop) unregisters it.
pub struct Registration<'a> {
    table: &'a OpenConnections,
    entry: Arc<Entry>,
}

impl Registration<'_> {
    /// Revoked when a re-check denies the connection.
    pub fn closed(&self) -> &Revocation {
        &self.entry.close
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut entries = self.table.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(&key(&self.entry));
        entries.shrink_if_sparse();
    }
}

impl OpenConnections {
    pub fn register(&self, pod: Arc<PodCtx>, subject: Subject) -> Registration<'_> {
        let entry = Arc::new(Entry { pod, subject, close: Revocation::default() });
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).insert(key(&entry), entry.clone());
        Registration { table: self, entry }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every open connection against the current state; closes the denied ones.
    /// Returns how many were closed.
    fn recheck(&self, inner: &Inner) -> usize {
        // Decide under the state's read lock, act after releasing both locks.
        let denied: Vec<(Arc<Entry>, Decision)> = {
            let state = inner.state.read();
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries
                .values()
                .filter(|e| !e.close.is_revoked())
                .filter_map(|e| {
                    let d = decide(&state, &e.pod, &e.subject);
                    (!d.allowed()).then(|| (e.clone(), d))
                })
                .collect()
        };
        for (entry, decision) in &denied {
            let Entry { pod, subject, close } = &**entry;
            report(
                inner,
                pod,
                subject,
                &Decision { denied: decision.denied.clone(), dry_run_denied: None },
                true,
            );
            close.revoke();
        }
        denied.len()
    }
}

/// Re-checks the open inbound connections after every change of the mesh state, for as long
/// as the proxy exists.
pub(super) fn spawn_rechecks(inner: &Arc<Inner>) {
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let mut changes = inner.state.subscribe();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let Some(inner) = weak.upgrade() else { return };
            if inner.open.is_empty() {
                continue;
            }
            let closed = inner.open.recheck(&inner);
            if closed > 0 {
                tracing::info!(closed, "open connections closed after a policy change");
            }
        }
    });
}
