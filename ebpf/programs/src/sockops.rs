//! sock_ops: hands a captured connect's original destination to the proxy, and traces
//! enrolled pods' sockets (`trace`).
//!
//! At `TCP_CONNECT_CB` (local port assigned, SYN not yet sent) the record the connect hook left
//! under the socket cookie is copied into `AMBIT_ORIG_DST`, keyed by the connection as the
//! proxy will see it after accept(). At `TCP_CLOSE` both records go, so nothing outlives the
//! connection even when the proxy never accepted it.

use ambit_common::{maps::ConnKey, stats};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    programs::SockOpsContext,
};

use crate::{
    ctx::socket_cookie,
    maps::{count, ORIG_DST, PENDING},
    sock::{tuple, DONE},
    trace,
};

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

fn on_connect(ctx: &SockOpsContext) {
    let cookie = socket_cookie(ctx);
    let Some(pending) = PENDING.get_ptr_mut(cookie) else {
        // Not a captured connect: the common case for every other socket in the cgroup.
        return;
    };
    // A dual-stack socket to ::ffff:127.0.0.1 is accepted on the proxy's IPv4 listener,
    // which sees plain IPv4 addresses: the tuple is normalised the same way.
    let t = tuple(ctx);
    let (family, src, dst, local_port, dst_port) = (t.family, t.local, t.remote, t.local_port, t.remote_port);
    // SAFETY: `pending` comes from a successful lookup in an LRU hash; the element stays
    // valid for this program run (RCU), and only this socket's programs write it.
    let (netns_cookie, orig) = unsafe { ((*pending).netns_cookie, (*pending).orig) };
    let key = ConnKey { netns_cookie, family, src_port: local_port, dst_port, _pad: 0, src, dst };
    if let Err(e) = ORIG_DST.insert(key, orig, 0) {
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
    let cookie = socket_cookie(ctx);
    // SAFETY: read-only lookup, the value is copied out before the element is deleted.
    let Some(pending) = (unsafe { PENDING.get(cookie) }).copied() else {
        return;
    };
    if pending.keyed != 0 {
        // Absent already when the proxy accepted the connection: nothing to do then.
        let _absent_is_fine = ORIG_DST.remove(pending.key);
    }
    let _absent_is_fine = PENDING.remove(cookie);
}
