//! Conversions between std's socket addresses and the maps' byte layouts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::os::cookie::NetnsCookie;
use ambit_common::{maps::ConnKey, maps::OrigDst, IpKey, AF_INET, AF_INET6};

/// IPv4-mapped IPv6 addresses become plain IPv4, as the programs store them.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

pub fn ip_key(ip: IpAddr) -> IpKey {
    match canonical(ip) {
        IpAddr::V4(v4) => IpKey::v4(v4.octets()),
        IpAddr::V6(v6) => IpKey::v6(v6.octets()),
    }
}

pub fn ip_from_key(key: &IpKey) -> Option<IpAddr> {
    match key.family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(key.addr[0], key.addr[1], key.addr[2], key.addr[3]))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(key.addr))),
        _ => None,
    }
}

/// The key under which sock_ops stored a captured connection, built from what the proxy sees
/// on the accepted socket: the client's address (peer) and the listener's (local).
pub fn conn_key(netns_cookie: NetnsCookie, peer: SocketAddr, local: SocketAddr) -> ConnKey {
    let src = ip_key(peer.ip());
    let dst = ip_key(local.ip());
    ConnKey {
        netns_cookie: netns_cookie.0,
        family: src.family,
        src_port: peer.port(),
        dst_port: local.port(),
        _pad: 0,
        src: src.addr,
        dst: dst.addr,
    }
}

pub fn orig_dst_addr(orig: &OrigDst) -> Option<SocketAddr> {
    ip_from_key(&orig.ip).map(|ip| SocketAddr::new(ip, orig.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_are_stored_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(ip_key(mapped), IpKey::v4([10, 1, 2, 3]));
        let peer: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:15001".parse().expect("addr");
        let k = conn_key(NetnsCookie(7), peer, local);
        assert_eq!((k.family, k.src_port, k.dst_port), (AF_INET, 40000, 15001));
        assert_eq!(&k.src[..4], &[127, 0, 0, 1]);
        assert_eq!(k.src[4..], [0; 12]);
    }

    #[test]
    fn round_trips() {
        for s in ["10.0.0.1:80", "[fd00::1]:8080"] {
            let a: SocketAddr = s.parse().expect("addr");
            let orig = OrigDst { ip: ip_key(a.ip()), port: a.port(), _pad: 0 };
            assert_eq!(orig_dst_addr(&orig), Some(a));
        }
    }
}
