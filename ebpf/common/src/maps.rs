//! Keys and values of the maps the programs and the proxy share.
//!
//! The map names (the `AMBIT_*` constants) are what the programs declare and what the proxy pins
//! under bpffs, so a restarted proxy finds the same maps again.

use crate::IpKey;

/// `Array<Config>` with one entry: the proxy's settings, written before any pod is enrolled.
pub const MAP_CONFIG: &str = "AMBIT_CONFIG";
/// `HashMap<u64 netns cookie, PodEntry>`: the enrolled pods. The connect hooks capture only
/// sockets whose network namespace is in here.
pub const MAP_ENROLLED: &str = "AMBIT_ENROLLED";
/// `HashMap<IpKey, u64 netns cookie>`: enrolled pods by IP, for the inbound TC program.
pub const MAP_POD_IPS: &str = "AMBIT_POD_IPS";
/// `LruHashMap<FlowKey, u64 socket cookie>`: connections the kubelet is opening to enrolled
/// pods (health probes), recorded by the sock_ops program attached to the kubelet's cgroup
/// only. The inbound program lets exactly these SYNs through to the application; every other
/// connection from the node (host-network processes, traffic SNATed to the node) is captured.
pub const MAP_PROBES: &str = "AMBIT_PROBES";
/// `SockHash<ListenerKey>`: the proxy's in-pod listeners. An entry disappears by itself when the
/// proxy closes the socket (or dies), which is how the programs know no proxy is there.
pub const MAP_LISTENERS: &str = "AMBIT_LISTENERS";
/// `LruHashMap<u64 socket cookie, PendingConnect>`: a captured connect between the connect hook
/// and the moment the connection closes.
pub const MAP_PENDING: &str = "AMBIT_PENDING";
/// `LruHashMap<ConnKey, OrigDst>`: original destinations of captured connections, looked up
/// (and deleted) by the proxy when it accepts them.
pub const MAP_ORIG_DST: &str = "AMBIT_ORIG_DST";
/// `PerCpuArray<u64>` of counters indexed by [`crate::stats`].
pub const MAP_STATS: &str = "AMBIT_STATS";
/// `LruHashMap<u64 socket cookie, OrigDst>`: the resolver a captured DNS socket (UDP or TCP,
/// port 53) last addressed, so that replies from the proxy's DNS listener, and the socket's
/// peer, read as that resolver again.
pub const MAP_DNS_ORIG: &str = "AMBIT_DNS_ORIG";

/// Every map the object defines, in the order the proxy reports them.
pub const ALL_MAPS: [&str; 11] = [
    MAP_CONFIG,
    MAP_ENROLLED,
    MAP_POD_IPS,
    MAP_PROBES,
    MAP_LISTENERS,
    MAP_PENDING,
    MAP_ORIG_DST,
    MAP_STATS,
    crate::trace::MAP_EVENTS,
    crate::trace::MAP_TRACED,
    MAP_DNS_ORIG,
];

/// Capacity of the per-pod maps: pods per node, with room to spare (Kubernetes' default
/// maximum is 110 pods per node).
pub const MAX_PODS: u32 = 1024;
/// Addresses per pod we budget for (dual-stack pods have two, a few have more).
pub const MAX_POD_IPS: u32 = MAX_PODS * 4;
/// Listeners per pod: outbound and inbound, IPv4 and IPv6.
pub const MAX_LISTENERS: u32 = MAX_PODS * 4;
/// Captured connections between connect and accept. LRU: under a flood the oldest unaccepted
/// records are evicted rather than new connects failing.
pub const MAX_PENDING: u32 = 65_536;
/// DNS sockets of enrolled pods remembered at once, node-wide. LRU: a resolver's socket
/// lives for one lookup or a few, so the oldest records belong to sockets long closed.
pub const MAX_DNS_SOCKETS: u32 = 16_384;
/// Kubelet probe connections open at once, node-wide (a few per pod at most; LRU: the oldest
/// record goes first, and its probe is then captured like any other client).
pub const MAX_PROBES: u32 = 8192;

/// `Config::flags`: when no proxy listener is there, let connections of enrolled pods through
/// uncaptured instead of refusing them.
pub const CONFIG_FAIL_OPEN: u32 = 1 << 0;
/// `Config::flags`: trace enrolled pods' TCP sockets into the events ring buffer.
pub const CONFIG_TRACE: u32 = 1 << 1;

/// The proxy's settings as the programs need them. All zero means "not configured yet", and
/// the programs then capture nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// `SO_MARK` of the proxy's own sockets; never captured.
    pub proxy_mark: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub hbone_port: u16,
    /// Kernel-side log level (aya-log numbering: 0 off, 1 error .. 5 trace). Checked at run time
    /// before anything is formatted, so the proxy can switch it without reloading programs.
    pub log_level: u8,
    pub _pad: u8,
    /// Hash of the eBPF object that created the pinned state; the programs ignore it, a
    /// restarted proxy compares it with its own to decide between re-adopting and replacing.
    pub object_hash: u32,
    /// `SO_MARK` of the proxy's sockets that deliver inbound connections to a pod's
    /// application from the client's address; never captured. The application's replies
    /// carry it too, which routes them back to the proxy inside the pod.
    pub delivery_mark: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 24);

/// `Config::flags` bits 16..32: the port of the proxy's DNS listener on each enrolled pod's
/// loopback; 0 when DNS is not captured. Kept in the flags rather than a field of its own so
/// that the pinned config map keeps its size, which a proxy upgrade re-adopts.
const DNS_PORT_SHIFT: u32 = 16;

impl Config {
    /// The DNS listener's port, or 0: DNS is not captured.
    pub const fn dns_port(&self) -> u16 {
        (self.flags >> DNS_PORT_SHIFT) as u16
    }

    /// `flags` with the DNS listener's port set (0: DNS not captured).
    pub const fn flags_with_dns_port(flags: u32, port: u16) -> u32 {
        (flags & ((1 << DNS_PORT_SHIFT) - 1)) | ((port as u32) << DNS_PORT_SHIFT)
    }
}

/// Value of the enrolled-pods map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodEntry {
    /// The proxy's handle for the pod, so kernel events can be attributed without a lookup.
    pub pod_id: u32,
    /// Reserved, zero.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PodEntry>() == 8);

/// Key of the listener map: one listener per pod, port and address family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub family: u16,
    pub port: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 16);

/// A TCP connection as the SYN that opens it carries it: client and server address and port.
/// Addresses as in [`IpKey`] (IPv4-mapped IPv6 as IPv4), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub family: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Where a captured connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub ip: IpKey,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);

/// A captured connection as the proxy sees it on accept: the client's address and the
/// listener's, in the pod's network namespace. The netns cookie is essential: two pods can
/// use the same ephemeral port towards 127.0.0.1:15001 at the same time.
///
/// IPv4-mapped IPv6 connections are stored as IPv4 (they land on the IPv4 listener).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub family: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 48);

/// A captured connect, from the connect hook until the socket closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingConnect {
    pub netns_cookie: u64,
    pub orig: OrigDst,
    /// 1 once `key` is filled in (the SYN is about to leave).
    pub keyed: u32,
    pub _pad: u32,
    pub key: ConnKey,
}
const _: () = assert!(core::mem::size_of::<PendingConnect>() == 88);
