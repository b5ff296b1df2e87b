//! Kernel-level tracing: TCP events of enrolled pods' sockets, from the sock_ops program into
//! a ring buffer the proxy reads and attributes to workloads.
//!
//! Which sockets: every TCP socket in an enrolled pod's network namespace that the sock_ops
//! program sees (the pod's own, and the proxy's sockets in the pod: tunnels, upstreams),
//! except the proxy's ends of captured loopback connections (the pod's end says it all).
//! A socket is traced from its connect (or passive establishment) to its close; the
//! per-socket state lives in `AMBIT_TRACED`, keyed by the socket cookie.

/// `RingBuf` of [`TraceEvent`]s.
pub const MAP_EVENTS: &str = "AMBIT_EVENTS";
/// `LruHashMap<u64 socket cookie, TracedSock>`: the sockets being traced.
pub const MAP_TRACED: &str = "AMBIT_TRACED";

/// Ring buffer size: about 4,000 events of slack for the reader.
pub const EVENTS_BYTES: u32 = 512 * 1024;
/// The reader is woken once this much is waiting in the ring buffer, not per event (a
/// wakeup costs more than the event: a connection makes a dozen). Below it, the reader
/// drains every [`DRAIN_INTERVAL_MS`].
pub const WAKEUP_BYTES: u64 = 32 * 1024;
/// How often the reader drains the ring buffer without being woken.
pub const DRAIN_INTERVAL_MS: u64 = 20;
/// Sockets traced at once (LRU: the oldest are forgotten under a flood).
pub const MAX_TRACED: u32 = 65_536;
/// At most one RTT sample per socket per this long (the first one at once).
pub const RTT_SAMPLE_NS: u64 = 1_000_000_000;

/// [`TraceEvent::kind`]: an active open starts (the SYN is about to leave).
pub const EV_CONNECT: u16 = 1;
/// Active or passive (see [`TraceEvent::passive`]) open completed.
pub const EV_ESTABLISHED: u16 = 2;
/// A state change other than into ESTABLISHED or CLOSE.
pub const EV_STATE: u16 = 3;
/// A smoothed RTT sample.
pub const EV_RTT: u16 = 4;
/// Segments retransmitted.
pub const EV_RETRANSMIT: u16 = 5;
/// Closed after the FIN handshake.
pub const EV_CLOSE: u16 = 6;
/// Closed without it: a reset sent or received, or an abort (a connect that failed too).
pub const EV_RESET: u16 = 7;

/// Kernel TCP states (`include/net/tcp_states.h`), as [`TraceEvent::old_state`] and
/// [`TraceEvent::new_state`] carry them.
pub const TCP_STATES: [&str; 13] = [
    "UNKNOWN",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// One event.
/// `TraceEvent::proxy`/`TracedSock::proxy`: the socket carries the proxy's mark.
pub const PROXY_OWN: u8 = 1;
/// `TraceEvent::proxy`/`TracedSock::proxy`: the socket carries the delivery mark.
pub const PROXY_DELIVERY: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns` (monotonic, since boot).
    pub ts_ns: u64,
    pub socket_cookie: u64,
    pub netns_cookie: u64,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// Smoothed RTT in microseconds (0 before a sample).
    pub srtt_us: u32,
    /// Segments retransmitted over the socket's life so far.
    pub total_retrans: u32,
    /// [`EV_RETRANSMIT`]: segments in this retransmission.
    pub segments: u32,
    /// `EV_*`.
    pub kind: u16,
    /// `AF_INET` or `AF_INET6` of the addresses below.
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// The original destination's port of a captured connect; 0 when not captured.
    pub orig_port: u16,
    pub old_state: u8,
    pub new_state: u8,
    /// 1: the socket was accepted (passive open); 0: it connected.
    pub passive: u8,
    /// [`PROXY_OWN`]: one of the proxy's own sockets (it carries the proxy's mark);
    /// [`PROXY_DELIVERY`]: a socket carrying the delivery mark: the proxy's socket delivering
    /// an inbound connection from the client's address (active), or the application's
    /// accepted end of it (passive, which inherits the mark of the SYN); 0: neither.
    pub proxy: u8,
    pub _pad: [u8; 2],
    /// Network byte order; IPv4 in the first four bytes.
    pub local: [u8; 16],
    pub remote: [u8; 16],
    /// The original destination of a captured connect (family [`TraceEvent::orig_family`]).
    pub orig: [u8; 16],
    pub orig_family: u16,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<TraceEvent>() == 120);

/// Value of `AMBIT_TRACED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TracedSock {
    pub netns_cookie: u64,
    /// When the last RTT sample was sent (0: none yet).
    pub last_rtt_ns: u64,
    pub orig: [u8; 16],
    pub orig_port: u16,
    pub orig_family: u16,
    pub passive: u8,
    pub proxy: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<TracedSock>() == 40);

impl TraceEvent {
    /// Decodes an event from the ring buffer's bytes (native byte order, the layout above);
    /// `None` when there are too few.
    pub fn from_bytes(b: &[u8]) -> Option<TraceEvent> {
        if b.len() < core::mem::size_of::<TraceEvent>() {
            return None;
        }
        let u64_at = |o: usize| {
            u64::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3], b[o + 4], b[o + 5], b[o + 6], b[o + 7]])
        };
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let addr_at = |o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[o..o + 16]);
            a
        };
        Some(TraceEvent {
            ts_ns: u64_at(0),
            socket_cookie: u64_at(8),
            netns_cookie: u64_at(16),
            bytes_received: u64_at(24),
            bytes_acked: u64_at(32),
            srtt_us: u32_at(40),
            total_retrans: u32_at(44),
            segments: u32_at(48),
            kind: u16_at(52),
            family: u16_at(54),
            local_port: u16_at(56),
            remote_port: u16_at(58),
            orig_port: u16_at(60),
            old_state: b[62],
            new_state: b[63],
            passive: b[64],
            proxy: b[65],
            _pad: [0; 2],
            local: addr_at(68),
            remote: addr_at(84),
            orig: addr_at(100),
            orig_family: u16_at(116),
            _pad2: 0,
        })
    }
}

// The offsets `from_bytes` reads at.
const _: () = {
    assert!(core::mem::offset_of!(TraceEvent, srtt_us) == 40);
    assert!(core::mem::offset_of!(TraceEvent, kind) == 52);
    assert!(core::mem::offset_of!(TraceEvent, old_state) == 62);
    assert!(core::mem::offset_of!(TraceEvent, passive) == 64);
    assert!(core::mem::offset_of!(TraceEvent, proxy) == 65);
    assert!(core::mem::offset_of!(TraceEvent, local) == 68);
    assert!(core::mem::offset_of!(TraceEvent, remote) == 84);
    assert!(core::mem::offset_of!(TraceEvent, orig) == 100);
    assert!(core::mem::offset_of!(TraceEvent, orig_family) == 116);
};
