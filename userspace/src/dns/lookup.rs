//! Names the proxy itself resolves: the endpoints of a ServiceEntry with `resolution: DNS`,
//! known by hostname only. They are asked of the connecting pod's own resolvers (its
//! resolv.conf, see `upstream`), from the pod's network namespace, so the endpoint is the one
//! the pod would have found; A and AAAA at once, TCP when the UDP answer is truncated.
//! Answers are kept for [`KEEP`], per pod and name.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{
    forward::{tcp_in, udp_in, ForwardError, Upstreams},
    upstream::{PodResolvConf, Resolvers},
    wire::{self, TYPE_A, TYPE_AAAA},
};
use crate::os::{cookie::NetnsCookie, netns::Netns, socket::SocketFactory};

/// How long a resolved name is kept (the answers' own TTLs are not read).
pub const KEEP: Duration = Duration::from_secs(30);
/// Names kept at once, node-wide; past it the table is emptied of what expired, or emptied.
const MAX_KEPT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{0:?} is not a name DNS can carry")]
    BadName(String),
    #[error("the pod's resolv.conf ({path}) cannot be found: {source}")]
    Resolvers { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("{0} has no address")]
    NoAddress(String),
}

/// Addresses found, by pod and name, with when they were.
type Kept = HashMap<(NetnsCookie, String), (Instant, Vec<IpAddr>)>;

/// Resolves endpoint hostnames for the proxy, with a small cache.
pub struct HostLookup {
    proc_dir: PathBuf,
    timeout: Duration,
    kept: Mutex<Kept>,
}

impl HostLookup {
    /// `proc_dir`: where the pods' processes are found; `timeout`: per resolver.
    pub fn new(proc_dir: &Path, timeout: Duration) -> HostLookup {
        HostLookup { proc_dir: proc_dir.to_path_buf(), timeout, kept: Mutex::new(HashMap::new()) }
    }

    /// The addresses of `host` as the pod in `netns` resolves it. Sockets come from
    /// `sockets`, made in the pod's namespace with `mark`, which the capture lets through.
    pub async fn lookup(
        &self,
        netns: &Netns,
        sockets: &dyn SocketFactory,
        mark: u32,
        host: &str,
    ) -> Result<Vec<IpAddr>, LookupError> {
        let key = (netns.cookie(), host.to_string());
        if let Some((at, addresses)) = self.kept.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            if at.elapsed() < KEEP {
                return Ok(addresses.clone());
            }
        }
        let resolvers = PodResolvConf::new(&self.proc_dir, netns.path(), self.timeout)
            .map_err(|source| LookupError::Resolvers { path: netns.path().to_path_buf(), source })?;
        let upstreams = resolvers.upstreams();
        let ask = |qtype| ask(&upstreams, netns, sockets, mark, host, qtype);
        let (v4, v6) = tokio::join!(ask(TYPE_A), ask(TYPE_AAAA));
        let mut addresses = v4?;
        // IPv6 is a bonus: a resolver that fails AAAA still gave the IPv4 answer.
        addresses.extend(v6.unwrap_or_default());
        if addresses.is_empty() {
            return Err(LookupError::NoAddress(host.to_string()));
        }
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= MAX_KEPT {
            kept.retain(|_, (at, _)| at.elapsed() < KEEP);
            if kept.len() >= MAX_KEPT {
                kept.clear();
            }
        }
        kept.insert(key, (Instant::now(), addresses.clone()));
        Ok(addresses)
    }
}

/// One question, the addresses of its type in the answer (none for NXDOMAIN or no data).
async fn ask(
    upstreams: &Upstreams,
    netns: &Netns,
    sockets: &dyn SocketFactory,
    mark: u32,
    host: &str,
    qtype: u16,
) -> Result<Vec<IpAddr>, LookupError> {
    let id = rand::random::<u16>();
    let query = wire::encode_query(id, host, qtype).ok_or_else(|| LookupError::BadName(host.to_string()))?;
    let mut answer = upstreams.udp(&query, |server| udp_in(sockets, netns, mark, server)).await?;
    if wire::is_truncated(&answer) {
        answer = upstreams.tcp(&query, |server| tcp_in(sockets, netns, mark, server)).await?;
    }
    // An answer that cannot be read, or to another question, counts as no address.
    let addresses = match wire::parse_response(&answer) {
        Ok(r) if r.id == id && r.rcode == 0 && r.name.eq_ignore_ascii_case(host.trim_end_matches('.')) => {
            r.addresses
        }
        _ => Vec::new(),
    };
    Ok(addresses.into_iter().filter(|a| a.is_ipv4() == (qtype == TYPE_A)).collect())
}
