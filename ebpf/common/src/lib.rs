//! Types shared by ambit's eBPF programs and its userspace.
//!
//! Every type here crosses the kernel/userspace boundary as raw bytes in a BPF map, so each is
//! `#[repr(C)]`, has explicit padding fields (the kernel compares keys byte for byte: implicit
//! padding with garbage in it would make two equal keys differ) and a compile-time size check.
//! No `bool`, enum or `Option` appears in a key or value: any bit pattern must be valid.
//!
//! Addresses are 16 bytes in network byte order; an IPv4 address occupies the first four bytes
//! and the rest is zero. Ports are in host byte order unless a field says otherwise.
#![no_std]
#![deny(unsafe_code)]

pub mod maps;
pub mod stats;
pub mod trace;

/// `AF_INET` as the kernel spells it.
pub const AF_INET: u16 = 2;
/// `AF_INET6` as the kernel spells it.
pub const AF_INET6: u16 = 10;

/// Default `SO_MARK` on the proxy's own sockets; the connect hooks never capture them.
/// 0x539 is the value Istio's ztunnel uses, so nodes running both stay consistent.
pub const DEFAULT_PROXY_MARK: u32 = 0x539;
/// Default `SO_MARK` of the proxy's delivering sockets (see `maps::Config::delivery_mark`).
pub const DEFAULT_DELIVERY_MARK: u32 = 0x53a;
/// Outbound capture listener port, on loopback inside each enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture listener port, on loopback inside each enrolled pod.
pub const INBOUND_PORT: u16 = 15006;
/// HBONE listener port on the pod IP; inbound capture leaves it alone.
pub const HBONE_PORT: u16 = 15008;
/// DNS listener port (UDP and TCP), on loopback inside each enrolled pod: ztunnel's.
pub const DNS_PORT: u16 = 15053;
/// The port DNS is captured on.
pub const DNS_SERVER_PORT: u16 = 53;

/// An IP address as the maps store it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    pub _pad: u16,
    /// Network byte order; IPv4 in the first four bytes, the rest zero.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IpKey>() == 20);

impl IpKey {
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        IpKey { family: AF_INET, _pad: 0, addr }
    }

    pub const fn v6(octets: [u8; 16]) -> Self {
        IpKey { family: AF_INET6, _pad: 0, addr: octets }
    }
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod_impls {
    // SAFETY: every type below is #[repr(C)], made only of integers and integer arrays, with
    // explicit padding fields, so every bit pattern is a valid value and there are no
    // uninitialised bytes: exactly what aya::Pod requires.
    unsafe impl aya::Pod for super::IpKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::maps::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::maps::PodEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::maps::ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::maps::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::maps::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::maps::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::maps::PendingConnect {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::trace::TracedSock {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::trace::TraceEvent {}
}
