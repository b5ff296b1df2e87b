//! Kernel-level tracing from the sock_ops program: TCP events of enrolled pods' sockets into
//! the `AMBIT_EVENTS` ring buffer (see `ambit_common::trace`).
//!
//! sock_ops runs only for sockets of processes in the attached cgroup, and here only for
//! sockets whose network namespace is enrolled: the filter is exact (netns cookie) and costs
//! a map lookup. A traced socket asks for state, RTT and retransmission callbacks; nothing
//! else in the system pays for them.

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use ambit_common::{
    maps::{Config, CONFIG_TRACE},
    stats,
    trace::{
        TraceEvent, TracedSock, EV_CLOSE, EV_CONNECT, EV_ESTABLISHED, EV_RESET, EV_RETRANSMIT, EV_RTT,
        EV_STATE, PROXY_DELIVERY, PROXY_OWN, RTT_SAMPLE_NS, WAKEUP_BYTES,
    },
};
use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_RETRANS_CB_FLAG,
        BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT,
        BPF_TCP_ESTABLISHED, BPF_TCP_FIN_WAIT1, BPF_TCP_SYN_RECV, BPF_TCP_SYN_SENT,
    },
    helpers::generated::bpf_ktime_get_ns,
    programs::SockOpsContext,
};

use crate::{
    ctx::{netns_cookie, socket_cookie},
    maps::{count, ENROLLED, EVENTS, PENDING, TRACED},
    sock::{addrs, tuple, v4_mapped, Addrs, LOOPBACK6_WORD3},
};

/// The socket's mark and local port. Every context field is read with a volatile load, once:
/// LLVM may otherwise merge context accesses across branches into a form the verifier rejects.
#[inline(always)]
fn mark_and_port(ctx: &SockOpsContext) -> (u32, u32) {
    let o = ctx.ops;
    // SAFETY: `o` is the program's context pointer, valid for the whole run; `sk` is checked
    // for null before its mark is read.
    unsafe {
        let sk = read_volatile(addr_of!((*o).__bindgen_anon_2.sk));
        let mark = if sk.is_null() { 0 } else { read_volatile(addr_of!((*sk).mark)) };
        (mark, read_volatile(addr_of!((*o).local_port)))
    }
}

/// Fills the event's socket fields from the context: its two ends (IPv4-mapped IPv6 as
/// IPv4) and counters.
#[inline(always)]
fn fill(ctx: &SockOpsContext, ev: *mut TraceEvent) {
    let t = tuple(ctx);
    let o = ctx.ops;
    // SAFETY: `o` is the program's context pointer, valid for the whole run (the kernel
    // rewrites each load; fields needing a full socket read 0 otherwise). `ev` points at a
    // reserved ring buffer record of the event's size, written field by field here.
    unsafe {
        addr_of_mut!((*ev).family).write(t.family);
        addr_of_mut!((*ev).local).write(t.local);
        addr_of_mut!((*ev).remote).write(t.remote);
        addr_of_mut!((*ev).local_port).write(t.local_port);
        addr_of_mut!((*ev).remote_port).write(t.remote_port);
        // The kernel keeps 8 × the smoothed RTT.
        addr_of_mut!((*ev).srtt_us).write(read_volatile(addr_of!((*o).srtt_us)) >> 3);
        addr_of_mut!((*ev).total_retrans).write(read_volatile(addr_of!((*o).total_retrans)));
        addr_of_mut!((*ev).bytes_received).write(read_volatile(addr_of!((*o).bytes_received)));
        addr_of_mut!((*ev).bytes_acked).write(read_volatile(addr_of!((*o).bytes_acked)));
    }
}

/// Whether the socket's two ends are on different addresses, neither of them loopback.
#[inline(always)]
fn crosses_network(ctx: &SockOpsContext) -> bool {
    match addrs(ctx) {
        // 127.0.0.0/8: the first byte in network order is the lowest byte here.
        Addrs::V4 { local, remote } => local != remote && (remote & 0xff) != 127,
        Addrs::V6 { local, remote } => {
            let loopback = remote[0] == 0 && remote[1] == 0 && remote[2] == 0 && remote[3] == LOOPBACK6_WORD3;
            let mapped_loopback = v4_mapped(&remote) && (remote[3] & 0xff) == 127;
            !loopback && !mapped_loopback && local != remote
        }
    }
}

/// Whether tracing is on (`CONFIG_TRACE`).
#[inline(always)]
fn enabled(cfg: &Config) -> bool {
    cfg.flags & CONFIG_TRACE != 0
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: no arguments; reads the monotonic clock.
    unsafe { bpf_ktime_get_ns() }
}

/// What happened (BPF functions take at most five arguments: this travels as one).
#[derive(Clone, Copy)]
struct What {
    kind: u16,
    old: u32,
    new: u32,
    segments: u32,
}

const fn what(kind: u16, old: u32, new: u32) -> What {
    What { kind, old, new, segments: 0 }
}

fn emit(ctx: &SockOpsContext, w: What, cookie: u64, t: &TracedSock) {
    // Written in place in the ring buffer: the stack (512 bytes for all calls) has no room
    // for a copy.
    let Some(mut entry) = EVENTS.reserve::<TraceEvent>(0) else {
        // The reader fell behind: counted, never blocking the connection.
        count(stats::TRACE_EVENT_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    fill(ctx, ev);
    // SAFETY: `ev` points at the reserved record; every field not written by `fill` is
    // written here, so the whole record is initialised before it is submitted.
    unsafe {
        addr_of_mut!((*ev).ts_ns).write(now());
        addr_of_mut!((*ev).socket_cookie).write(cookie);
        addr_of_mut!((*ev).netns_cookie).write(t.netns_cookie);
        addr_of_mut!((*ev).segments).write(w.segments);
        addr_of_mut!((*ev).kind).write(w.kind);
        addr_of_mut!((*ev).orig_port).write(t.orig_port);
        addr_of_mut!((*ev).old_state).write(w.old as u8);
        addr_of_mut!((*ev).new_state).write(w.new as u8);
        addr_of_mut!((*ev).passive).write(t.passive);
        addr_of_mut!((*ev).proxy).write(t.proxy);
        addr_of_mut!((*ev)._pad).write([0; 2]);
        addr_of_mut!((*ev).orig).write(t.orig);
        addr_of_mut!((*ev).orig_family).write(t.orig_family);
        addr_of_mut!((*ev)._pad2).write(0);
    }
    // The reader drains on a timer; it is woken early only when a batch has gathered.
    let waiting = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let wake = if waiting >= WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    entry.submit(u64::from(wake));
    count(stats::TRACE_EVENT);
}

/// Starts tracing the socket if its pod is enrolled; returns the traced state.
fn start(ctx: &SockOpsContext, cfg: &Config, passive: bool) -> Option<TracedSock> {
    let netns_cookie = netns_cookie(ctx);
    // SAFETY: read-only lookup; only presence matters.
    unsafe { ENROLLED.get(netns_cookie) }?;
    let (mark, local_port) = mark_and_port(ctx);
    // The proxy's end of a captured connection (accepted on the outbound listener): the pod's
    // own end is traced and carries the original destination.
    if passive && local_port == u32::from(cfg.outbound_port) {
        return None;
    }
    let cookie = socket_cookie(ctx);
    let mut t = TracedSock {
        netns_cookie,
        last_rtt_ns: 0,
        orig: [0; 16],
        orig_port: 0,
        orig_family: 0,
        passive: passive as u8,
        proxy: if mark == cfg.proxy_mark && cfg.proxy_mark != 0 {
            PROXY_OWN
        } else if mark == cfg.delivery_mark && cfg.delivery_mark != 0 {
            PROXY_DELIVERY
        } else {
            0
        },
        _pad: [0; 2],
    };
    if !passive {
        // SAFETY: read-only lookup; the record is copied out.
        if let Some(p) = unsafe { PENDING.get(cookie) } {
            t.orig = p.orig.ip.addr;
            t.orig_family = p.orig.ip.family;
            t.orig_port = p.orig.port;
        }
    }
    if TRACED.insert(cookie, t, 0).is_err() {
        count(stats::TRACE_SOCKET_FAILED);
        return None;
    }
    // RTT callbacks come with every ACK: only for sockets that cross the network. A pod's
    // loopback legs to and from the proxy (both ends on one address) say nothing about it.
    // Delivery sockets (and the application's end of them) stay inside the pod, whichever
    // address they carry.
    let rtt = if t.proxy != PROXY_DELIVERY && crosses_network(ctx) { BPF_SOCK_OPS_RTT_CB_FLAG } else { 0 };
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | rtt | BPF_SOCK_OPS_RETRANS_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        // Without callbacks only this first event will come; the LRU bounds the entry.
        count(stats::TRACE_SOCKET_FAILED);
    }
    Some(t)
}

/// The socket's traced state, if it is traced.
#[inline(always)]
fn traced(cookie: u64) -> Option<TracedSock> {
    // SAFETY: read-only lookup; the value is copied out.
    unsafe { TRACED.get(cookie) }.copied()
}

/// `TCP_CONNECT_CB`: an enrolled pod's socket (or the proxy's, in the pod) connects.
pub fn on_connect(ctx: &SockOpsContext, cfg: &Config) {
    if !enabled(cfg) {
        return;
    }
    if let Some(t) = start(ctx, cfg, false) {
        emit(ctx, what(EV_CONNECT, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT), socket_cookie(ctx), &t);
    }
}

/// `ACTIVE_ESTABLISHED_CB` / `PASSIVE_ESTABLISHED_CB`.
pub fn on_established(ctx: &SockOpsContext, cfg: &Config, passive: bool) {
    if !enabled(cfg) {
        return;
    }
    let cookie = socket_cookie(ctx);
    let t = if passive { start(ctx, cfg, true) } else { traced(cookie) };
    if let Some(t) = t {
        let old = if passive { BPF_TCP_SYN_RECV } else { BPF_TCP_SYN_SENT };
        emit(ctx, what(EV_ESTABLISHED, old, BPF_TCP_ESTABLISHED), cookie, &t);
    }
}

/// `STATE_CB` (args: old state, new state).
pub fn on_state(ctx: &SockOpsContext, old: u32, new: u32) {
    let cookie = socket_cookie(ctx);
    let Some(t) = traced(cookie) else { return };
    if new == BPF_TCP_CLOSE {
        // The FIN handshake goes through FIN_WAIT2, LAST_ACK or CLOSING; anything else that
        // ends in CLOSE skipped it.
        let aborted = matches!(
            old,
            BPF_TCP_ESTABLISHED
                | BPF_TCP_SYN_SENT
                | BPF_TCP_SYN_RECV
                | BPF_TCP_CLOSE_WAIT
                | BPF_TCP_FIN_WAIT1
        );
        emit(ctx, what(if aborted { EV_RESET } else { EV_CLOSE }, old, new), cookie, &t);
        let _gone_already_is_fine = TRACED.remove(cookie);
    } else if new != BPF_TCP_ESTABLISHED {
        emit(ctx, what(EV_STATE, old, new), cookie, &t);
    }
}

/// `RTT_CB`: at most one sample per socket per `RTT_SAMPLE_NS`.
pub fn on_rtt(ctx: &SockOpsContext) {
    // SAFETY: the program's context pointer, valid for the whole run.
    let srtt = unsafe { read_volatile(addr_of!((*ctx.ops).srtt_us)) };
    if srtt == 0 {
        // No sample yet (the handshake's first callback): nothing to say.
        return;
    }
    let cookie = socket_cookie(ctx);
    let Some(slot) = TRACED.get_ptr_mut(cookie) else { return };
    let t_now = now();
    // SAFETY: `slot` comes from a successful LRU lookup and stays valid for this run (RCU);
    // racing updates of `last_rtt_ns` from two CPUs can only cost or save one sample.
    let t = unsafe {
        if (*slot).last_rtt_ns != 0 && t_now.wrapping_sub((*slot).last_rtt_ns) < RTT_SAMPLE_NS {
            return;
        }
        (*slot).last_rtt_ns = t_now;
        *slot
    };
    emit(ctx, what(EV_RTT, BPF_TCP_ESTABLISHED, BPF_TCP_ESTABLISHED), cookie, &t);
}

/// `RETRANS_CB` of a retransmission that went out (`segments` of it).
pub fn on_retransmit(ctx: &SockOpsContext, segments: u32) {
    let cookie = socket_cookie(ctx);
    let Some(t) = traced(cookie) else { return };
    emit(ctx, What { segments, ..what(EV_RETRANSMIT, BPF_TCP_ESTABLISHED, BPF_TCP_ESTABLISHED) }, cookie, &t);
}
