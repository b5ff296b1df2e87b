use std::collections::HashMap;

use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::pb::istio::workload::{self as pb, address};

fn workload(uid: &str, ips: &[&str], healthy: bool, services: &[(&str, u32, u32)]) -> Address {
    let services = services
        .iter()
        .map(|(key, sp, tp)| {
            (
                key.to_string(),
                pb::PortList {
                    ports: vec![pb::Port { service_port: *sp, target_port: *tp, app_protocol: 0 }],
                },
            )
        })
        .collect();
    Address {
        r#type: Some(address::Type::Workload(pb::Workload {
            uid: uid.into(),
            name: uid.rsplit('/').next().unwrap_or(uid).into(),
            namespace: "demo".into(),
            addresses: ips.iter().map(|i| ip_bytes(i.parse().expect("ip"))).collect(),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            service_account: "sa".into(),
            status: if healthy { pb::WorkloadStatus::Healthy } else { pb::WorkloadStatus::Unhealthy } as i32,
            services,
            ..Default::default()
        })),
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn service(hostname: &str, vip: &str, port: u32, target: u32) -> Address {
    Address {
        r#type: Some(address::Type::Service(pb::Service {
            name: hostname.split('.').next().unwrap_or(hostname).into(),
            namespace: "demo".into(),
            hostname: hostname.into(),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(vip.parse().expect("ip")),
                length: None,
            }],
            ports: vec![pb::Port { service_port: port, target_port: target, app_protocol: 0 }],
            ..Default::default()
        })),
    }
}

fn state_with_web() -> MeshState {
    let mut s = MeshState::default();
    let key = "demo/web.demo.svc.cluster.local";
    s.apply_address(key, "1", &service("web.demo.svc.cluster.local", "10.96.0.10", 80, 8080))
        .expect("service");
    s.apply_address("w1", "1", &workload("w1", &["10.1.0.2"], true, &[(key, 80, 0)])).expect("w1");
    s.apply_address("w2", "1", &workload("w2", &["10.2.0.2"], true, &[(key, 80, 9090)])).expect("w2");
    s.apply_address("w3", "1", &workload("w3", &["10.2.0.3"], false, &[(key, 80, 8080)])).expect("w3");
    s
}

#[test]
fn a_service_vip_is_balanced_over_healthy_endpoints_on_their_target_ports() {
    let s = state_with_web();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..10 {
        match s.route("10.96.0.10:80".parse().expect("addr")) {
            Route::Workload { workload, target, service } => {
                assert_eq!(service.as_deref(), Some("demo/web.demo.svc.cluster.local"));
                // w1 has no target port of its own: the service's; w2 maps 80 to 9090.
                let expected = if workload.uid == "w1" { 8080 } else { 9090 };
                assert_eq!(target.port(), expected);
                *seen.entry(workload.uid.clone()).or_default() += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen.get("w1"), Some(&5));
    assert_eq!(seen.get("w2"), Some(&5));
    assert_eq!(seen.get("w3"), None, "the unhealthy endpoint gets nothing");
    assert!(matches!(
        s.route("10.96.0.10:81".parse().expect("addr")),
        Route::NoEndpoint { reason: crate::pod::Refusal::NoSuchPort, .. }
    ));
    assert!(matches!(s.route("10.2.0.2:22".parse().expect("addr")), Route::Workload { service: None, .. }));
    assert!(matches!(s.route("192.0.2.1:80".parse().expect("addr")), Route::NotSynced));
}

#[test]
fn an_endpoint_known_by_hostname_is_routed_to_be_resolved() {
    // A ServiceEntry with `resolution: DNS`: istiod's workload carries a hostname, no address.
    let mut s = MeshState::default();
    let key = "demo/db.example.test";
    s.apply_address(key, "1", &service("db.example.test", "240.240.0.2", 5432, 15432)).expect("service");
    let mut by_name = workload("se-db", &[], true, &[(key, 5432, 0)]);
    if let Some(address::Type::Workload(w)) = &mut by_name.r#type {
        w.hostname = "DB.Backend.Example.Test.".into();
    }
    s.apply_address("se-db", "1", &by_name).expect("a hostname endpoint");
    match s.route("240.240.0.2:5432".parse().expect("addr")) {
        Route::Resolve { hostname, port, service, .. } => {
            assert_eq!((hostname.as_str(), port, service.as_str()), ("db.backend.example.test", 15432, key));
        }
        other => panic!("{other:?}"),
    }
    // A name DNS cannot carry is refused, naming the field, and changes nothing.
    let mut bad = workload("se-bad", &[], true, &[(key, 5432, 0)]);
    if let Some(address::Type::Workload(w)) = &mut bad.r#type {
        w.hostname = format!("{}.example.test", "x".repeat(64));
    }
    let err = s.apply_address("se-bad", "1", &bad).expect_err("refused").to_string();
    assert!(err.contains("hostname") && err.contains("not a DNS name"), "{err}");
    s.check_invariants().expect("consistent");
}

#[test]
fn an_address_is_unknown_only_after_the_first_sync() {
    let mut s = state_with_web();
    let outside = "192.0.2.1:80".parse().expect("addr");
    assert!(matches!(s.route(outside), Route::NotSynced), "it may be a workload not received yet");
    s.mark_synced();
    assert!(matches!(s.route(outside), Route::Unknown));
    // Known addresses route either way.
    assert!(matches!(s.route("10.2.0.2:22".parse().expect("addr")), Route::Workload { .. }));
}

#[test]
fn an_invalid_resource_is_refused_by_name_and_the_previous_version_stays() {
    let mut s = state_with_web();
    let mut bad = workload("w1", &["10.1.0.2"], true, &[]);
    if let Some(address::Type::Workload(w)) = &mut bad.r#type {
        w.addresses = vec![vec![10, 1, 0, 9, 9]];
    }
    let err = s.apply_address("w1", "2", &bad).expect_err("refused");
    assert_eq!(err.to_string(), "addresses[0] has 5 bytes (an IP address has 4 or 16)");
    let w1 = s.workload_by_ip("10.1.0.2".parse().expect("ip")).expect("still there");
    assert_eq!(w1.services.len(), 1, "the previous version, with its service");
    assert_eq!(s.versions(crate::pb::ADDRESS_TYPE).get("w1").map(String::as_str), Some("1"));
    assert!(
        s.apply_address("other", "1", &workload("w9", &["10.9.9.9"], true, &[])).is_err(),
        "name mismatch"
    );
}

/// A workload sent with an IPv4-mapped address is indexed under the IPv4 address; removing
/// it must remove that entry (the fuzzer's first finding: it stayed, pointing nowhere, and
/// came back to life for the next workload at that uid), and a workload sharing an address
/// keeps it when the other goes.
#[test]
fn an_ipv4_mapped_address_is_removed_and_a_shared_one_survives() {
    let mut s = MeshState::default();
    let mapped = workload("uid-mapped", &["::ffff:10.1.0.9"], true, &[]);
    s.apply_address("uid-mapped", "1", &mapped).expect("applies");
    let ip: IpAddr = "10.1.0.9".parse().expect("ip");
    assert_eq!(s.workload_by_ip(ip).map(|w| w.uid.clone()).as_deref(), Some("uid-mapped"));
    s.remove(crate::pb::ADDRESS_TYPE, "uid-mapped");
    assert_eq!(s.index_sizes(), (0, 0, 0), "the mapped address left an index entry");
    s.check_invariants().expect("consistent");
    // Two workloads at one address: removing the one indexed leaves the other reachable.
    s.apply_address("a", "1", &workload("a", &["10.1.0.9"], true, &[])).expect("a");
    s.apply_address("b", "1", &workload("b", &["10.1.0.9"], true, &[])).expect("b");
    s.remove(crate::pb::ADDRESS_TYPE, "b");
    assert_eq!(s.workload_by_ip(ip).map(|w| w.uid.clone()).as_deref(), Some("a"));
    s.check_invariants().expect("consistent");
    // The fuzzer's input as it found it: an `istio.workload.Address` applied, then removed.
    let bytes = (0..REGRESSION_MAPPED.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&REGRESSION_MAPPED[i..i + 2], 16).expect("hex"))
        .collect::<Vec<u8>>();
    let a = Address::decode(bytes.as_slice()).expect("decodes");
    let mut s = MeshState::default();
    s.apply_address("uid-mapped", "1", &a).expect("applies");
    s.remove(crate::pb::ADDRESS_TYPE, "uid-mapped");
    assert_eq!(s.index_sizes(), (0, 0, 0));
}

const REGRESSION_MAPPED: &str =
    "0a28a2010a7569642d6d61707065640a016d120464656d6f1a1000000000000000000000ffff0a010009";

#[test]
fn removals_leave_no_index_behind() {
    let mut s = state_with_web();
    for name in ["w1", "w2", "w3", "demo/web.demo.svc.cluster.local"] {
        s.remove(crate::pb::ADDRESS_TYPE, name);
    }
    assert_eq!(s.counts(), (0, 0, 0));
    assert_eq!(s.index_sizes(), (0, 0, 0));
    assert!(s.versions(crate::pb::ADDRESS_TYPE).is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Whatever bytes arrive, decoding and applying never panics.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut s = MeshState::default();
        if let Ok(a) = Address::decode(bytes.as_slice()) {
            let name = match &a.r#type {
                Some(address::Type::Workload(w)) => w.uid.clone(),
                Some(address::Type::Service(sv)) => format!("{}/{}", sv.namespace, sv.hostname),
                None => String::new(),
            };
            let _either_is_fine = s.apply_address(&name, "v", &a);
        }
        if let Ok(a) = crate::pb::istio::security::Authorization::decode(bytes.as_slice()) {
            let _either_is_fine = s.apply_authorization(&a.name.clone(), "v", &a);
        }
    }

    /// Random well-typed updates and removals over a small name space: the state never holds
    /// more than the live names, and every index entry points at something that exists.
    #[test]
    fn random_updates_keep_the_indexes_exact(ops in proptest::collection::vec(
        (0u8..3, 0usize..6, proptest::collection::vec((0u8..4, 0u8..8), 0..4), any::<bool>(), 0u32..70000),
        1..80,
    )) {
        let names = ["w0", "w1", "w2", "demo/s0", "demo/s1", "w3"];
        let mut s = MeshState::default();
        let mut live = std::collections::BTreeSet::new();
        for (kind, n, addrs, healthy, port) in ops {
            let name = names[n];
            let ips: Vec<String> = addrs.iter().map(|(a, b)| if *a == 3 { format!("fd00::{b}") } else { format!("10.0.{a}.{b}") }).collect();
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            let result = match (kind, name.starts_with("demo/")) {
                (0, false) => s.apply_address(name, "v", &workload(name, &ips, healthy, &[("demo/s0", port, port)])),
                (0, true) => s.apply_address(name, "v", &service(&name[5..], ips.first().copied().unwrap_or("10.96.0.1"), port, port)),
                (1, _) => { s.remove(crate::pb::ADDRESS_TYPE, name); live.remove(name); Ok(()) }
                _ => s.apply_address(name, "v", &workload("mismatch", &ips, healthy, &[])),
            };
            if kind == 0 && result.is_ok() {
                live.insert(name);
            }
            let (w, sv, _) = s.counts();
            prop_assert!(w + sv <= live.len());
            if let Err(e) = s.check_invariants() {
                prop_assert!(false, "{}", e);
            }
        }
        for name in names {
            s.remove(crate::pb::ADDRESS_TYPE, name);
        }
        prop_assert_eq!(s.counts(), (0, 0, 0));
        prop_assert_eq!(s.index_sizes(), (0, 0, 0));
    }
}

#[test]
fn a_hostname_resolves_to_its_vips_or_its_healthy_endpoints_and_prefers_the_askers_namespace() {
    let mut s = state_with_web();
    let web: Vec<IpAddr> = vec!["10.96.0.10".parse().expect("ip")];
    assert_eq!(s.host_addresses("web.demo.svc.cluster.local", "other"), Some(web.clone()));
    assert_eq!(s.host_addresses("db.demo.svc.cluster.local", "demo"), None);

    // A headless service: its healthy endpoints' addresses.
    let headless_key = "demo/db.demo.svc.cluster.local";
    let mut headless = service("db.demo.svc.cluster.local", "10.96.0.11", 5432, 5432);
    if let Some(address::Type::Service(svc)) = &mut headless.r#type {
        svc.addresses.clear();
    }
    s.apply_address(headless_key, "1", &headless).expect("headless");
    s.apply_address("d1", "1", &workload("d1", &["10.1.0.7"], true, &[(headless_key, 5432, 5432)]))
        .expect("d1");
    s.apply_address("d2", "1", &workload("d2", &["10.1.0.8"], false, &[(headless_key, 5432, 5432)]))
        .expect("d2");
    assert_eq!(
        s.host_addresses("db.demo.svc.cluster.local", "demo"),
        Some(vec!["10.1.0.7".parse().expect("ip")])
    );

    // The same external host defined in two namespaces: the asker's own first.
    for (ns, vip) in [("a", "240.240.0.1"), ("b", "240.240.0.2")] {
        let mut se = service("api.example.com", vip, 443, 443);
        if let Some(address::Type::Service(svc)) = &mut se.r#type {
            svc.namespace = ns.into();
        }
        s.apply_address(&format!("{ns}/api.example.com"), "1", &se).expect("service entry");
    }
    let b: Vec<IpAddr> = vec!["240.240.0.2".parse().expect("ip")];
    assert_eq!(s.host_addresses("api.example.com", "b"), Some(b));
    assert_eq!(s.host_addresses("api.example.com", "c"), Some(vec!["240.240.0.1".parse().expect("ip")]));
    s.check_invariants().expect("consistent");

    s.remove(crate::pb::ADDRESS_TYPE, "a/api.example.com");
    s.remove(crate::pb::ADDRESS_TYPE, "b/api.example.com");
    assert_eq!(s.host_addresses("api.example.com", "b"), None, "gone with its services");
    s.check_invariants().expect("consistent");
}
