//! Inbound capture: TC ingress on the pod's `eth0`, inside the pod's network namespace.
//!
//! A SYN for one of the pod's ports is assigned (`bpf_sk_assign`) to the proxy's inbound
//! listener in the same netns. The destination is local there, so no policy route, mark or
//! IP_TRANSPARENT is needed, and the proxy learns the original destination from getsockname().
//! Everything else (later packets of a flow, other protocols, ports the proxy serves itself,
//! the node's own health probes) is left to the next program or the stack.

use ambit_common::{
    maps::{Config, ListenerKey, CONFIG_FAIL_OPEN},
    stats, IpKey, AF_INET, AF_INET6,
};
use aya_ebpf::{helpers::generated::bpf_sk_assign, programs::TcContext};

use crate::{
    ctx::{sk_release, sockhash_lookup},
    maps::{config, count, LISTENERS, NODE_ADDRS, POD_IPS},
};

/// Not ours: run the next program (tcx) / continue classification (clsact).
const TC_NEXT: i32 = -1;
/// Deliver: required after a successful `bpf_sk_assign`.
const TC_PASS: i32 = 0;
const TC_DROP: i32 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A TCP segment's addressing, as far as the decision needs it.
struct Syn {
    src: IpKey,
    dst: IpKey,
    dst_port: u16,
}

pub fn ingress(ctx: &TcContext) -> i32 {
    let Some(cfg) = config() else {
        return TC_NEXT;
    };
    match parse_syn(ctx) {
        Some(syn) => on_syn(ctx, cfg, &syn),
        None => TC_NEXT,
    }
}

/// Returns the addressing of a connection-opening SYN (SYN without ACK), `None` for anything
/// else. IPv6 SYNs behind extension headers and IPv4 fragments are left alone.
#[inline(always)]
fn parse_syn(ctx: &TcContext) -> Option<Syn> {
    let eth: [u8; ETH_HLEN] = ctx.load(0).ok()?;
    let proto = u16::from_be_bytes([eth[12], eth[13]]);
    let (src, dst, l4) = if proto == ETH_P_IP {
        let ip: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
        if ip[9] != IPPROTO_TCP || ihl < 20 || frag != 0 {
            return None;
        }
        (
            IpKey::v4([ip[12], ip[13], ip[14], ip[15]]),
            IpKey::v4([ip[16], ip[17], ip[18], ip[19]]),
            ETH_HLEN + ihl,
        )
    } else if proto == ETH_P_IPV6 {
        let ip: [u8; 40] = ctx.load(ETH_HLEN).ok()?;
        if ip[6] != IPPROTO_TCP {
            return None;
        }
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&ip[8..24]);
        d.copy_from_slice(&ip[24..40]);
        (IpKey::v6(s), IpKey::v6(d), ETH_HLEN + 40)
    } else {
        return None;
    };
    let tcp: [u8; 14] = ctx.load(l4).ok()?;
    let flags = tcp[13];
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return None;
    }
    Some(Syn { src, dst, dst_port: u16::from_be_bytes([tcp[2], tcp[3]]) })
}

#[inline(always)]
fn on_syn(ctx: &TcContext, cfg: &Config, syn: &Syn) -> i32 {
    // SAFETY: read-only lookup, the value is copied out at once.
    let Some(netns_cookie) = (unsafe { POD_IPS.get(&syn.dst) }).copied() else {
        // Not addressed to an enrolled pod's IP (e.g. a pod being unenrolled).
        return TC_NEXT;
    };
    let p = syn.dst_port;
    if p == cfg.hbone_port || p == cfg.inbound_port || p == cfg.outbound_port {
        // HBONE has a real listener on the pod IP; the capture ports are loopback-only, so
        // a SYN to them on the pod IP finds no listener and is reset by the stack.
        count(stats::INBOUND_PROXY_PORT);
        return TC_NEXT;
    }
    // SAFETY: read-only lookup.
    if unsafe { NODE_ADDRS.get(&syn.src) }.is_some() {
        // Kubelet health probes come from the node's own addresses and go straight to the
        // application, as with Istio.
        count(stats::INBOUND_NODE_BYPASS);
        return TC_NEXT;
    }
    let key = ListenerKey {
        netns_cookie,
        family: if syn.dst.family == AF_INET6 { AF_INET6 } else { AF_INET },
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
