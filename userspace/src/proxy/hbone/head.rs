//! The parts of an HBONE CONNECT's head ambit reads, as pure functions (the fuzzer drives
//! them directly): the target a CONNECT asks for, and the service a `forwarded` header
//! names. The baggage describing the source workload is `pod::baggage`.
//!
//! Everything here comes from, or goes to, the other end: parse as hostile, write so the
//! other end cannot be misled.

use std::net::SocketAddr;

use http::{Method, StatusCode};

use crate::{capture::addr, pod::Refusal};

/// Why a CONNECT's head is refused: status, reason (metrics, logs), detail.
pub type HeadRefusal = (StatusCode, Refusal, &'static str);

/// The target a CONNECT asks for, from its untrusted head: only CONNECT, and an `IP:port`
/// authority (canonical: v4-mapped v6 addresses as v4).
pub fn connect_target(method: &Method, authority: Option<&str>) -> Result<SocketAddr, HeadRefusal> {
    if method != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, Refusal::NotConnect, "only CONNECT is served"));
    }
    let dst = authority.and_then(|a| a.parse::<SocketAddr>().ok()).ok_or((
        StatusCode::BAD_REQUEST,
        Refusal::BadAuthority,
        "the :authority is not an IP:port",
    ))?;
    Ok(SocketAddr::new(addr::canonical(dst.ip()), dst.port()))
}

/// The service hostname a `forwarded` header names (`host=`, as ztunnel writes it when a
/// service was dialled; quoted or not). Only a hint for naming the destination service in
/// metrics and logs, never for authorization: `None` unless it is a plain DNS name.
pub fn forwarded_host(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    let host = text
        .split([';', ','])
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim())?;
    let host = host.strip_prefix('"').and_then(|h| h.strip_suffix('"')).unwrap_or(host);
    is_plain_host(host).then_some(host)
}

/// A DNS name as `forwarded`'s `host=` may carry it unquoted (RFC 7239 token characters):
/// what ambit writes there and the only thing it reads back.
pub fn is_plain_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Heads seen in the wild and the edges of the grammar.
    const CORPUS: &str = include_str!("heads.tsv");

    #[test]
    fn the_corpus_parses_as_recorded() {
        for line in CORPUS.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let mut f = line.split('\t');
            let mut next = || f.next().unwrap_or_else(|| panic!("four tab-separated columns: {line}"));
            // The `forwarded` column is there to show that it changes nothing.
            let (method, authority, _forwarded, want) = (next(), next(), next(), next());
            let method = Method::from_bytes(method.as_bytes()).expect("corpus method");
            let got = match connect_target(&method, Some(authority)) {
                Ok(dst) => dst.to_string(),
                Err((status, ..)) => status.as_u16().to_string(),
            };
            assert_eq!(got, want, "{line}");
        }
    }

    #[test]
    fn forwarded_host_is_read_as_ztunnel_writes_it_and_nothing_else() {
        let cases: [(&str, Option<&str>); 9] = [
            ("for=\"10.1.0.2:4000\";host=web.demo.svc.cluster.local", Some("web.demo.svc.cluster.local")),
            ("for=\"10.1.0.2\";host=\"web.demo.svc.cluster.local\"", Some("web.demo.svc.cluster.local")),
            ("Host=web", Some("web")),
            ("for=\"10.1.0.2\"", None),
            ("for=\"10.1.0.2\";host=", None),
            ("for=\"10.1.0.2\";host=\"\"", None),
            ("host=a b", None),
            ("host=a/b", None),
            ("host=\"unterminated", None),
        ];
        for (value, want) in cases {
            assert_eq!(forwarded_host(value.as_bytes()), want, "{value}");
        }
        assert_eq!(forwarded_host(b"host=\xff"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        #[test]
        fn any_authority_is_parsed_or_refused(authority in "\\PC{0,64}") {
            match connect_target(&Method::CONNECT, Some(&authority)) {
                Ok(dst) => prop_assert!(authority.contains(&dst.port().to_string())),
                Err((status, ..)) => prop_assert_eq!(status, StatusCode::BAD_REQUEST),
            }
        }

        #[test]
        fn only_connect_is_served(method in "[A-Z]{1,10}") {
            let m = Method::from_bytes(method.as_bytes()).expect("token");
            let r = connect_target(&m, Some("10.0.0.1:80"));
            prop_assert_eq!(r.is_ok(), method == "CONNECT");
        }

    }
}
