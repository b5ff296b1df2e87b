//! Inbound capture: TC ingress on the pod's `eth0`, inside the pod's network namespace.
//!
//! The program is a security boundary: it is attached only to enrolled pods' interfaces, so
//! every frame it sees is addressed to an enrolled pod, and each one gets a deliberate,
//! counted verdict (`ambit_common::stats`, counters 8–13 and 17–23):
//!
//! - a SYN (SYN without ACK) to one of the pod's mesh addresses is assigned (`bpf_sk_assign`)
//!   to the proxy's inbound listener in the same netns; the destination is local there, so no
//!   policy route, mark or IP_TRANSPARENT is needed, and the proxy learns the original
//!   destination from getsockname(). Exceptions, passed: the ports the proxy serves itself
//!   (HBONE), and connections the kubelet opened (its health probes, recorded by the kubelet's
//!   own sock_ops program, see `kubelet`);
//! - a SYN to any other address of the pod (IPv6 link-local, an address the mesh does not
//!   list) is dropped: the proxy could not apply the pod's policy to it;
//! - other TCP segments pass: the stack delivers them only to connections that exist;
//! - UDP, ICMP, ICMPv6, IGMP and ARP pass (the mesh carries TCP);
//! - everything the parser cannot classify is dropped: truncated or invalid headers, TCP
//!   fragments and fragments it cannot see into, IPv6 extension header chains longer than it
//!   walks, ESP, other protocols and link-layer types.

use ambit_common::{
    maps::{Config, FlowKey, ListenerKey, CONFIG_FAIL_OPEN},
    stats, IpKey, AF_INET, AF_INET6,
};
use aya_ebpf::{helpers::generated::bpf_sk_assign, programs::TcContext};

use crate::{
    ctx::{sk_release, sockhash_lookup},
    maps::{config, count, LISTENERS, POD_IPS, PROBES},
};

/// Not ours: run the next program (tcx) / continue classification (clsact).
const TC_NEXT: i32 = -1;
/// Deliver: required after a successful `bpf_sk_assign`.
const TC_PASS: i32 = 0;
const TC_DROP: i32 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_IGMP: u8 = 2;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;

/// IPv6 extension headers walked before the chain counts as malformed. Real traffic carries
/// zero to two; the bound keeps the verifier's loop finite.
const MAX_EXT_HEADERS: usize = 8;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// The fixed TCP header; the least a valid segment carries.
const TCP_HLEN: usize = 20;

/// What a frame is, as far as the parser could tell.
enum Class {
    /// A connection-opening SYN, with its addressing.
    Syn(FlowKey),
    /// A TCP segment that is not a SYN.
    Segment,
    /// UDP, ICMP, ICMPv6, IGMP.
    Datagram,
    Arp,
    Malformed,
    Fragment,
    /// A link-layer or IP protocol the parser does not classify.
    Protocol,
}

pub fn ingress(ctx: &TcContext) -> i32 {
    let Some(cfg) = config() else {
        // Not configured yet: no pod is enrolled either (the settings are written before any
        // program is attached to a pod), so nothing can be addressed to one.
        return TC_NEXT;
    };
    let (verdict, counter) = match classify(ctx) {
        Class::Syn(flow) => return on_syn(ctx, cfg, &flow),
        Class::Segment => (TC_NEXT, stats::INBOUND_PASS_SEGMENT),
        Class::Datagram => (TC_NEXT, stats::INBOUND_PASS_DATAGRAM),
        Class::Arp => (TC_NEXT, stats::INBOUND_PASS_ARP),
        Class::Malformed => (TC_DROP, stats::INBOUND_DROP_MALFORMED),
        Class::Fragment => (TC_DROP, stats::INBOUND_DROP_FRAGMENT),
        Class::Protocol => (TC_DROP, stats::INBOUND_DROP_PROTOCOL),
    };
    count(counter);
    verdict
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Class {
    let Ok(eth) = ctx.load::<[u8; ETH_HLEN]>(0) else {
        return Class::Malformed;
    };
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => ipv4(ctx),
        ETH_P_IPV6 => ipv6(ctx),
        ETH_P_ARP => Class::Arp,
        // VLAN tags (the stack strips one before this hook), MPLS, anything else.
        _ => Class::Protocol,
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext) -> Class {
    let Ok(ip) = ctx.load::<[u8; 20]>(ETH_HLEN) else {
        return Class::Malformed;
    };
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl {
        return Class::Malformed;
    }
    let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
    // More fragments, or a non-zero offset.
    let fragment = flags_offset & 0x3fff != 0;
    match ip[9] {
        IPPROTO_TCP if fragment => Class::Fragment,
        IPPROTO_TCP => {
            if total < ihl + TCP_HLEN {
                return Class::Malformed;
            }
            let src = IpKey::v4([ip[12], ip[13], ip[14], ip[15]]);
            let dst = IpKey::v4([ip[16], ip[17], ip[18], ip[19]]);
            tcp(ctx, ETH_HLEN + ihl, AF_INET, src, dst)
        }
        // Fragments of these reassemble into the same protocol: nothing for the mesh.
        IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_IGMP => Class::Datagram,
        _ => Class::Protocol,
    }
}

#[inline(always)]
fn ipv6(ctx: &TcContext) -> Class {
    let Ok(ip) = ctx.load::<[u8; 40]>(ETH_HLEN) else {
        return Class::Malformed;
    };
    if ip[0] >> 4 != 6 {
        return Class::Malformed;
    }
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let mut next = ip[6];
    let mut off = ETH_HLEN + 40;
    // Bounded: each step moves past one extension header or ends the walk.
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Ok(h) = ctx.load::<[u8; 2]>(off) else { return Class::Malformed };
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            IPPROTO_AH => {
                let Ok(h) = ctx.load::<[u8; 2]>(off) else { return Class::Malformed };
                next = h[0];
                off += (usize::from(h[1]) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Ok(h) = ctx.load::<[u8; 8]>(off) else { return Class::Malformed };
                // Offset in the upper 13 bits, M in the lowest: an "atomic" fragment (both
                // zero) is a whole packet and is walked on.
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff9 != 0 {
                    return match h[0] {
                        IPPROTO_UDP | IPPROTO_ICMPV6 => Class::Datagram,
                        _ => Class::Fragment,
                    };
                }
                next = h[0];
                off += 8;
            }
            _ => break,
        }
    }
    if matches!(next, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT) {
        // Still in the chain after MAX_EXT_HEADERS.
        return Class::Malformed;
    }
    match next {
        IPPROTO_TCP => {
            // Payload length counts from the end of the fixed header (0: a jumbogram, which
            // TCP over this link never needs).
            if payload + ETH_HLEN + 40 < off + TCP_HLEN {
                return Class::Malformed;
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&ip[8..24]);
            d.copy_from_slice(&ip[24..40]);
            tcp(ctx, off, AF_INET6, IpKey::v6(s), IpKey::v6(d))
        }
        IPPROTO_UDP | IPPROTO_ICMPV6 => Class::Datagram,
        // ESP (the upper layer is encrypted), "no next header", SCTP, tunnels...
        _ => Class::Protocol,
    }
}

#[inline(always)]
fn tcp(ctx: &TcContext, l4: usize, family: u16, src: IpKey, dst: IpKey) -> Class {
    let Ok(tcp) = ctx.load::<[u8; TCP_HLEN]>(l4) else {
        return Class::Malformed;
    };
    if usize::from(tcp[12] >> 4) * 4 < TCP_HLEN {
        return Class::Malformed;
    }
    let flags = tcp[13];
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return Class::Segment;
    }
    Class::Syn(FlowKey {
        family,
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        _pad: 0,
        src: src.addr,
        dst: dst.addr,
    })
}

#[inline(always)]
fn on_syn(ctx: &TcContext, cfg: &Config, f: &FlowKey) -> i32 {
    let dst = IpKey { family: f.family, _pad: 0, addr: f.dst };
    // SAFETY: read-only lookup, the value is copied out at once.
    let Some(netns_cookie) = (unsafe { POD_IPS.get(dst) }).copied() else {
        // An address of this pod the mesh does not cover: nothing could apply its policy.
        count(stats::INBOUND_DROP_UNCOVERED);
        return TC_DROP;
    };
    let p = f.dst_port;
    if p == cfg.hbone_port || p == cfg.inbound_port || p == cfg.outbound_port {
        // HBONE has a real listener on the pod IP; the capture ports are loopback-only, so
        // a SYN to them on the pod IP finds no listener and is reset by the stack.
        count(stats::INBOUND_PROXY_PORT);
        return TC_NEXT;
    }
    // SAFETY: read-only lookup; only presence matters.
    if unsafe { PROBES.get(f) }.is_some() {
        // A health probe the kubelet itself is making: straight to the application, as in
        // Istio. Nothing else from the node is exempt.
        count(stats::INBOUND_KUBELET_PROBE);
        return TC_NEXT;
    }
    let key = ListenerKey {
        netns_cookie,
        family: if f.family == AF_INET6 { AF_INET6 } else { AF_INET },
        port: cfg.inbound_port,
        _pad: 0,
    };
    let sk = sockhash_lookup(&LISTENERS, &key);
    if sk.is_null() {
        // No proxy: the pod's listener is gone with it.
        if cfg.flags & CONFIG_FAIL_OPEN != 0 {
            count(stats::INBOUND_FAIL_OPEN);
            return TC_NEXT;
        }
        count(stats::INBOUND_FAIL_CLOSED);
        return TC_DROP;
    }
    // SAFETY: `ctx.skb.skb` is the program's context; `sk` is a referenced socket from the
    // lookup above, released right after.
    let ret = unsafe { bpf_sk_assign(ctx.skb.skb.cast(), sk, 0) };
    sk_release(sk);
    if ret != 0 {
        count(stats::INBOUND_ASSIGN_ERROR);
        crate::klog!(cfg, ctx, warn, "inbound: bpf_sk_assign failed ({}) for port {}", ret, p);
        return TC_DROP;
    }
    count(stats::INBOUND_ASSIGNED);
    TC_PASS
}
