//! The kubelet's health probes: a sock_ops program attached to the kubelet's cgroup, and to
//! nothing else.
//!
//! When a socket there connects to an enrolled pod's address, its connection (the tuple its
//! SYN will carry) is recorded in `AMBIT_PROBES`; the inbound program lets exactly that SYN
//! through to the application. Which process opened a connection is known only here, on the
//! sending side: by the time the SYN reaches the pod it has crossed a veth and carries no
//! socket and no mark. Every other connection from the node is captured like any client.
//! The record goes when the socket closes (`STATE_CB`), or with the LRU's oldest.

use ambit_common::{maps::FlowKey, stats, IpKey};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    programs::SockOpsContext,
};

use crate::{
    ctx::socket_cookie,
    maps::{config, count, POD_IPS, PROBES},
    sock::{tuple, Tuple, DONE},
};

pub fn handle(ctx: &SockOpsContext) -> u32 {
    if config().is_none() {
        return DONE;
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => record(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => forget(&tuple(ctx)),
        _ => {}
    }
    DONE
}

#[inline(always)]
fn key(t: &Tuple) -> FlowKey {
    FlowKey {
        family: t.family,
        src_port: t.local_port,
        dst_port: t.remote_port,
        _pad: 0,
        src: t.local,
        dst: t.remote,
    }
}

fn record(ctx: &SockOpsContext) {
    let t = tuple(ctx);
    let dst = IpKey { family: t.family, _pad: 0, addr: t.remote };
    // SAFETY: read-only lookup; only presence matters.
    if unsafe { POD_IPS.get(dst) }.is_none() {
        // Not to an enrolled pod (the API server, a registry, a host-network pod...).
        return;
    }
    let cookie = socket_cookie(ctx);
    if PROBES.insert(key(&t), cookie, 0).is_err() {
        // The probe will be captured like any client from the node (and refused under STRICT):
        // visible as a failing probe, never as a bypass.
        count(stats::KUBELET_PROBE_RECORD_FAILED);
        return;
    }
    count(stats::KUBELET_PROBE_RECORDED);
    // A close callback for this socket only, to forget the record; if refused, the LRU bounds it.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        count(stats::KUBELET_PROBE_RECORD_FAILED);
    }
}

fn forget(t: &Tuple) {
    // Absent when the LRU evicted it, or for sockets that were never recorded.
    let _absent_is_fine = PROBES.remove(key(t));
}
