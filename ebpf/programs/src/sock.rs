//! A socket's addressing as BPF contexts hold it (an IPv4 address in one 32-bit word, an
//! IPv6 address in four, each in network order in memory), read in one place for the
//! sock_ops programs: the capture record (`sockops`), tracing (`trace`) and the kubelet's
//! probe records (`kubelet`). The connect hooks (`connect`) share the address helpers.
//!
//! Dual-stack sockets talking to IPv4 peers show IPv4-mapped IPv6 addresses; the wire (and
//! every map key) carries plain IPv4, so [`tuple`] normalises them.

use core::ptr::{addr_of, read_volatile};

use ambit_common::{AF_INET, AF_INET6};
use aya_ebpf::programs::SockOpsContext;

/// sock_ops programs' return value is only read for a few ops that ask for a reply; 1 is the
/// conventional "handled".
pub const DONE: u32 = 1;

/// The third 32-bit word of an IPv4-mapped IPv6 address (::ffff:0:0/96).
pub const V4MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// The last word of ::1.
pub const LOOPBACK6_WORD3: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

/// Whether an IPv6 address (as four words) is IPv4-mapped; its IPv4 address is then word 3.
#[inline(always)]
pub fn v4_mapped(w: &[u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == V4MAPPED_WORD2
}

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

/// A socket's two addresses exactly as the context holds them (nothing normalised).
pub enum Addrs {
    V4 { local: u32, remote: u32 },
    V6 { local: [u32; 4], remote: [u32; 4] },
}

/// Reads the socket's two addresses: the IPv4 fields of an AF_INET socket, the IPv6 ones of
/// any other. Every context field is read with one volatile load: LLVM may otherwise merge
/// context accesses across branches into a form the verifier rejects.
#[inline(always)]
pub fn addrs(ctx: &SockOpsContext) -> Addrs {
    let o = ctx.ops;
    // SAFETY: `o` is the program's context pointer, valid for the whole run; the kernel
    // rewrites each load (fields that need a full socket read 0 otherwise).
    unsafe {
        if read_volatile(addr_of!((*o).family)) == u32::from(AF_INET) {
            return Addrs::V4 {
                local: read_volatile(addr_of!((*o).local_ip4)),
                remote: read_volatile(addr_of!((*o).remote_ip4)),
            };
        }
        let remote = [
            read_volatile(addr_of!((*o).remote_ip6[0])),
            read_volatile(addr_of!((*o).remote_ip6[1])),
            read_volatile(addr_of!((*o).remote_ip6[2])),
            read_volatile(addr_of!((*o).remote_ip6[3])),
        ];
        let local = [
            read_volatile(addr_of!((*o).local_ip6[0])),
            read_volatile(addr_of!((*o).local_ip6[1])),
            read_volatile(addr_of!((*o).local_ip6[2])),
            read_volatile(addr_of!((*o).local_ip6[3])),
        ];
        Addrs::V6 { local, remote }
    }
}

/// A socket's two ends: family, addresses (IPv4-mapped as IPv4), ports in host order.
pub struct Tuple {
    pub family: u16,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

/// Reads the socket's two ends, with the same single volatile load per field as [`addrs`].
#[inline(always)]
pub fn tuple(ctx: &SockOpsContext) -> Tuple {
    let o = ctx.ops;
    // SAFETY: `o` is the program's context pointer, valid for the whole run.
    let (local_port, remote_port) = unsafe {
        (
            read_volatile(addr_of!((*o).local_port)) as u16,
            remote_port(read_volatile(addr_of!((*o).remote_port))),
        )
    };
    match addrs(ctx) {
        Addrs::V4 { local, remote } => {
            Tuple { family: AF_INET, local: v4(local), remote: v4(remote), local_port, remote_port }
        }
        Addrs::V6 { local, remote } if v4_mapped(&remote) => {
            Tuple { family: AF_INET, local: v4(local[3]), remote: v4(remote[3]), local_port, remote_port }
        }
        Addrs::V6 { local, remote } => {
            Tuple { family: AF_INET6, local: words(local), remote: words(remote), local_port, remote_port }
        }
    }
}
