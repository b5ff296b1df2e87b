//! Error reports that keep their cause: a gRPC status or a transport error often says only
//! "transport error" at the top, with the reason (refused, DNS, certificate) in its sources.
//! And [`Invalid`], a field of a received resource that cannot be taken as sent.

use std::{error::Error, fmt};

/// `e` and every error it was caused by, joined with `: `; a source that repeats its
/// wrapper's text (common with wrapped I/O errors) is written once.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    with_sources(e.to_string(), e)
}

/// `top` (what to say of `e` itself) followed by `e`'s sources, as [`chain`] writes them.
pub fn with_sources(top: String, e: &(dyn Error + 'static)) -> String {
    let mut out = top;
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// A gRPC status as one line: its code and message, then the transport's reasons (tonic's
/// own Display also prints details and metadata, noise in a log).
pub fn status(s: &tonic::Status) -> String {
    with_sources(format!("{:?}: {}", s.code(), s.message()), s)
}

/// A field of a resource that cannot be taken as sent. Its text becomes an xDS NACK's
/// detail, read by whoever operates the control plane: it names the field by its path in the
/// resource (`rules[0].clauses[0].matches[0].source_ips[0]`) so they can find it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    pub field: String,
    pub problem: Problem,
}

/// What is wrong with an [`Invalid`] field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// An address of neither 4 nor 16 bytes.
    IpLength(usize),
    PrefixLength {
        len: u32,
        max: u32,
    },
    NotAPort(u32),
    /// An enum value this build does not know (a newer control plane's, or garbage).
    UnknownEnum(i32),
    /// Empty, or with a `/` or whitespace: it could not be part of a key or an identity.
    NotAName(String),
    /// A key of a workload's `services` map that is not `<namespace>/<hostname>`.
    NotAServiceKey(String),
    /// Not a DNS name: labels of letters, digits, `-` and `_`, up to 63 bytes each, 253 in all.
    NotAHostname(String),
    /// A string match with none of exact, prefix, suffix or presence.
    NoMatchType,
    /// A service-account match without both its namespace and its name.
    ServiceAccountIncomplete,
    /// Empty where the resource (`of`) needs it.
    Missing {
        of: &'static str,
    },
    /// A oneof with nothing set.
    Unset {
        expected: &'static str,
    },
    /// The resource is served under one name and names itself another: indexed under either,
    /// it would shadow or be shadowed.
    NameMismatch {
        served: String,
        own: String,
    },
}

impl Problem {
    /// This problem, found in `field`.
    pub fn at(self, field: impl Into<String>) -> Invalid {
        Invalid { field: field.into(), problem: self }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = &self.field;
        // Mostly the field first, then what is wrong; a few read better (and are known to
        // control-plane operators) with the field inside the sentence.
        match &self.problem {
            Problem::IpLength(n) => write!(f, "{field} has {n} bytes (an IP address has 4 or 16)"),
            Problem::PrefixLength { len, max } => {
                write!(f, "{field} has prefix length {len} (at most {max})")
            }
            Problem::NotAPort(p) => write!(f, "{field} = {p} is not a port"),
            Problem::UnknownEnum(n) => write!(f, "unknown {field} {n}"),
            Problem::NotAName(s) => write!(f, "{field} {s:?} is empty or not a name"),
            Problem::NotAServiceKey(k) => write!(f, "{field} key {k:?} is not <namespace>/<hostname>"),
            Problem::NotAHostname(h) => write!(f, "{field} {h:?} is not a DNS name"),
            Problem::NoMatchType => write!(f, "{field} sets no match (exact, prefix, suffix or presence)"),
            Problem::ServiceAccountIncomplete => write!(f, "{field} needs both namespace and serviceAccount"),
            Problem::Missing { of } => write!(f, "{of} without a {field}"),
            Problem::Unset { expected } => write!(f, "{field} is not set (expected {expected})"),
            Problem::NameMismatch { served, own } => {
                write!(f, "served as {served:?} but names itself {own:?} (its {field})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connecting to istiod")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_causes_are_kept_in_order() {
        let e = Outer(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"));
        assert_eq!(chain(&e), "connecting to istiod: connection refused");
    }

    #[test]
    fn an_invalid_field_is_named_where_the_sentence_wants_it() {
        let cases = [
            (Problem::IpLength(5).at("addresses[0]"), "addresses[0] has 5 bytes (an IP address has 4 or 16)"),
            (Problem::UnknownEnum(7).at("scope"), "unknown scope 7"),
            (Problem::Missing { of: "policy" }.at("name"), "policy without a name"),
            (
                Problem::NameMismatch { served: "a".into(), own: "b".into() }.at("uid"),
                "served as \"a\" but names itself \"b\" (its uid)",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }
}
