use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;

/// A query for `name` of `qtype`, as a stub resolver writes it.
pub(crate) fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&RD.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0]);
    q.extend_from_slice(&u16::from(edns.is_some()).to_be_bytes());
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    if let Some(size) = edns {
        q.push(0);
        q.extend_from_slice(&TYPE_OPT.to_be_bytes());
        q.extend_from_slice(&size.to_be_bytes());
        q.extend_from_slice(&[0; 6]);
    }
    q
}

/// A response read back strictly, and checked as a client would: QR set, the owner of each
/// answer the question's name: flags, the question's name, the addresses answered.
pub(crate) fn read_response(buf: &[u8]) -> Result<(u16, String, Vec<IpAddr>), WireError> {
    let r = parse_response(buf)?;
    let mut pos = HEADER_LEN;
    if u16::from_be_bytes([buf[4], buf[5]]) == 1 {
        let mut reader = Reader { buf, pos };
        reader.name(None)?;
        pos = reader.pos + 4;
    }
    let answers = u16::from_be_bytes([buf[6], buf[7]]);
    for _ in 0..answers {
        assert_eq!(&buf[pos..pos + 2], &[0xC0, 12], "owner: the question's name");
        let mut reader = Reader { buf, pos };
        reader.record()?;
        pos = reader.pos;
    }
    Ok((u16::from_be_bytes([buf[2], buf[3]]), r.name, r.addresses))
}

#[test]
fn a_stub_resolvers_query_is_read_and_answered_with_its_question() {
    let q = parse_query(&query(0xBEEF, "Web.Demo.svc.cluster.local", TYPE_A, None)).expect("parses");
    assert_eq!((q.id, q.name.as_str(), q.qtype), (0xBEEF, "web.demo.svc.cluster.local", TYPE_A));
    assert!(q.recursion_desired && q.is_internet());
    let ips = [IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    let a = answer(&q, Rcode::NoError, &ips, 30, q.udp_limit());
    let (flags, name, addrs) = read_response(&a).expect("well formed");
    assert_eq!(flags & 0x0F, 0);
    // The client's letter case comes back (0x20 randomization checks it).
    assert_eq!(&a[12..16], b"\x03Web");
    assert_eq!((name.as_str(), addrs), ("web.demo.svc.cluster.local", vec![ips[0]]));
}

#[test]
fn a_known_name_without_records_of_the_type_is_noerror_and_empty() {
    let q = parse_query(&query(1, "web.demo.svc.cluster.local", TYPE_AAAA, Some(4096))).expect("parses");
    assert_eq!(q.udp_limit(), MAX_UDP, "capped");
    let a = answer(&q, Rcode::NoError, &[IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))], 30, q.udp_limit());
    let (flags, _, addrs) = read_response(&a).expect("well formed");
    assert_eq!((flags & 0x0F, addrs.len()), (0, 0));
    assert_eq!(u16::from_be_bytes([a[10], a[11]]), 1, "EDNS answered with EDNS");
}

#[test]
fn answers_that_do_not_fit_are_truncated_for_a_retry_over_tcp() {
    let q = parse_query(&query(1, "many.demo.svc.cluster.local", TYPE_A, None)).expect("parses");
    let ips: Vec<IpAddr> = (0..100u8).map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))).collect();
    let udp = answer(&q, Rcode::NoError, &ips, 30, q.udp_limit());
    assert!(udp.len() <= CLASSIC_UDP && is_truncated(&udp));
    let (_, _, fit) = read_response(&udp).expect("well formed");
    assert!(!fit.is_empty() && fit.len() < 100);
    let tcp = answer(&q, Rcode::NoError, &ips, 30, u16::MAX as usize);
    assert!(!is_truncated(&tcp));
    assert_eq!(read_response(&tcp).expect("well formed").2.len(), 100);
}

#[test]
fn hostile_queries_are_refused_with_the_reason() {
    let good = query(7, "a.b", TYPE_A, None);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut q = good.clone();
        f(&mut q);
        parse_query(&q)
    };
    assert_eq!(parse_query(&good[..11]), Err(WireError::Short(11)));
    assert_eq!(with(&|q| q[2] |= 0x80), Err(WireError::NotAQuery));
    assert_eq!(with(&|q| q[2] |= 0x10), Err(WireError::Opcode(2)));
    assert_eq!(with(&|q| q[5] = 2), Err(WireError::Questions(2)));
    assert_eq!(with(&|q| q.truncate(q.len() - 1)), Err(WireError::Truncated("the question")));
    assert_eq!(with(&|q| q.push(0)), Err(WireError::Trailing(1)));
    assert_eq!(with(&|q| q[12] = 0x40), Err(WireError::LabelType(0x40)));
    // A pointer in the question can only point at itself or the header: a loop, refused.
    assert_eq!(with(&|q| q.splice(12..12, [0xC0, 12]).for_each(drop)), Err(WireError::BadPointer));
    assert_eq!(with(&|q| q.splice(12..12, [0xC0, 3]).for_each(drop)), Err(WireError::BadPointer));
    let long = query(7, &"a".repeat(64), TYPE_A, None);
    assert_eq!(parse_query(&long), Err(WireError::LabelType(64)), "a label longer than 63 bytes");
    let deep = query(7, &["abcdefghi"; 26].join("."), TYPE_A, None);
    assert_eq!(parse_query(&deep), Err(WireError::NameTooLong));
    // An additional record whose name points forward (a loop if followed) is refused.
    let mut q = query(7, "a.b", TYPE_A, Some(1232));
    let at = q.len() - 11;
    q.splice(at..at + 1, [0xC0, (at + 2) as u8]).for_each(drop);
    assert_eq!(parse_query(&q), Err(WireError::BadPointer));
    // A backward pointer to the question's name is fine.
    let mut q = query(7, "a.b", TYPE_A, Some(1232));
    let at = q.len() - 11;
    q.splice(at..at + 1, [0xC0, 12]).for_each(drop);
    assert_eq!(parse_query(&q).expect("parses").edns_udp_size, Some(1232));
}

#[test]
fn errors_are_answered_only_when_answering_cannot_loop() {
    assert_eq!(WireError::NotAQuery.rcode(), None);
    assert_eq!(WireError::Short(3).rcode(), None);
    assert_eq!(WireError::Opcode(4).rcode(), Some(Rcode::NotImp));
    assert_eq!(WireError::BadPointer.rcode(), Some(Rcode::FormErr));
    let e = error_answer(&query(9, "a", TYPE_A, None), Rcode::FormErr).expect("has a header");
    let (flags, name, addrs) = read_response(&e).expect("well formed");
    assert_eq!((flags & 0x0F, name.as_str(), addrs.len(), id_of(&e)), (1, "", 0, Some(9)));
    assert_eq!(error_answer(&[1, 2, 3], Rcode::FormErr), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Whatever arrives, parsing ends, and every answer built is well formed.
    #[test]
    fn any_bytes_parse_or_fail_and_answers_are_well_formed(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        v4 in any::<[u8; 4]>(),
    ) {
        match parse_query(&bytes) {
            Ok(q) => {
                let a = answer(&q, Rcode::NoError, &[IpAddr::from(v4)], 30, q.udp_limit());
                prop_assert!(a.len() <= q.udp_limit().max(HEADER_LEN + q.question.len() + 11));
                let (_, name, _) = read_response(&a).expect("our answer is well formed");
                prop_assert_eq!(name, q.name);
            }
            Err(e) => {
                if let Some(rcode) = e.rcode() {
                    let a = error_answer(&bytes, rcode).expect("has a header");
                    read_response(&a).expect("our error answer is well formed");
                }
            }
        }
    }

    /// Names made of DNS labels come back as asked.
    #[test]
    fn names_round_trip(labels in proptest::collection::vec("[a-z0-9-]{1,20}", 1..8), qtype in prop_oneof![Just(TYPE_A), Just(TYPE_AAAA)]) {
        let name = labels.join(".");
        let q = parse_query(&query(3, &name, qtype, None)).expect("parses");
        prop_assert_eq!(q.name, name);
        prop_assert_eq!(q.qtype, qtype);
    }
}

#[test]
fn the_proxy_s_own_queries_read_as_queries_and_bad_names_are_not_sent() {
    let q = encode_query(7, "Api.Example.Test.", TYPE_AAAA).expect("a valid name");
    let parsed = parse_query(&q).expect("reads back");
    assert_eq!((parsed.qtype, parsed.name.as_str()), (TYPE_AAAA, "api.example.test"));
    assert_eq!(parsed.udp_limit(), MAX_UDP);
    assert_eq!(id_of(&q), Some(7));
    assert!(encode_query(1, &format!("{}.test", "a".repeat(64)), TYPE_A).is_none());
    assert!(encode_query(1, "a..test", TYPE_A).is_none());
    assert!(encode_query(1, &vec!["abcdefghi"; 30].join("."), TYPE_A).is_none(), "over 255 bytes");
}
