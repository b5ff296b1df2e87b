//! Outbound HBONE: a CONNECT stream to the destination pod's 15008, on a pooled mTLS + HTTP/2
//! connection opened from the source pod's network namespace (the network sees the pod's IP).

use std::{
    cell::RefCell,
    io::Read,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{HeaderValue, Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::{
    pool::{Conn, Lease, Pool, PoolDump, PoolKey},
    HboneSettings,
};
use crate::{
    identity::{Identity, IdentityManager},
    os::socket::SocketFactory,
    pod::{PodCtx, Refusal},
    proxy::upstream,
};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no valid certificate for {0} (is the CA reachable?)")]
    NoCertificate(Identity),
    #[error("the pod has no {0} address to tunnel from")]
    NoSourceAddress(&'static str),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("TLS with {addr}: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("{addr} answered the CONNECT with {status}")]
    Status { addr: SocketAddr, status: StatusCode },
    #[error("{what} with {addr} timed out")]
    Timeout { addr: SocketAddr, what: &'static str },
    #[error("building the TLS configuration: {0}")]
    Config(#[from] crate::tls::TlsConfigError),
}

impl TunnelError {
    /// The refusal it is reported as.
    pub fn reason(&self) -> Refusal {
        match self {
            TunnelError::NoCertificate(_) => Refusal::NoCertificate,
            TunnelError::NoSourceAddress(_) => Refusal::NoSourceAddress,
            TunnelError::Connect { .. } => Refusal::HboneConnectFailed,
            TunnelError::Tls { .. } => Refusal::HboneTlsFailed,
            TunnelError::H2 { .. } => Refusal::HboneHttp2Failed,
            TunnelError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                Refusal::DeniedByDestination
            }
            TunnelError::Status { .. } => Refusal::HboneRefused,
            TunnelError::Timeout { .. } => Refusal::HboneTimeout,
            TunnelError::Config(_) => Refusal::TlsConfig,
        }
    }
}

/// An open tunnel: write to `send`, read from `recv`; holds its pool slot.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// `SO_COOKIE` of the pooled connection's TCP socket.
    pub socket_cookie: Option<crate::os::cookie::SocketCookie>,
    /// Bytes of the client's that went with the CONNECT (see [`early_data`]).
    pub early: u64,
    lease: Lease,
}

/// At most this much of what the client already sent goes with the CONNECT.
const EARLY_DATA_MAX: usize = 16 * 1024;

/// What the client has sent so far (up to [`EARLY_DATA_MAX`]), read without waiting: it goes
/// out as DATA right behind the CONNECT's HEADERS, in the same write, instead of one round
/// trip between the proxies later, after the 200 (RFC 9113 §8.5 allows DATA after the
/// client's own HEADERS; the destination holds it until it has authorized and connected).
/// Read from the socket directly: tokio has not polled a just-accepted socket yet, so its
/// `try_read` would report nothing. Empty when nothing is there (a server-speaks-first
/// protocol), and on EOF or an error, which the relay then reads again and reports.
fn early_data(client: &TcpStream) -> Bytes {
    // One buffer per worker thread, zeroed once: a fresh one per connection cost more
    // instructions (its memset) than the rest of the read.
    thread_local! {
        static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; EARLY_DATA_MAX].into_boxed_slice());
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        match (&*socket2::SockRef::from(client)).read(&mut buf) {
            Ok(n) if n > 0 => Bytes::copy_from_slice(&buf[..n]),
            _ => Bytes::new(),
        }
    })
}

impl Tunnel {
    /// The stream's halves and the lease that keeps its connection's stream count: a
    /// relay moves the halves and holds the lease, so nothing else of the tunnel stays.
    pub fn into_parts(self) -> (SendStream<Bytes>, RecvStream, Lease) {
        (self.send, self.recv, self.lease)
    }
}

pub struct HboneClient {
    pool: Arc<Pool>,
    settings: HboneSettings,
    identities: IdentityManager,
    sockets: Arc<dyn SocketFactory>,
    mark: u32,
}

impl HboneClient {
    /// Starts the pool's reaper; call inside the runtime.
    pub fn new(
        settings: HboneSettings,
        identities: IdentityManager,
        sockets: Arc<dyn SocketFactory>,
        mark: u32,
    ) -> HboneClient {
        let pool = Arc::new(Pool::new(settings.max_streams, settings.spread, settings.idle_timeout));
        let weak = Arc::downgrade(&pool);
        let every = (settings.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = weak.upgrade() else { return };
                let n = pool.reap();
                if n > 0 {
                    tracing::debug!(closed = n, "HBONE pool: idle or dead connections closed");
                }
            }
        });
        HboneClient { pool, settings, identities, sockets, mark }
    }

    pub fn dump(&self) -> Vec<PoolDump> {
        self.pool.dump()
    }

    /// Opens a tunnel for `client` from `pod` (as `src_identity`) to `dst`, served by the
    /// workload `dst_identity` on `dst`'s IP, port 15008. What `client` has already sent
    /// goes with the CONNECT ([`Tunnel::early`] bytes of it). `service`: the hostname of the
    /// service the client dialled, named to the destination as ztunnel does (`forwarded`'s
    /// `host=`), so both ends report the same `destination_service`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        &self,
        pod: &PodCtx,
        client: &TcpStream,
        src_identity: &Identity,
        dst: SocketAddr,
        dst_identity: &Identity,
        hbone_port: u16,
        service: Option<&str>,
    ) -> Result<Tunnel, TunnelError> {
        if self.identities.wait(src_identity, self.settings.handshake_timeout).await.is_none() {
            return Err(TunnelError::NoCertificate(src_identity.clone()));
        }
        let src_ip = pod
            .ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == dst.is_ipv4())
            .ok_or(TunnelError::NoSourceAddress(if dst.is_ipv4() { "IPv4" } else { "IPv6" }))?;
        let key = PoolKey {
            src_identity: src_identity.clone(),
            dst_identity: dst_identity.clone(),
            src_ip,
            dst_ip: dst.ip(),
        };
        let hbone = SocketAddr::new(dst.ip(), hbone_port);
        let forwarded = forwarded(src_ip, service);
        // A pooled connection may have died since it was last used: one more try on a fresh
        // one, unless the failed stream may have delivered early data (no bytes twice).
        let mut last = None;
        let mut early = None;
        for _ in 0..2 {
            let lease = self.pool.lease(&key, || self.connect(pod, &key, hbone)).await?;
            // Read once the connection is there: the client has had the longest to send.
            let early = early.get_or_insert_with(|| early_data(client));
            match self.connect_stream(&lease, pod, &forwarded, dst, hbone, early).await {
                Ok((send, recv)) => {
                    let socket_cookie = lease.socket_cookie();
                    let early = early.len() as u64;
                    return Ok(Tunnel { send, recv, socket_cookie, early, lease });
                }
                Err((e @ TunnelError::H2 { .. }, Sent::Nothing)) => last = Some(e),
                Err((e, _)) => return Err(e),
            }
        }
        Err(last.expect("the loop ran"))
    }

    /// The CONNECT stream on `lease`'s connection, with `early` right behind its HEADERS;
    /// a failure says whether any of `early` may have gone out.
    async fn connect_stream(
        &self,
        lease: &Lease,
        pod: &PodCtx,
        forwarded: &HeaderValue,
        dst: SocketAddr,
        hbone: SocketAddr,
        early: &Bytes,
    ) -> Result<(SendStream<Bytes>, RecvStream), (TunnelError, Sent)> {
        let h2e = |source| TunnelError::H2 { addr: hbone, source };
        let before = |source| (h2e(source), Sent::Nothing);
        let after = if early.is_empty() { Sent::Nothing } else { Sent::Early };
        let mut send = lease.send_request().ready().await.map_err(before)?;
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority(dst))
            .header("forwarded", forwarded.clone());
        if let Some(baggage) = &pod.baggage {
            req = req.header("baggage", baggage.clone());
        }
        let req =
            req.header("traceparent", traceparent()).body(()).expect("a CONNECT request from valid parts");
        let (response, mut stream) = send.send_request(req, false).map_err(before)?;
        if !early.is_empty() {
            // Queued with the HEADERS before the connection's task writes them; well within
            // the stream's initial window, so h2 sends it without waiting for credit.
            stream.send_data(early.clone(), false).map_err(|e| (h2e(e), Sent::Early))?;
        }
        let response = tokio::time::timeout(self.settings.handshake_timeout, response)
            .await
            .map_err(|_| (TunnelError::Timeout { addr: hbone, what: "the CONNECT answer" }, after))?
            .map_err(|e| (h2e(e), after))?;
        if response.status() != StatusCode::OK {
            return Err((TunnelError::Status { addr: hbone, status: response.status() }, after));
        }
        Ok((stream, response.into_body()))
    }

    /// A new pooled connection: TCP from the source pod's netns, mTLS as the source
    /// identity expecting the destination identity, HTTP/2 with the configured windows, and
    /// keepalive PINGs.
    async fn connect(&self, pod: &PodCtx, key: &PoolKey, hbone: SocketAddr) -> Result<Conn, TunnelError> {
        let s = &self.settings;
        let tcp = upstream::connect(&*self.sockets, &pod.netns, hbone, self.mark, s.handshake_timeout)
            .await
            .map_err(|source| TunnelError::Connect { addr: hbone, source })?;
        let socket_cookie = crate::os::netns::socket_cookie(&tcp).ok();
        let tcp = super::read_buffer::ReadBuffered::new(tcp, super::TLS_READ_BUFFER);
        let tls_config =
            crate::tls::client_config(&self.identities, &key.src_identity, vec![key.dst_identity.clone()])?;
        let connector = tokio_rustls::TlsConnector::from(tls_config);
        let tls = tokio::time::timeout(
            s.handshake_timeout,
            connector.connect(ServerName::IpAddress(hbone.ip().into()), tcp),
        )
        .await
        .map_err(|_| TunnelError::Timeout { addr: hbone, what: "the TLS handshake" })?
        .map_err(|source| TunnelError::Tls { addr: hbone, source })?;
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| TunnelError::H2 { addr: hbone, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping = conn.ping_pong();
        let done = closed.clone();
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %hbone, error = %e, "HBONE connection ended");
            }
            done.store(true, Ordering::Release);
        });
        if let Some(mut ping) = ping {
            let (interval, timeout) = (s.ping_interval, s.ping_timeout);
            let dead = closed.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    if dead.load(Ordering::Acquire) {
                        return;
                    }
                    match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            tracing::warn!(peer = %hbone, "HBONE connection: no PING answer, closing it");
                            dead.store(true, Ordering::Release);
                            driver.abort();
                            return;
                        }
                    }
                }
            });
        }
        tracing::debug!(peer = %hbone, src = %key.src_identity, dst = %key.dst_identity, "HBONE connection opened");
        Ok(Conn::new(send, closed, socket_cookie))
    }
}

/// Whether a failed CONNECT stream may have carried the client's bytes to the destination.
#[derive(Clone, Copy, Debug)]
enum Sent {
    Nothing,
    Early,
}

/// `ip` as the CONNECT authority and `forwarded` write it: IPv4 dotted, IPv6 in brackets
/// (RFC 7239, RFC 3986). IPv4 is written by hand: `Display` through `format!` cost about
/// 2,000 instructions per tunnel for the two headers (callgrind).
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(out, u16::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            write!(out, "[{v6}]").expect("writing to a String does not fail");
        }
    }
}

fn push_decimal(out: &mut String, v: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut v = v;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// `dst` as a CONNECT's authority: `ip:port`, IPv6 in brackets (what `SocketAddr` displays).
fn authority(dst: SocketAddr) -> String {
    let mut out = String::with_capacity(48);
    push_ip(&mut out, dst.ip());
    out.push(':');
    push_decimal(&mut out, dst.port());
    out
}

/// The `forwarded` header naming the source pod's address and, when a service was dialled,
/// its hostname (`host=`, unquoted, as ztunnel writes it). A hostname that cannot stand in a
/// header (it came over xDS) is left out rather than failing the tunnel.
fn forwarded(src: IpAddr, service: Option<&str>) -> HeaderValue {
    let mut out = String::with_capacity(56 + service.map_or(0, str::len));
    out.push_str("for=\"");
    push_ip(&mut out, src);
    out.push('"');
    let with_host = service.filter(|h| super::head::is_plain_host(h)).map(|h| format!("{out};host={h}"));
    with_host
        .and_then(|v| HeaderValue::try_from(v).ok())
        .unwrap_or_else(|| HeaderValue::try_from(out).expect("an address in quotes is a valid header value"))
}

/// A new W3C trace context (sampled) per tunnel, marked never-indexed for HPACK: a value no
/// later request repeats would only evict the ones that do repeat (authority, forwarded,
/// baggage) from both ends' header tables, and keep ~4 KiB of dead values in each per
/// pooled connection.
fn traceparent() -> HeaderValue {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    // Written by hand: `format!` made this a few thousand instructions per tunnel.
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-01";
    hex_into(&mut text[3..35], trace);
    hex_into(&mut text[36..52], u128::from(span));
    let mut value = HeaderValue::from_bytes(&text).expect("hex digits and dashes are a valid header value");
    value.set_sensitive(true);
    value
}

/// `v`'s low `out.len()` hex digits, lowercase, most significant first.
fn hex_into(out: &mut [u8], mut v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_a_fresh_w3c_context_kept_out_of_header_tables() {
        let (a, b) = (traceparent(), traceparent());
        assert!(a.is_sensitive(), "a per-tunnel value must not be HPACK-indexed");
        let text = a.to_str().unwrap();
        let parts: Vec<&str> = text.split('-').collect();
        assert_eq!(parts.len(), 4, "{text}");
        assert_eq!((parts[0], parts[3]), ("00", "01"), "{text}");
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{text}");
        assert!(parts[1..3]
            .iter()
            .all(|p| p.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())));
        assert_ne!(a, b, "each tunnel starts its own trace");
    }

    #[test]
    fn hex_digits_are_the_low_ones_most_significant_first() {
        let mut out = [0u8; 8];
        hex_into(&mut out, 0x1234_5678_9abc_def0_0fed_cba9);
        assert_eq!(&out, b"0fedcba9");
        let mut out = [0u8; 32];
        hex_into(&mut out, 0xab);
        assert_eq!(&out, b"000000000000000000000000000000ab");
        assert_eq!(format!("{:032x}", u128::MAX), {
            hex_into(&mut out, u128::MAX);
            String::from_utf8(out.to_vec()).unwrap()
        });
    }

    #[test]
    fn addresses_are_written_as_display_writes_them_with_v6_in_brackets() {
        let cases: [(&str, &str); 5] = [
            ("10.2.0.2:7000", "10.2.0.2"),
            ("0.0.0.0:0", "0.0.0.0"),
            ("255.255.255.255:65535", "255.255.255.255"),
            ("[fd00:2::2]:8080", "fd00:2::2"),
            ("[::ffff:10.0.0.1]:1", "::ffff:10.0.0.1"),
        ];
        for (addr, ip) in cases {
            let sa: SocketAddr = addr.parse().unwrap();
            assert_eq!(authority(sa), sa.to_string(), "{addr}");
            let ip: IpAddr = ip.parse().unwrap();
            let want = if ip.is_ipv4() { format!("for=\"{ip}\"") } else { format!("for=\"[{ip}]\"") };
            assert_eq!(forwarded(ip, None), want.as_str(), "{ip}");
        }
    }

    #[test]
    fn forwarded_names_the_dialled_service_as_ztunnel_does() {
        let ip: IpAddr = "10.1.0.2".parse().unwrap();
        assert_eq!(
            forwarded(ip, Some("web.demo.svc.cluster.local")),
            "for=\"10.1.0.2\";host=web.demo.svc.cluster.local"
        );
        // A name that would need quoting, or could add parameters, is left out.
        for bad in ["", "a;for=evil", "a b", "\"x\"", "web\r\n"] {
            assert_eq!(forwarded(ip, Some(bad)), "for=\"10.1.0.2\"", "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_ipv4_authority_matches_display(a: u32, port: u16) {
            let sa = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::from(a)), port);
            proptest::prop_assert_eq!(authority(sa), sa.to_string());
        }
    }
}
