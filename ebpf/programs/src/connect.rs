//! Outbound capture: cgroup connect4/connect6 (and the shared parts of DNS capture's sendmsg
//! hooks, `dns`).
//!
//! Runs for every connect() of processes in the attached cgroup (and its descendants), in
//! whatever network namespace the socket lives in; only sockets whose netns is enrolled are
//! touched. The verdict is always "allow": capture is a rewrite of the destination, and refusal
//! (fail-closed with no proxy) is a rewrite to a loopback port nobody listens on, which the
//! application sees as ECONNREFUSED, the same error as any refused connect.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use ambit_common::{
    maps::{Config, ListenerKey, OrigDst, PendingConnect, CONFIG_FAIL_OPEN},
    stats, IpKey, AF_INET, AF_INET6, DNS_SERVER_PORT,
};
use aya_ebpf::programs::SockAddrContext;

use crate::{
    ctx::{netns_cookie, socket_cookie},
    maps::{config, count, listener_alive, ENROLLED, PENDING},
    sock::{v4_mapped, words, LOOPBACK6_WORD3, V4MAPPED_WORD2},
};

/// Verdict for cgroup sock_addr programs: let the (possibly rewritten) call proceed.
pub const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// 127.0.0.1 as the u32 the context holds (network byte order in memory).
pub const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// The socket fields every decision needs, read once: LLVM may otherwise merge context
/// accesses across branches into a form the verifier rejects.
pub struct Sock {
    type_: u32,
    protocol: u32,
    mark: u32,
}

impl Sock {
    fn tcp(&self) -> bool {
        self.type_ == SOCK_STREAM && self.protocol == IPPROTO_TCP
    }

    fn udp(&self) -> bool {
        self.type_ == SOCK_DGRAM && self.protocol == IPPROTO_UDP
    }
}

#[inline(always)]
pub fn read_sock(ctx: &SockAddrContext) -> Sock {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the program's context pointer, valid for the whole run; `sk` in a
    // sock_addr context is always a full socket the verifier lets us read `mark` from.
    unsafe {
        let sk = read_volatile(addr_of!((*sa).__bindgen_anon_1.sk));
        Sock {
            type_: read_volatile(addr_of!((*sa).type_)),
            protocol: read_volatile(addr_of!((*sa).protocol)),
            mark: read_volatile(addr_of!((*sk).mark)),
        }
    }
}

/// What to do with an enrolled pod's connect or send, once the address family specifics are
/// known.
pub enum Decision {
    /// Not ours to touch.
    Leave,
    /// Send it to the proxy's listener on this loopback port (the caller rewrites the address).
    Capture(u16),
}

/// Whether a socket is an enrolled pod's to capture, and whether the proxy is there to take it.
pub enum Gate {
    /// The proxy's own socket, or not an enrolled pod's: untouched.
    Leave,
    /// Enrolled, no listener, fail-closed: sent to a port nobody serves.
    FailClosed,
    /// Enrolled, and the proxy's listener is there (the pod's netns cookie).
    Proxy(u64),
}

/// The checks every capture makes: the proxy's own sockets, enrolment, and whether the
/// listener on `port` is alive (fail open or closed when it is not, counted in `counters`:
/// open, closed).
#[inline(always)]
pub fn gate(
    ctx: &SockAddrContext,
    cfg: &Config,
    sock: &Sock,
    family: u16,
    port: u16,
    counters: (u32, u32),
) -> Gate {
    if sock.mark == cfg.proxy_mark || (sock.mark == cfg.delivery_mark && sock.mark != 0) {
        count(stats::CONNECT_PROXY_MARK);
        return Gate::Leave;
    }
    let netns_cookie = netns_cookie(ctx);
    // SAFETY: read-only lookup; the value is copied out immediately.
    if unsafe { ENROLLED.get(netns_cookie) }.is_none() {
        count(stats::CONNECT_NOT_ENROLLED);
        return Gate::Leave;
    }
    let listener = ListenerKey { netns_cookie, family, port, _pad: 0 };
    if listener_alive(&listener) {
        return Gate::Proxy(netns_cookie);
    }
    if cfg.flags & CONFIG_FAIL_OPEN != 0 {
        count(counters.0);
        return Gate::Leave;
    }
    // Rewritten to a port with no listener: ECONNREFUSED (or no answer), never a silent bypass.
    count(counters.1);
    Gate::FailClosed
}

/// The part of the decision shared by both families: DNS to its listener, other TCP to the
/// outbound listener with its original destination recorded.
#[inline(always)]
fn decide(ctx: &SockAddrContext, cfg: &Config, orig: OrigDst, listener_family: u16) -> Decision {
    let sock = read_sock(ctx);
    if orig.port == DNS_SERVER_PORT && cfg.dns_port() != 0 && (sock.tcp() || sock.udp()) {
        return crate::dns::decide(ctx, cfg, &sock, orig, listener_family);
    }
    if !sock.tcp() {
        return Decision::Leave;
    }
    let counters = (stats::CONNECT_FAIL_OPEN, stats::CONNECT_FAIL_CLOSED);
    let netns_cookie = match gate(ctx, cfg, &sock, listener_family, cfg.outbound_port, counters) {
        Gate::Leave => return Decision::Leave,
        Gate::FailClosed => return Decision::Capture(cfg.outbound_port),
        Gate::Proxy(netns_cookie) => netns_cookie,
    };
    let socket_cookie = socket_cookie(ctx);
    let pending = PendingConnect { netns_cookie, orig, keyed: 0, _pad: 0, key: Default::default() };
    // If the record cannot be stored the connect is still captured: the proxy finds no
    // original destination and resets the connection (fail closed, counted by sock_ops).
    match PENDING.insert(socket_cookie, pending, 0) {
        Ok(()) => {
            count(stats::CONNECT_CAPTURED);
            crate::klog!(cfg, ctx, debug, "connect captured: netns {} port {}", netns_cookie, orig.port);
        }
        Err(e) => crate::klog!(cfg, ctx, warn, "connect: storing the original destination failed: {}", e),
    }
    Decision::Capture(cfg.outbound_port)
}

/// Rewrites an IPv4 destination to 127.0.0.1:`port`.
#[inline(always)]
pub fn set_loopback4(ctx: &SockAddrContext, port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_port are the writable fields of the IPv4 sock_addr hooks.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), LOOPBACK4);
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be()));
    }
}

/// Rewrites an IPv6 destination to `::ffff:127.0.0.1` (`mapped`: the IPv4 listener serves
/// it) or `::1`, port `port`.
#[inline(always)]
pub fn set_loopback6(ctx: &SockAddrContext, mapped: bool, port: u16) {
    let (n2, n3) = if mapped { (V4MAPPED_WORD2, LOOPBACK4) } else { (0, LOOPBACK6_WORD3) };
    set_addr6(ctx, [0, 0, n2, n3], port);
}

/// Writes an IPv6 address (four context words) and port into the context.
#[inline(always)]
pub fn set_addr6(ctx: &SockAddrContext, w: [u32; 4], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip6 words and user_port are the writable fields of the IPv6 sock_addr
    // hooks; each word is written with its own 32-bit store as the verifier requires.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), w[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), w[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), w[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), w[3]);
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be()));
    }
}

/// The IPv4 address and port (host order) the context holds.
#[inline(always)]
pub fn addr4(ctx: &SockAddrContext) -> (u32, u16) {
    let sa = ctx.sock_addr;
    // SAFETY: context pointer, valid for the run; plain field reads.
    let (ip, port) =
        unsafe { (read_volatile(addr_of!((*sa).user_ip4)), read_volatile(addr_of!((*sa).user_port))) };
    (ip, u16::from_be(port as u16))
}

/// The IPv6 address (four words) and port (host order) the context holds.
#[inline(always)]
pub fn addr6(ctx: &SockAddrContext) -> ([u32; 4], u16) {
    let sa = ctx.sock_addr;
    // SAFETY: context pointer, valid for the run; plain field reads, one word at a time as
    // the verifier requires.
    unsafe {
        let w = [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ];
        (w, u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16))
    }
}

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    capture4(ctx, cfg);
    ALLOW
}

/// An IPv4 connect or send: loopback stays in the pod, the rest is decided.
#[inline(always)]
pub fn capture4(ctx: &SockAddrContext, cfg: &Config) {
    let (ip, port) = addr4(ctx);
    let octets = ip.to_ne_bytes();
    // 127/8 and 0.0.0.0 (which connect() treats as loopback) stay inside the pod.
    if octets[0] == 127 || ip == 0 {
        count(stats::CONNECT_LOOPBACK);
        return;
    }
    let orig = OrigDst { ip: IpKey::v4(octets), port, _pad: 0 };
    if let Decision::Capture(to) = decide(ctx, cfg, orig, AF_INET) {
        set_loopback4(ctx, to);
    }
}

pub fn connect6(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    capture6(ctx, cfg);
    ALLOW
}

/// An IPv6 connect or send: loopback stays in the pod, the rest is decided.
#[inline(always)]
pub fn capture6(ctx: &SockAddrContext, cfg: &Config) {
    let ([w0, w1, w2, w3], port) = addr6(ctx);
    let mapped = v4_mapped(&[w0, w1, w2, w3]);
    let (orig, family) = if mapped {
        // A dual-stack socket connecting to an IPv4 peer: handled as IPv4, on the v4 listener.
        let octets = w3.to_ne_bytes();
        if octets[0] == 127 || w3 == 0 {
            count(stats::CONNECT_LOOPBACK);
            return;
        }
        (IpKey::v4(octets), AF_INET)
    } else {
        // ::1 and :: (connect() treats it as ::1) stay inside the pod.
        if w0 == 0 && w1 == 0 && w2 == 0 && (w3 == 0 || w3 == LOOPBACK6_WORD3) {
            count(stats::CONNECT_LOOPBACK);
            return;
        }
        (IpKey::v6(words([w0, w1, w2, w3])), AF_INET6)
    };
    let orig = OrigDst { ip: orig, port, _pad: 0 };
    if let Decision::Capture(to) = decide(ctx, cfg, orig, family) {
        // ::ffff:127.0.0.1 for mapped peers (served by the IPv4 listener), ::1 otherwise.
        set_loopback6(ctx, mapped, to);
    }
}
