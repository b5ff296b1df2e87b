//! One message, decided: answered from the mesh, forwarded, or dropped. No I/O here, so the
//! decision is the same over UDP and TCP and testable without sockets.

use std::net::IpAddr;

use super::{
    resolve::{self, Known},
    wire::{self, Rcode, TYPE_A, TYPE_AAAA},
};

/// How names are completed and how long answers may be cached.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Answering {
    /// Kubernetes' cluster domain (`cluster.local`): short service names are completed in it.
    pub cluster_domain: String,
    /// The TTL of the mesh's answers, seconds. Short: the mesh's addresses change with it.
    pub ttl: u32,
}

/// How a query came: it bounds the answer's size, and labels the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What becomes of a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    /// Answered by the proxy (from the mesh, or an error).
    Reply { answer: Vec<u8>, rcode: Rcode, query_type: Option<u16> },
    /// Not a mesh name: the upstream resolver answers it, and its answer goes back unchanged.
    Forward { query_type: u16 },
    /// Not a query (a response, or shorter than a header): no answer, so that two resolvers
    /// cannot bounce errors at each other.
    Drop,
}

/// Decides `message`, asked by a pod of `namespace`, with `lookup` giving a mesh hostname's
/// addresses (see `state::MeshState::host_addresses`).
pub fn handle(
    message: &[u8],
    transport: Transport,
    namespace: &str,
    settings: &Answering,
    lookup: impl Fn(&str) -> Option<Vec<IpAddr>>,
) -> Handled {
    let q = match wire::parse_query(message) {
        Ok(q) => q,
        Err(e) => {
            return match e.rcode().and_then(|r| wire::error_answer(message, r).map(|a| (a, r))) {
                Some((answer, rcode)) => Handled::Reply { answer, rcode, query_type: None },
                None => Handled::Drop,
            }
        }
    };
    // Names of other classes (CHAOS's version.bind, say) are not the mesh's.
    if !q.is_internet() {
        return Handled::Forward { query_type: q.qtype };
    }
    match resolve::resolve(&q.name, namespace, &settings.cluster_domain, lookup) {
        Known::Forward => Handled::Forward { query_type: q.qtype },
        // A known name: A and AAAA from the mesh, any other type NOERROR with no records
        // (the mesh has none of them, and NXDOMAIN would deny the name itself).
        Known::Addresses(addresses) => {
            let limit = match transport {
                Transport::Udp => q.udp_limit(),
                Transport::Tcp => u16::MAX as usize,
            };
            let answer = if matches!(q.qtype, TYPE_A | TYPE_AAAA) {
                wire::answer(&q, Rcode::NoError, &addresses, settings.ttl, limit)
            } else {
                wire::answer(&q, Rcode::NoError, &[], settings.ttl, limit)
            };
            Handled::Reply { answer, rcode: Rcode::NoError, query_type: Some(q.qtype) }
        }
    }
}

/// The query type as Istio's DNS metrics label it (`a`, `aaaa`, or the number).
pub fn type_label(qtype: u16) -> String {
    match qtype {
        TYPE_A => "a".into(),
        TYPE_AAAA => "aaaa".into(),
        5 => "cname".into(),
        12 => "ptr".into(),
        15 => "mx".into(),
        16 => "txt".into(),
        33 => "srv".into(),
        65 => "https".into(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::tests::{query, read_response};

    fn settings() -> Answering {
        Answering { cluster_domain: "cluster.local".into(), ttl: 30 }
    }

    fn mesh(host: &str) -> Option<Vec<IpAddr>> {
        match host {
            "web.demo.svc.cluster.local" => Some(vec!["10.96.0.10".parse().expect("ip")]),
            "many.demo.svc.cluster.local" => Some((0..100u8).map(|i| IpAddr::from([10, 1, 0, i])).collect()),
            _ => None,
        }
    }

    fn ask(message: &[u8], transport: Transport) -> Handled {
        handle(message, transport, "demo", &settings(), mesh)
    }

    #[test]
    fn a_mesh_name_is_answered_and_any_other_forwarded() {
        let Handled::Reply { answer, rcode, query_type } =
            ask(&query(1, "web", TYPE_A, None), Transport::Udp)
        else {
            panic!("answered")
        };
        assert_eq!((rcode, query_type), (Rcode::NoError, Some(TYPE_A)));
        assert_eq!(read_response(&answer).expect("well formed").2, vec![IpAddr::from([10, 96, 0, 10])]);
        assert_eq!(
            ask(&query(2, "example.org", TYPE_A, None), Transport::Udp),
            Handled::Forward { query_type: TYPE_A }
        );
    }

    #[test]
    fn a_mesh_name_has_no_records_of_other_types_and_is_not_denied() {
        for qtype in [TYPE_AAAA, 15, 16] {
            let Handled::Reply { answer, rcode, .. } =
                ask(&query(3, "web.demo", qtype, None), Transport::Udp)
            else {
                panic!("answered")
            };
            let (flags, _, addrs) = read_response(&answer).expect("well formed");
            assert_eq!((rcode, flags & 0x0F, addrs.len()), (Rcode::NoError, 0, 0), "type {qtype}");
        }
    }

    #[test]
    fn other_classes_are_forwarded_and_what_is_not_a_query_is_dropped() {
        let mut chaos = query(4, "version.bind", 16, None);
        let n = chaos.len();
        chaos[n - 1] = 3;
        assert_eq!(ask(&chaos, Transport::Udp), Handled::Forward { query_type: 16 });
        let mut response = query(5, "web", TYPE_A, None);
        response[2] |= 0x80;
        assert_eq!(ask(&response, Transport::Udp), Handled::Drop);
        assert_eq!(ask(&[0; 5], Transport::Tcp), Handled::Drop);
        let mut bad = query(6, "web", TYPE_A, None);
        bad.push(0);
        assert!(matches!(
            ask(&bad, Transport::Udp),
            Handled::Reply { rcode: Rcode::FormErr, query_type: None, .. }
        ));
    }

    #[test]
    fn a_large_answer_is_truncated_over_udp_and_whole_over_tcp() {
        let q = query(7, "many", TYPE_A, None);
        let Handled::Reply { answer: udp, .. } = ask(&q, Transport::Udp) else { panic!("answered") };
        assert!(wire::is_truncated(&udp) && udp.len() <= wire::CLASSIC_UDP);
        let Handled::Reply { answer: tcp, .. } = ask(&q, Transport::Tcp) else { panic!("answered") };
        assert_eq!(read_response(&tcp).expect("well formed").2.len(), 100);
    }
}
