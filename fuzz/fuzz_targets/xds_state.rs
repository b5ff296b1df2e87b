//! xDS input as the proxy receives it: `istio.workload.Address` and
//! `istio.security.Authorization` protobuf bytes, applied, removed and routed through in any
//! order. After every step the state's indexes agree with what it holds
//! (`MeshState::check_invariants`: every index entry belongs to a live resource, every
//! address is indexed, `route` agrees with `workload_by_ip`), a refused resource changes
//! nothing, and removing everything leaves every index empty.
//!
//! Input: records (`ambit_fuzz::Records`): op % 4 = 0 apply an Address,
//! 1 apply an Authorization, 2 remove a name seen so far, 3 route to an address.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use ambit::{
    pb::istio::{
        security::Authorization,
        workload::{address, Address},
    },
    state::MeshState,
    xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE},
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// The name a resource is served under: its own, or (odd ops) a wrong one.
fn address_name(a: &Address, honest: bool) -> String {
    let own = match &a.r#type {
        Some(address::Type::Workload(w)) => w.uid.clone(),
        Some(address::Type::Service(s)) => format!("{}/{}", s.namespace, s.hostname),
        None => String::new(),
    };
    if honest {
        own
    } else {
        format!("{own}x")
    }
}

fn shape(s: &MeshState) -> ((usize, usize, usize), (usize, usize, usize)) {
    (s.counts(), s.index_sizes())
}

fuzz_target!(|data: &[u8]| {
    let mut s = MeshState::default();
    s.mark_synced();
    let mut names: Vec<(&'static str, String)> = Vec::new();
    for (op, chunk) in ambit_fuzz::Records::new(data) {
        match op % 4 {
            0 => {
                let Ok(a) = Address::decode(chunk) else { continue };
                let name = address_name(&a, op & 0x80 == 0);
                let before = shape(&s);
                match s.apply_address(&name, "v", &a) {
                    Ok(()) => names.push((ADDRESS_TYPE, name)),
                    Err(_) => assert_eq!(shape(&s), before, "a refused Address changed the state"),
                }
            }
            1 => {
                let Ok(a) = Authorization::decode(chunk) else { continue };
                let name =
                    if op & 0x80 == 0 { format!("{}/{}", a.namespace, a.name) } else { a.name.clone() };
                let before = shape(&s);
                match s.apply_authorization(&name, "v", &a) {
                    Ok(()) => names.push((AUTHORIZATION_TYPE, name)),
                    Err(_) => assert_eq!(shape(&s), before, "a refused Authorization changed the state"),
                }
            }
            2 => {
                if let (Some(i), false) = (chunk.first(), names.is_empty()) {
                    let (t, name) = names[usize::from(*i) % names.len()].clone();
                    s.remove(t, &name);
                }
            }
            _ => {
                let ip = match chunk.len() {
                    n if n >= 18 => IpAddr::from(<[u8; 16]>::try_from(&chunk[..16]).expect("16 bytes")),
                    n if n >= 6 => IpAddr::from(<[u8; 4]>::try_from(&chunk[..4]).expect("4 bytes")),
                    _ => continue,
                };
                let port = u16::from_be_bytes([chunk[chunk.len() - 2], chunk[chunk.len() - 1]]);
                let _any_route_is_an_answer = s.route(SocketAddr::new(ip, port));
            }
        }
        if let Err(e) = s.check_invariants() {
            panic!("after op {op} ({} bytes): {e}", chunk.len());
        }
    }
    for (t, name) in &names {
        s.remove(t, name);
    }
    assert_eq!(s.counts(), (0, 0, 0), "resources left after removing every name");
    assert_eq!(s.index_sizes(), (0, 0, 0), "index entries left after removing everything");
});
