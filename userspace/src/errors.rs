//! Error reports that keep their cause: a gRPC status or a transport error often says only
//! "transport error" at the top, with the reason (refused, DNS, certificate) in its sources.

use std::error::Error;

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
}
