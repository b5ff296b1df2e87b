//! sock_ops: hands a captured connect's original destination to the proxy, and traces
//! enrolled pods' sockets (`trace`).
//!
//! At `TCP_CONNECT_CB` (local port assigned, SYN not yet sent) the record the connect hook left
//! under the socket cookie is copied into `AMBIT_ORIG_DST`, keyed by the connection as the
//! proxy will see it after accept(). At `TCP_CLOSE` both records go, so nothing outlives the
//! connection even when the proxy never accepted it.

use ambit_common::{maps::ConnKey, stats, AF_INET, AF_INET6};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_socket_cookie,
    programs::SockOpsContext,
    EbpfContext,
};

use crate::{
    maps::{count, ORIG_DST, PENDING},
    trace,
};

/// sock_ops programs' return value is only read for a few ops that ask for a reply; 1 is the
/// conventional "handled".
const DONE: u32 = 1;
const V4MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

pub fn handle(ctx: &SockOpsContext) -> u32 {
    let Some(cfg) = crate::maps::config() else { return DONE };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // The capture record first: tracing reads the original destination from it.
            on_connect(ctx);
            trace::on_connect(ctx, cfg);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => trace::on_established(ctx, cfg, false),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => trace::on_established(ctx, cfg, true),
        BPF_SOCK_OPS_STATE_CB => {
            let (old, new) = (ctx.arg(0), ctx.arg(1));
            trace::on_state(ctx, old, new);
            if new == BPF_TCP_CLOSE {
                on_close(ctx);
            }
        }
        BPF_SOCK_OPS_RTT_CB => trace::on_rtt(ctx),
        // Args: first sequence number, segments, the transmit's result. A failed attempt
        // (qdisc busy, no memory) put nothing on the wire and the kernel tries again; its
        // own counters and tracepoint count only the ones that went out, and so do we.
        BPF_SOCK_OPS_RETRANS_CB if ctx.arg(2) == 0 => trace::on_retransmit(ctx, ctx.arg(1)),
        _ => {}
    }
    DONE
}

/// The remote port field holds the big-endian port in its upper half on little-endian
/// kernels of some versions and in its lower half on others; the other half is zero.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    let be = if raw > 0xffff { (raw >> 16) as u16 } else { raw as u16 };
    u16::from_be(be)
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&w[0].to_ne_bytes());
    out[4..8].copy_from_slice(&w[1].to_ne_bytes());
    out[8..12].copy_from_slice(&w[2].to_ne_bytes());
    out[12..16].copy_from_slice(&w[3].to_ne_bytes());
    out
}

#[inline(always)]
fn v4_bytes(w: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&w.to_ne_bytes());
    out
}

fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: the helper takes the program context and only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(pending) = PENDING.get_ptr_mut(&cookie) else {
        // Not a captured connect: the common case for every other socket in the cgroup.
        return;
    };
    let family = ctx.family();
    let local_port = ctx.local_port() as u16;
    let dst_port = remote_port(ctx.remote_port());
    let (family, src, dst) = if family == u32::from(AF_INET) {
        (AF_INET, v4_bytes(ctx.local_ip4()), v4_bytes(ctx.remote_ip4()))
    } else {
        let local = ctx.local_ip6();
        let remote = ctx.remote_ip6();
        if remote[0] == 0 && remote[1] == 0 && remote[2] == V4MAPPED_WORD2 {
            // Dual-stack socket to ::ffff:127.0.0.1: the proxy accepts it on its IPv4
            // listener and sees plain IPv4 addresses.
            (AF_INET, v4_bytes(local[3]), v4_bytes(remote[3]))
        } else {
            (AF_INET6, words_to_bytes(local), words_to_bytes(remote))
        }
    };
    // SAFETY: `pending` comes from a successful lookup in an LRU hash; the element stays
    // valid for this program run (RCU), and only this socket's programs write it.
    let (netns_cookie, orig) = unsafe { ((*pending).netns_cookie, (*pending).orig) };
    let key = ConnKey { netns_cookie, family, src_port: local_port, dst_port, _pad: 0, src, dst };
    if let Err(e) = ORIG_DST.insert(&key, &orig, 0) {
        count(stats::SOCKOPS_RECORD_FAILED);
        if let Some(cfg) = crate::maps::config() {
            crate::klog!(cfg, ctx, warn, "sock_ops: storing the connection record failed: {}", e);
        }
        return;
    }
    // SAFETY: as above; the key is remembered so the close callback can remove the record.
    unsafe {
        (*pending).key = key;
        (*pending).keyed = 1;
    }
    count(stats::SOCKOPS_RECORDED);
    // Ask for state callbacks on this socket only, to clean up at close. If the kernel
    // refuses, the proxy's lookup-and-delete on accept and the LRU bound the leftovers.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        count(stats::SOCKOPS_RECORD_FAILED);
    }
}

fn on_close(ctx: &SockOpsContext) {
    // SAFETY: the helper takes the program context and only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup, the value is copied out before the element is deleted.
    let Some(pending) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return;
    };
    if pending.keyed != 0 {
        // Absent already when the proxy accepted the connection: nothing to do then.
        let _absent_is_fine = ORIG_DST.remove(&pending.key);
    }
    let _absent_is_fine = PENDING.remove(&cookie);
}
