//! Indices of the kernel-side counters (`AMBIT_STATS`, a per-CPU array of u64).
//!
//! Counting in a per-CPU array because atomic adds are not available to the BPF target with
//! this toolchain; userspace sums the CPUs.

/// Connect of an enrolled pod rewritten to the outbound listener.
pub const CONNECT_CAPTURED: u32 = 0;
/// Connect in a network namespace that is not enrolled.
pub const CONNECT_NOT_ENROLLED: u32 = 1;
/// Connect of a socket carrying the proxy's mark (the proxy's own upstream).
pub const CONNECT_PROXY_MARK: u32 = 2;
/// Connect to loopback inside an enrolled pod: pod-local traffic is never captured.
pub const CONNECT_LOOPBACK: u32 = 3;
/// No outbound listener (no proxy) and fail-open: let through uncaptured.
pub const CONNECT_FAIL_OPEN: u32 = 4;
/// No outbound listener (no proxy) and fail-closed: the connect is refused.
pub const CONNECT_FAIL_CLOSED: u32 = 5;
/// sock_ops moved a captured connect's record to the connection-keyed map.
pub const SOCKOPS_RECORDED: u32 = 6;
/// sock_ops could not store the record (map full or error): the proxy will reset it.
pub const SOCKOPS_RECORD_FAILED: u32 = 7;
/// Inbound SYN assigned to the in-pod inbound listener.
pub const INBOUND_ASSIGNED: u32 = 8;
/// Inbound SYN of a connection the kubelet opened (a health probe, recorded by the kubelet's
/// sock_ops program): passed to the application, not captured.
pub const INBOUND_KUBELET_PROBE: u32 = 9;
/// Inbound SYN to a port the proxy serves itself (HBONE): not captured.
pub const INBOUND_PROXY_PORT: u32 = 10;
/// No inbound listener (no proxy) and fail-open: passed to the application uncaptured.
pub const INBOUND_FAIL_OPEN: u32 = 11;
/// No inbound listener (no proxy) and fail-closed: SYN dropped.
pub const INBOUND_FAIL_CLOSED: u32 = 12;
/// `bpf_sk_assign` failed: SYN dropped.
pub const INBOUND_ASSIGN_ERROR: u32 = 13;

/// A trace event written to the ring buffer.
pub const TRACE_EVENT: u32 = 14;
/// A trace event lost: the ring buffer was full (the reader fell behind).
pub const TRACE_EVENT_LOST: u32 = 15;
/// A socket not traced: the traced-sockets map refused it.
pub const TRACE_SOCKET_FAILED: u32 = 16;

// Every frame the inbound program sees ends in exactly one of the counters 8–13 and 17–23.
// Indices are only ever appended: a pinned counter map outlives upgrades.

/// A TCP segment that does not open a connection: passed. The stack delivers it only to a
/// connection that exists already (a listener completes no handshake whose SYN it never saw).
pub const INBOUND_PASS_SEGMENT: u32 = 17;
/// UDP, ICMP, ICMPv6 or IGMP: passed (the mesh carries TCP, as Istio's does).
pub const INBOUND_PASS_DATAGRAM: u32 = 18;
/// ARP: passed (address resolution, nothing an application reads).
pub const INBOUND_PASS_ARP: u32 = 19;
/// An IP or TCP header that is truncated or invalid: dropped.
pub const INBOUND_DROP_MALFORMED: u32 = 20;
/// A fragment of TCP, or of a protocol the program cannot see behind: dropped (TCP never
/// needs fragmentation, and a fragment's ports cannot be classified).
pub const INBOUND_DROP_FRAGMENT: u32 = 21;
/// Another link-layer or IP protocol (tunnels, ESP, AH, SCTP, VLAN tags...): dropped.
pub const INBOUND_DROP_PROTOCOL: u32 = 22;
/// A SYN to an address of the pod that the mesh does not cover (IPv6 link-local, a secondary
/// address): dropped, as capture cannot apply the pod's policy to it.
pub const INBOUND_DROP_UNCOVERED: u32 = 23;
/// The kubelet's sock_ops program recorded a probe connection to an enrolled pod.
pub const KUBELET_PROBE_RECORDED: u32 = 24;
/// ... and could not (map full or error): that probe is captured like any other client.
pub const KUBELET_PROBE_RECORD_FAILED: u32 = 25;

/// A DNS query (UDP send or connect, or TCP connect to port 53) of an enrolled pod steered to
/// the proxy's DNS listener.
pub const DNS_CAPTURED: u32 = 26;
/// No DNS listener (no proxy) and fail-open: the query goes to the resolver uncaptured.
pub const DNS_FAIL_OPEN: u32 = 27;
/// No DNS listener (no proxy) and fail-closed: the query goes to a port nobody serves.
pub const DNS_FAIL_CLOSED: u32 = 28;
/// The resolver's address could not be remembered: its replies read as the listener's, which
/// a resolver library rejects (fail closed).
pub const DNS_RECORD_FAILED: u32 = 29;
/// A reply (or a peer address) of the DNS listener shown as the resolver the pod asked.
pub const DNS_SOURCE_RESTORED: u32 = 30;

/// Number of counters; the array's size.
pub const COUNT: u32 = 31;

/// Names of the counters, indexed like the constants; what metrics and dumps call them.
pub const NAMES: [&str; COUNT as usize] = [
    "connect_captured",
    "connect_not_enrolled",
    "connect_proxy_mark",
    "connect_loopback",
    "connect_fail_open",
    "connect_fail_closed",
    "sockops_recorded",
    "sockops_record_failed",
    "inbound_assigned",
    "inbound_kubelet_probe",
    "inbound_proxy_port",
    "inbound_fail_open",
    "inbound_fail_closed",
    "inbound_assign_error",
    "trace_event",
    "trace_event_lost",
    "trace_socket_failed",
    "inbound_pass_segment",
    "inbound_pass_datagram",
    "inbound_pass_arp",
    "inbound_drop_malformed",
    "inbound_drop_fragment",
    "inbound_drop_protocol",
    "inbound_drop_uncovered",
    "kubelet_probe_recorded",
    "kubelet_probe_record_failed",
    "dns_captured",
    "dns_fail_open",
    "dns_fail_closed",
    "dns_record_failed",
    "dns_source_restored",
];
