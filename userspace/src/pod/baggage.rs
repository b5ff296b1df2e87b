//! The W3C baggage that describes a pod on the wire, as ztunnel writes and reads it: written
//! once per pod (its [`super::PodCtx`] carries it), read from peers' tunnels as hostile input.

use http::HeaderValue;

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
