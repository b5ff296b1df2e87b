//! ambit's kernel side.
//!
//! - `ambit_connect4` / `ambit_connect6` (cgroup sock_addr): connects of enrolled pods are
//!   rewritten to the proxy's outbound listener on loopback inside the pod; the original
//!   destination is remembered under the socket's cookie.
//! - `ambit_sendmsg4/6`, `ambit_recvmsg4/6`, `ambit_getpeername4/6` (cgroup sock_addr): DNS
//!   capture (`dns`): enrolled pods' queries to port 53 go to the proxy's DNS listener, and
//!   its answers read as the resolver's.
//! - `ambit_sock_ops`: just before the SYN leaves, the record moves to a map keyed by the
//!   connection as the proxy will see it on accept; it is removed when the connection closes.
//!   It also traces enrolled pods' TCP sockets (connect, established, state changes, RTT,
//!   retransmits, close or reset) into the `AMBIT_EVENTS` ring buffer.
//! - `ambit_tc_ingress` (TC ingress on the pod's `eth0`, inside the pod's netns): SYNs for the
//!   pod's ports are assigned to the proxy's in-pod inbound listener; what cannot be
//!   classified is dropped.
//! - `ambit_kubelet_ops` (sock_ops on the kubelet's cgroup only): records the connections the
//!   kubelet opens to enrolled pods (health probes), which the inbound program lets through.
//!
//! Enrolment, listeners and settings live in maps the proxy fills (see `ambit_common::maps`).
#![no_std]
#![no_main]

mod connect;
mod ctx;
mod dns;
mod kubelet;
mod maps;
mod sock;
mod sockops;
mod tc;
mod trace;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, sock_ops},
    programs::{SockAddrContext, SockOpsContext, TcContext},
};

#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    connect::connect4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    connect::connect6(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ambit_sendmsg4(ctx: SockAddrContext) -> i32 {
    dns::sendmsg4(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ambit_sendmsg6(ctx: SockAddrContext) -> i32 {
    dns::sendmsg6(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ambit_recvmsg4(ctx: SockAddrContext) -> i32 {
    dns::restore4(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ambit_recvmsg6(ctx: SockAddrContext) -> i32 {
    dns::restore6(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ambit_getpeername4(ctx: SockAddrContext) -> i32 {
    dns::restore4(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn ambit_getpeername6(ctx: SockAddrContext) -> i32 {
    dns::restore6(&ctx)
}

#[sock_ops]
pub fn ambit_sock_ops(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx)
}

#[sock_ops]
pub fn ambit_kubelet_ops(ctx: SockOpsContext) -> u32 {
    kubelet::handle(&ctx)
}

#[classifier]
pub fn ambit_tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}

/// The license the kernel is told, from its fixed list of tags: none names this crate's
/// "GPL-2.0 OR Apache-2.0" (Cargo.toml), and for dual-licensed code "GPL" is the one that
/// applies in the kernel. It keeps the programs GPL-compatible, as GPL-only helpers require
/// (none is called today).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

// The tag above was chosen for the license Cargo.toml declares; a change there must revisit it.
const _: () = assert!(
    same(env!("CARGO_PKG_LICENSE").as_bytes(), b"GPL-2.0 OR Apache-2.0"),
    "Cargo.toml's license changed: check that LICENSE in main.rs still tells the kernel the truth"
);

const fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
