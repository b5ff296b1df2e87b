//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS, between node proxies, as
//! Istio's ztunnel speaks it (docs/istio.md, "HBONE").
//!
//! - `client`: outbound tunnels, over pooled connections made from the source pod's netns;
//! - `pool`: connections keyed by (source identity, destination identity, source IP,
//!   destination IP), up to N streams each, idle ones closed, PING keepalives;
//! - `server`: the 15008 listener in each enrolled pod's netns;
//! - `head`: the CONNECT head's parts ambit reads (the target, `forwarded`'s `host=`);
//! - `relay`: the byte relay between a TCP socket and a CONNECT stream;
//! - `read_buffer`: the socket under TLS, with a read buffer only while bytes flow;
//! - here: settings.

pub mod client;
pub mod head;
pub mod pool;
mod read_buffer;
mod relay;
pub mod server;

use std::time::Duration;

use serde::Serialize;

pub use relay::{relay, End};

/// HTTP/2 and pool parameters; the defaults are ztunnel's.
#[derive(Clone, Debug, Serialize)]
pub struct HboneSettings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams per pooled connection before another connection is opened.
    pub max_streams: u32,
    /// Connections per pool key that concurrent streams are spread over before they share
    /// one: one TLS connection is encrypted by one core at a time, so bulk streams on one
    /// connection stop scaling at one core.
    pub spread: u32,
    #[serde(serialize_with = "secs")]
    pub idle_timeout: Duration,
    #[serde(serialize_with = "secs")]
    pub ping_interval: Duration,
    #[serde(serialize_with = "secs")]
    pub ping_timeout: Duration,
    /// Connect + TLS handshake limit, both directions.
    #[serde(serialize_with = "secs")]
    pub handshake_timeout: Duration,
    /// Inbound: largest request header block accepted (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_bytes: u32,
    /// Inbound: open connections per peer address and pod.
    pub max_connections_per_peer: u32,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

impl Default for HboneSettings {
    fn default() -> Self {
        HboneSettings {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            max_streams: 128,
            spread: 2,
            idle_timeout: Duration::from_secs(300),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_connections_per_peer: 128,
        }
    }
}

/// Read buffer under each HBONE connection's TLS, while bytes flow (`read_buffer`).
pub const TLS_READ_BUFFER: usize = 32 * 1024;

/// Bytes read from the TCP side at a time.
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// ... and after a read filled its buffer (a bulk transfer): fewer, larger reads, DATA frames
/// and wakeups of the connection's task (`cargo xtask bench`, 1 stream: ambit/relay 0.63 →
/// 0.86, CPU per GB 2.33 → 2.01). Only while data keeps coming: a request/response exchange
/// keeps the small buffer.
pub(crate) const BULK_READ_CHUNK: usize = 256 * 1024;
