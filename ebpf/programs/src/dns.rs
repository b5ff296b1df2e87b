//! DNS capture: an enrolled pod's queries to port 53 go to the proxy's DNS listener on the
//! pod's loopback, and its answers read as coming from the resolver the pod asked.
//!
//! - UDP: `sendmsg4/6` rewrite the destination of each datagram sent with an address, and the
//!   connect hooks (`connect`) that of a connected socket (glibc's resolver connects);
//!   `recvmsg4/6` show the listener's replies as the resolver's, and `getpeername4/6` the
//!   connected peer, so that a resolver library that checks where its answer came from
//!   accepts it.
//! - TCP (a client retrying a truncated answer): the connect hooks, to the same port.
//!
//! The resolver asked is remembered per socket (`AMBIT_DNS_ORIG`). With no listener the query
//! goes to the loopback port all the same, where nothing answers (fail closed), unless the
//! proxy set fail-open. The pod's resolver configuration is never read or changed here.

use ambit_common::{maps::Config, maps::OrigDst, stats, IpKey, AF_INET, DNS_SERVER_PORT};
use aya_ebpf::programs::SockAddrContext;

use crate::{
    connect::{addr4, addr6, capture4, capture6, gate, set_addr6, Decision, Gate, Sock, ALLOW, LOOPBACK4},
    ctx::socket_cookie,
    maps::{config, count, DNS_ORIG},
    sock::{v4_mapped, LOOPBACK6_WORD3, V4MAPPED_WORD2},
};

/// A DNS socket of an enrolled pod, once its destination is known to be port 53.
#[inline(always)]
pub fn decide(ctx: &SockAddrContext, cfg: &Config, sock: &Sock, orig: OrigDst, family: u16) -> Decision {
    let port = cfg.dns_port();
    match gate(ctx, cfg, sock, family, port, (stats::DNS_FAIL_OPEN, stats::DNS_FAIL_CLOSED)) {
        Gate::Leave => Decision::Leave,
        Gate::FailClosed => Decision::Capture(port),
        Gate::Proxy(netns_cookie) => {
            // Without the record the answer reads as the listener's, which the resolver
            // library discards: still captured, never a bypass.
            match DNS_ORIG.insert(socket_cookie(ctx), orig, 0) {
                Ok(()) => {
                    count(stats::DNS_CAPTURED);
                    crate::klog!(cfg, ctx, debug, "dns captured: netns {}", netns_cookie);
                }
                Err(e) => {
                    count(stats::DNS_RECORD_FAILED);
                    crate::klog!(cfg, ctx, warn, "dns: storing the resolver's address failed: {}", e);
                }
            }
            Decision::Capture(port)
        }
    }
}

/// The settings, when DNS is captured at all.
#[inline(always)]
fn dns_config() -> Option<&'static Config> {
    config().filter(|cfg| cfg.dns_port() != 0)
}

pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = dns_config() else { return ALLOW };
    // Every datagram a pod sends with an address passes here: only port 53 goes further.
    if addr4(ctx).1 == DNS_SERVER_PORT {
        capture4(ctx, cfg);
    }
    ALLOW
}

pub fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = dns_config() else { return ALLOW };
    if addr6(ctx).1 == DNS_SERVER_PORT {
        capture6(ctx, cfg);
    }
    ALLOW
}

/// The resolver a captured socket asked, if this address is the pod's DNS listener.
#[inline(always)]
fn asked(ctx: &SockAddrContext, listener: bool) -> Option<OrigDst> {
    if !listener {
        return None;
    }
    // Only sockets the capture steered have a record: any other socket receiving from the
    // listener's address is left as it is.
    // SAFETY: read-only lookup; the value is copied out immediately.
    unsafe { DNS_ORIG.get(socket_cookie(ctx)) }.copied()
}

/// `recvmsg4` and `getpeername4`: 127.0.0.1:<dns port> reads as the resolver asked.
pub fn restore4(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = dns_config() else { return ALLOW };
    let (ip, port) = addr4(ctx);
    let Some(orig) = asked(ctx, ip == LOOPBACK4 && port == cfg.dns_port()) else { return ALLOW };
    if orig.ip.family != AF_INET {
        return ALLOW;
    }
    let a = orig.ip.addr;
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_port are the writable fields of recvmsg4 and getpeername4.
    unsafe {
        core::ptr::write_volatile(
            core::ptr::addr_of_mut!((*sa).user_ip4),
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        );
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_port), u32::from(orig.port.to_be()));
    }
    count(stats::DNS_SOURCE_RESTORED);
    ALLOW
}

/// `recvmsg6` and `getpeername6`: ::1 or ::ffff:127.0.0.1 at the DNS port reads as the
/// resolver asked (IPv4-mapped when it was an IPv4 one).
pub fn restore6(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = dns_config() else { return ALLOW };
    let (w, port) = addr6(ctx);
    let loopback = (v4_mapped(&w) && w[3] == LOOPBACK4)
        || (w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == LOOPBACK6_WORD3);
    let Some(orig) = asked(ctx, loopback && port == cfg.dns_port()) else { return ALLOW };
    set_addr6(ctx, words_of(&orig.ip), orig.port);
    count(stats::DNS_SOURCE_RESTORED);
    ALLOW
}

/// An address as the four words of an IPv6 context (IPv4 as IPv4-mapped).
#[inline(always)]
fn words_of(ip: &IpKey) -> [u32; 4] {
    let a = ip.addr;
    let word = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    if ip.family == AF_INET {
        [0, 0, V4MAPPED_WORD2, word(0)]
    } else {
        [word(0), word(4), word(8), word(12)]
    }
}
