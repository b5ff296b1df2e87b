//! The parts of an HBONE CONNECT's head ambit reads or writes, as pure functions (the
//! fuzzer drives them directly): the target a CONNECT asks for, and the W3C baggage that
//! describes the source workload.
//!
//! Everything here comes from, or goes to, the other end: parse as hostile, write so the
//! other end cannot be misled.

use std::net::SocketAddr;

use http::{HeaderValue, Method, StatusCode};

use crate::capture::addr;

/// Why a CONNECT's head is refused: status, reason (metrics, logs), detail.
pub type HeadRefusal = (StatusCode, &'static str, &'static str);

/// The target a CONNECT asks for, from its untrusted head: only CONNECT, and an `IP:port`
/// authority (canonical: v4-mapped v6 addresses as v4).
pub fn connect_target(method: &Method, authority: Option<&str>) -> Result<SocketAddr, HeadRefusal> {
    if method != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "not_connect", "only CONNECT is served"));
    }
    let dst = authority.and_then(|a| a.parse::<SocketAddr>().ok()).ok_or((
        StatusCode::BAD_REQUEST,
        "bad_authority",
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

/// The baggage keys ztunnel uses for the source workload.
pub const BAGGAGE_CLUSTER: &str = "k8s.cluster.name";
pub const BAGGAGE_NAMESPACE: &str = "k8s.namespace.name";
pub const BAGGAGE_POD: &str = "k8s.pod.name";
pub const BAGGAGE_APP: &str = "service.name";
pub const BAGGAGE_VERSION: &str = "service.version";

/// The source workload as the baggage describes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceBaggage<'a> {
    pub cluster: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    /// The canonical service.
    pub service: &'a str,
    /// The canonical revision.
    pub version: &'a str,
}

impl<'a> SourceBaggage<'a> {
    /// The members, in ztunnel's order; empty values are left out, as ztunnel does.
    pub fn members(&self) -> impl Iterator<Item = (&'static str, &'a str)> {
        [
            (BAGGAGE_CLUSTER, self.cluster),
            (BAGGAGE_NAMESPACE, self.namespace),
            (BAGGAGE_POD, self.pod),
            (BAGGAGE_APP, self.service),
            (BAGGAGE_VERSION, self.version),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
    }
}

/// Whether a byte may stand unencoded in a W3C baggage value (`baggage-octet`); `%` is left
/// out too, as it starts an escape.
fn plain(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x24 | 0x26..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

/// `v` percent-encoded where W3C baggage needs it: a value can never add members (`,`),
/// properties (`;`) or keys (`=` is left as is: only the first one splits a member).
fn encode(v: &str, out: &mut String) {
    for b in v.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// W3C baggage describing the source workload, with the keys ztunnel uses. Values are
/// percent-encoded, so any name or label round-trips. `None` only if the header would be
/// invalid, which encoding rules out.
pub fn baggage(source: &SourceBaggage<'_>) -> Option<HeaderValue> {
    let mut text = String::with_capacity(128);
    for (i, (k, v)) in source.members().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(k);
        text.push('=');
        encode(v, &mut text);
    }
    HeaderValue::try_from(text).ok()
}

/// The members of a baggage header (`key=value` pairs, values percent-decoded, properties
/// dropped). Members that are not `key=value` are skipped; an escape that does not decode
/// to UTF-8 is kept as written. At most `max` members are returned.
pub fn parse_baggage(value: &[u8], max: usize) -> Vec<(String, String)> {
    let Ok(text) = std::str::from_utf8(value) else { return Vec::new() };
    text.split(',')
        .filter_map(|member| {
            let kv = member.split(';').next()?.trim();
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            if k.is_empty() {
                return None;
            }
            Some((k.to_string(), decode(v.trim())))
        })
        .take(max)
        .collect()
}

fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| v.to_string())
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

    #[test]
    fn baggage_names_the_pod_with_ztunnel_s_keys() {
        let source = SourceBaggage {
            cluster: "Kubernetes",
            namespace: "demo",
            pod: "a-5f7",
            service: "shop",
            version: "v1",
        };
        let b = baggage(&source).expect("valid");
        assert_eq!(
            b,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.pod.name=a-5f7,service.name=shop,service.version=v1"
        );
        // Empty values are left out, as ztunnel does.
        let b = baggage(&SourceBaggage { version: "", cluster: "", ..source }).expect("valid");
        assert_eq!(b, "k8s.namespace.name=demo,k8s.pod.name=a-5f7,service.name=shop");
        // A value cannot smuggle in a member, a property or a line.
        let hostile = SourceBaggage { pod: "a\nb", service: "x,k8s.namespace.name=evil;p", ..source };
        let b = baggage(&hostile).expect("encoded");
        assert_eq!(
            b,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.pod.name=a%0Ab,service.name=x%2Ck8s.namespace.name=evil%3Bp,service.version=v1"
        );
        let parsed = parse_baggage(b.as_bytes(), 8);
        assert_eq!(parsed.len(), 5);
        assert_eq!(parsed[3], (BAGGAGE_APP.to_string(), "x,k8s.namespace.name=evil;p".to_string()));
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

        #[test]
        fn any_workload_round_trips_through_baggage(
            cluster in ".{0,10}", ns in "\\PC{0,20}", pod in ".{0,20}", app in ".{0,20}", version in ".{0,10}"
        ) {
            let source = SourceBaggage { cluster: &cluster, namespace: &ns, pod: &pod, service: &app, version: &version };
            let b = baggage(&source).expect("always a valid header");
            let got = parse_baggage(b.as_bytes(), 8);
            let want: Vec<(String, String)> = source.members().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            prop_assert_eq!(got, want);
        }
    }
}
