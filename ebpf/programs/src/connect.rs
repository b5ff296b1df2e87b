//! Outbound capture: cgroup connect4/connect6.
//!
//! Runs for every connect() of processes in the attached cgroup (and its descendants), in
//! whatever network namespace the socket lives in; only sockets whose netns is enrolled are
//! touched. The verdict is always "allow": capture is a rewrite of the destination, and refusal
//! (fail-closed with no proxy) is a rewrite to a loopback port nobody listens on, which the
//! application sees as ECONNREFUSED, the same error as any refused connect.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use ambit_common::{
    maps::{Config, ListenerKey, OrigDst, PendingConnect, CONFIG_FAIL_OPEN},
    stats, IpKey, AF_INET, AF_INET6,
};
use aya_ebpf::programs::SockAddrContext;

use crate::{
    ctx::{netns_cookie, socket_cookie},
    maps::{config, count, listener_alive, ENROLLED, PENDING},
    sock::{v4_mapped, words, LOOPBACK6_WORD3, V4MAPPED_WORD2},
};

/// Verdict for cgroup sock_addr programs: let the (possibly rewritten) connect proceed.
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

/// 127.0.0.1 as the u32 the context holds (network byte order in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// The socket fields every decision needs, read once: LLVM may otherwise merge context
/// accesses across branches into a form the verifier rejects.
struct Sock {
    type_: u32,
    protocol: u32,
    mark: u32,
}

#[inline(always)]
fn read_sock(ctx: &SockAddrContext) -> Sock {
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

/// What to do with an enrolled pod's connect, once the address family specifics are known.
enum Decision {
    /// Not ours to touch.
    Leave,
    /// Send it to the proxy's listener (the caller rewrites the address).
    Capture,
}

/// The part of the decision shared by both families: proxy's own sockets, enrolment, whether a
/// proxy is there, and recording the original destination.
#[inline(always)]
fn decide(ctx: &SockAddrContext, cfg: &Config, orig: OrigDst, listener_family: u16) -> Decision {
    let sock = read_sock(ctx);
    if sock.type_ != SOCK_STREAM || sock.protocol != IPPROTO_TCP {
        return Decision::Leave;
    }
    if sock.mark == cfg.proxy_mark || (sock.mark == cfg.delivery_mark && sock.mark != 0) {
        count(stats::CONNECT_PROXY_MARK);
        return Decision::Leave;
    }
    let netns_cookie = netns_cookie(ctx);
    // SAFETY: read-only lookup; the value is copied out immediately.
    if unsafe { ENROLLED.get(netns_cookie) }.is_none() {
        count(stats::CONNECT_NOT_ENROLLED);
        return Decision::Leave;
    }
    let listener = ListenerKey { netns_cookie, family: listener_family, port: cfg.outbound_port, _pad: 0 };
    if !listener_alive(&listener) {
        if cfg.flags & CONFIG_FAIL_OPEN != 0 {
            count(stats::CONNECT_FAIL_OPEN);
            return Decision::Leave;
        }
        // Rewritten to a port with no listener: ECONNREFUSED, never a silent bypass.
        count(stats::CONNECT_FAIL_CLOSED);
        return Decision::Capture;
    }
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
    Decision::Capture
}

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: context pointer, valid for the run; plain field reads.
    let (ip, port) =
        unsafe { (read_volatile(addr_of!((*sa).user_ip4)), read_volatile(addr_of!((*sa).user_port))) };
    let octets = ip.to_ne_bytes();
    // 127/8 and 0.0.0.0 (which connect() treats as loopback) stay inside the pod.
    if octets[0] == 127 || ip == 0 {
        count(stats::CONNECT_LOOPBACK);
        return ALLOW;
    }
    let orig = OrigDst { ip: IpKey::v4(octets), port: u16::from_be(port as u16), _pad: 0 };
    if let Decision::Capture = decide(ctx, cfg, orig, AF_INET) {
        // SAFETY: user_ip4/user_port are the writable fields of a connect4 context.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), LOOPBACK4);
            write_volatile(addr_of_mut!((*sa).user_port), u32::from(cfg.outbound_port.to_be()));
        }
    }
    ALLOW
}

pub fn connect6(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: context pointer, valid for the run; plain field reads, one word at a time as
    // the verifier requires.
    let (w0, w1, w2, w3, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let port = u16::from_be(port as u16);
    let mapped = v4_mapped(&[w0, w1, w2, w3]);
    let (orig, family) = if mapped {
        // A dual-stack socket connecting to an IPv4 peer: handled as IPv4, on the v4 listener.
        let octets = w3.to_ne_bytes();
        if octets[0] == 127 || w3 == 0 {
            count(stats::CONNECT_LOOPBACK);
            return ALLOW;
        }
        (IpKey::v4(octets), AF_INET)
    } else {
        // ::1 and :: (connect() treats it as ::1) stay inside the pod.
        if w0 == 0 && w1 == 0 && w2 == 0 && (w3 == 0 || w3 == LOOPBACK6_WORD3) {
            count(stats::CONNECT_LOOPBACK);
            return ALLOW;
        }
        (IpKey::v6(words([w0, w1, w2, w3])), AF_INET6)
    };
    let orig = OrigDst { ip: orig, port, _pad: 0 };
    if let Decision::Capture = decide(ctx, cfg, orig, family) {
        // ::ffff:127.0.0.1 for mapped peers (served by the IPv4 listener), ::1 otherwise.
        let (n2, n3) = if mapped { (V4MAPPED_WORD2, LOOPBACK4) } else { (0, LOOPBACK6_WORD3) };
        // SAFETY: user_ip6 words and user_port are the writable fields of a connect6 context;
        // each word is written with its own 32-bit store as the verifier requires.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), n2);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), n3);
            write_volatile(addr_of_mut!((*sa).user_port), u32::from(cfg.outbound_port.to_be()));
        }
    }
    ALLOW
}
