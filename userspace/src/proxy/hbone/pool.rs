//! Pooled HBONE connections. One key is (source identity, destination identity, source IP,
//! destination IP); each connection carries up to `max_streams` tunnels; a key's connections
//! are opened one at a time, so a burst of tunnels shares connections instead of opening one
//! each. Idle connections close after `idle_timeout`; dead ones (PING timeout, peer gone) are
//! dropped as soon as noticed.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use serde::Serialize;

use crate::identity::Identity;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PoolKey {
    pub src_identity: Identity,
    pub dst_identity: Identity,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
}

/// One HTTP/2 connection of the pool.
pub struct Conn {
    pub id: u64,
    send: SendRequest<Bytes>,
    streams: AtomicUsize,
    /// Set by the connection's driver task when the connection ends.
    pub closed: Arc<AtomicBool>,
    /// `SO_COOKIE` of its TCP socket (kernel trace figures).
    pub socket_cookie: Option<crate::os::cookie::SocketCookie>,
    created: Instant,
    idle_since: Mutex<Instant>,
}

impl Conn {
    pub fn new(
        send: SendRequest<Bytes>,
        closed: Arc<AtomicBool>,
        socket_cookie: Option<crate::os::cookie::SocketCookie>,
    ) -> Conn {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Conn {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            send,
            streams: AtomicUsize::new(0),
            closed,
            socket_cookie,
            created: Instant::now(),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    fn usable(&self, max_streams: usize) -> bool {
        !self.closed.load(Ordering::Acquire) && self.streams.load(Ordering::Acquire) < max_streams
    }
}

/// A stream slot on a pooled connection; released on drop.
pub struct Lease {
    conn: Arc<Conn>,
}

impl Lease {
    pub fn send_request(&self) -> SendRequest<Bytes> {
        self.conn.send.clone()
    }

    pub fn socket_cookie(&self) -> Option<crate::os::cookie::SocketCookie> {
        self.conn.socket_cookie
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PoolDump {
    #[serde(flatten)]
    pub key: PoolKey,
    pub connections: Vec<ConnDump>,
}

#[derive(Debug, Serialize)]
pub struct ConnDump {
    pub id: u64,
    pub streams: usize,
    pub age_s: u64,
}

pub struct Pool {
    max_streams: usize,
    spread: usize,
    idle_timeout: Duration,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    /// Per-key lock held while a connection for the key is being opened.
    opening: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Pool {
    pub fn new(max_streams: u32, spread: u32, idle_timeout: Duration) -> Pool {
        Pool {
            max_streams: max_streams.max(1) as usize,
            spread: spread.max(1) as usize,
            idle_timeout,
            conns: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
        }
    }

    /// The least busy usable connection for `key` — unless it is busy and fewer than
    /// `spread` connections are open: then a new one should be (`None`).
    fn try_lease(&self, key: &PoolKey) -> Option<Lease> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get(key)?;
        let open = list.iter().filter(|c| !c.closed.load(Ordering::Acquire)).count();
        let conn = list
            .iter()
            .filter(|c| c.usable(self.max_streams))
            .min_by_key(|c| c.streams.load(Ordering::Acquire))?
            .clone();
        if conn.streams.load(Ordering::Acquire) > 0 && open < self.spread {
            return None;
        }
        conn.streams.fetch_add(1, Ordering::AcqRel);
        Some(Lease { conn })
    }

    /// A stream slot for `key`: on an existing connection with room, else on a new one made
    /// by `open` (only one `open` per key runs at a time; the others wait and reuse it).
    pub async fn lease<F, Fut, E>(&self, key: &PoolKey, open: F) -> Result<Lease, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Conn, E>>,
    {
        if let Some(l) = self.try_lease(key) {
            return Ok(l);
        }
        let gate =
            self.opening.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().clone();
        let _opening = gate.lock().await;
        if let Some(l) = self.try_lease(key) {
            return Ok(l);
        }
        let conn = Arc::new(open().await?);
        conn.streams.fetch_add(1, Ordering::AcqRel);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(Lease { conn })
    }

    /// Drops closed connections and those idle past the timeout (their peers see a GOAWAY
    /// once the last handle is gone). Returns how many went.
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let mut removed = 0;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && now.duration_since(*c.idle_since.lock().unwrap_or_else(|p| p.into_inner()))
                        >= self.idle_timeout;
                let keep = !c.closed.load(Ordering::Acquire) && !idle;
                removed += usize::from(!keep);
                keep
            });
        }
        conns.retain(|_, l| !l.is_empty());
        drop(conns);
        let mut opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        opening.retain(|_, gate| Arc::strong_count(gate) > 1);
        removed
    }

    pub fn dump(&self) -> Vec<PoolDump> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PoolDump> = conns
            .iter()
            .map(|(k, list)| PoolDump {
                key: k.clone(),
                connections: list
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Acquire))
                    .map(|c| ConnDump {
                        id: c.id,
                        streams: c.streams.load(Ordering::Acquire),
                        age_s: c.created.elapsed().as_secs(),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}
