//! A pod's DNS message, as the node proxy's DNS listener receives it over UDP or TCP: never a
//! crash or a hang, and every answer the proxy writes reads back as a well-formed response
//! with the query's ID and question, within the transport's size.
#![no_main]

use std::net::IpAddr;

use ambit::dns::{
    handle::{handle, Answering, Handled, Transport},
    wire,
};
use libfuzzer_sys::fuzz_target;

fn mesh(host: &str) -> Option<Vec<IpAddr>> {
    match host {
        "web.demo.svc.cluster.local" => Some(vec![IpAddr::from([10, 96, 0, 10]), "fd00::10".parse().ok()?]),
        "many.demo.svc.cluster.local" => Some((0..200u8).map(|i| IpAddr::from([10, 1, 0, i])).collect()),
        "api.example.com" => Some(vec![IpAddr::from([240, 240, 0, 1])]),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let settings = Answering { cluster_domain: "cluster.local".into(), ttl: 30 };
    for transport in [Transport::Udp, Transport::Tcp] {
        match handle(data, transport, "demo", &settings, mesh) {
            Handled::Reply { answer, .. } => {
                let r = wire::parse_response(&answer).expect("the proxy's answer is well formed");
                assert_eq!(Some(r.id), wire::id_of(data), "the answer carries the query's ID");
                if transport == Transport::Udp {
                    let q = wire::parse_query(data).ok();
                    let limit = q.as_ref().map_or(wire::CLASSIC_UDP, wire::Query::udp_limit);
                    assert!(answer.len() <= limit, "{} bytes over UDP, limit {limit}", answer.len());
                }
            }
            Handled::Forward { .. } => {
                wire::parse_query(data).expect("only a query that reads is forwarded");
            }
            Handled::Drop => assert!(wire::parse_query(data).is_err()),
        }
    }
});
