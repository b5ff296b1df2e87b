//! Reading a socket's addressing from a sock_ops context, shared by the capture record
//! (`sockops`), tracing (`trace`) and the kubelet's probe records (`kubelet`).
//!
//! Dual-stack sockets talking to IPv4 peers show IPv4-mapped IPv6 addresses; the wire (and
//! every map key) carries plain IPv4, so they are normalised here.

use core::ptr::{addr_of, read_volatile};

use ambit_common::{AF_INET, AF_INET6};
use aya_ebpf::programs::SockOpsContext;

/// The third 32-bit word of an IPv4-mapped IPv6 address (::ffff:0:0/96).
pub const V4MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Four 32-bit words (as the context holds an IPv6 address) as bytes in network order.
#[inline(always)]
pub fn words(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&w[0].to_ne_bytes());
    out[4..8].copy_from_slice(&w[1].to_ne_bytes());
    out[8..12].copy_from_slice(&w[2].to_ne_bytes());
    out[12..16].copy_from_slice(&w[3].to_ne_bytes());
    out
}

/// An IPv4 address (as the context holds it) in the first four bytes, the rest zero.
#[inline(always)]
pub fn v4(w: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&w.to_ne_bytes());
    out
}

/// The remote port is big-endian in one half of the field (which half varies by kernel); the
/// other half is zero.
#[inline(always)]
pub fn remote_port(raw: u32) -> u16 {
    let be = if raw > 0xffff { (raw >> 16) as u16 } else { raw as u16 };
    u16::from_be(be)
}

/// A socket's two ends: family, addresses (IPv4-mapped as IPv4), ports in host order.
pub struct Tuple {
    pub family: u16,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

/// Reads the socket's two ends. Every context field is read with one volatile load: LLVM may
/// otherwise merge context accesses across branches into a form the verifier rejects.
#[inline(always)]
pub fn tuple(ctx: &SockOpsContext) -> Tuple {
    let o = ctx.ops;
    // SAFETY: `o` is the program's context pointer, valid for the whole run; the kernel
    // rewrites each load (fields that need a full socket read 0 otherwise).
    unsafe {
        let family = read_volatile(addr_of!((*o).family));
        let local_port = read_volatile(addr_of!((*o).local_port)) as u16;
        let remote_port = remote_port(read_volatile(addr_of!((*o).remote_port)));
        if family == u32::from(AF_INET) {
            return Tuple {
                family: AF_INET,
                local: v4(read_volatile(addr_of!((*o).local_ip4))),
                remote: v4(read_volatile(addr_of!((*o).remote_ip4))),
                local_port,
                remote_port,
            };
        }
        let r = [
            read_volatile(addr_of!((*o).remote_ip6[0])),
            read_volatile(addr_of!((*o).remote_ip6[1])),
            read_volatile(addr_of!((*o).remote_ip6[2])),
            read_volatile(addr_of!((*o).remote_ip6[3])),
        ];
        let l = [
            read_volatile(addr_of!((*o).local_ip6[0])),
            read_volatile(addr_of!((*o).local_ip6[1])),
            read_volatile(addr_of!((*o).local_ip6[2])),
            read_volatile(addr_of!((*o).local_ip6[3])),
        ];
        if r[0] == 0 && r[1] == 0 && r[2] == V4MAPPED_WORD2 {
            Tuple { family: AF_INET, local: v4(l[3]), remote: v4(r[3]), local_port, remote_port }
        } else {
            Tuple { family: AF_INET6, local: words(l), remote: words(r), local_port, remote_port }
        }
    }
}
