//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS, between node proxies, as
//! Istio's ztunnel speaks it (../shared/reference/wire.md).
//!
//! - `client`: outbound tunnels, over pooled connections made from the source pod's netns;
//! - `pool`: connections keyed by (source identity, destination identity, source IP,
//!   destination IP), up to N streams each, idle ones closed, PING keepalives;
//! - `server`: the 15008 listener in each enrolled pod's netns;
//! - here: settings, and the byte relay between a TCP socket and a CONNECT stream.

pub mod client;
pub mod pool;
pub mod server;

use std::{io, time::Duration};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use serde::Serialize;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{relay::linger_zero, Transfer};
use crate::metrics::ByteCounter;

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
            max_streams: 100,
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

/// Read buffer under each HBONE connection's TLS: rustls reads at most 4 KiB per call, and a
/// read syscall per 4 KiB cost a third of the proxy's CPU under bulk transfers. The buffer
/// turns that into one syscall per 32 KiB.
pub const TLS_READ_BUFFER: usize = 32 * 1024;

/// Bytes read from the TCP side at a time.
const READ_CHUNK: usize = 64 * 1024;

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// TCP → CONNECT stream, honouring HTTP/2 flow control; end of stream on EOF. A buffer is
/// taken only when there is something to read, so an idle tunnel holds none.
async fn tcp_to_h2(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut SendStream<Bytes>,
    counter: &ByteCounter,
    total: &mut u64,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let n = match from.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return to.send_data(Bytes::new(), true).map_err(h2_io);
        }
        let mut data = buf.freeze();
        while !data.is_empty() {
            to.reserve_capacity(data.len());
            let cap = std::future::poll_fn(|cx| to.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed"))?
                .map_err(h2_io)?;
            let chunk = data.split_to(cap.min(data.len()));
            let len = chunk.len() as u64;
            to.send_data(chunk, false).map_err(h2_io)?;
            *total += len;
            counter.add(len);
        }
    }
}

/// CONNECT stream → TCP, releasing flow-control credit as data is written; FIN at its end.
async fn h2_to_tcp(
    from: &mut RecvStream,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    counter: &ByteCounter,
    total: &mut u64,
) -> io::Result<()> {
    while let Some(chunk) = from.data().await {
        let chunk = chunk.map_err(h2_io)?;
        to.write_all(&chunk).await?;
        let len = chunk.len();
        from.flow_control().release_capacity(len).map_err(h2_io)?;
        *total += len as u64;
        counter.add(len as u64);
    }
    to.shutdown().await
}

/// Relays between a TCP connection and a CONNECT stream until both directions ended. A
/// failure on one side resets the other (RST_STREAM on the tunnel, TCP reset on the socket).
/// `sent` and `to_tunnel` count TCP → tunnel, `received` and `from_tunnel` tunnel → TCP.
pub async fn relay(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    (to_tunnel, from_tunnel): (&ByteCounter, &ByteCounter),
    close: &tokio_util::sync::CancellationToken,
) -> Transfer {
    let (mut sent, mut received) = (0u64, 0u64);
    let mut error = None;
    {
        let (mut r, mut w) = tcp.split();
        let up = tcp_to_h2(&mut r, &mut send, to_tunnel, &mut sent);
        let down = h2_to_tcp(&mut recv, &mut w, from_tunnel, &mut received);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            let result = tokio::select! {
                r = &mut up, if !up_done => { up_done = true; r }
                r = &mut down, if !down_done => { down_done = true; r }
                () = close.cancelled() => Err(super::relay::revoked()),
            };
            if let Err(e) = result {
                error = Some(e);
                break;
            }
        }
    }
    if error.is_some() {
        send.send_reset(h2::Reason::CANCEL);
        linger_zero(&tcp);
    }
    Transfer { sent, received, error }
}
