//! HBONE CONNECT heads as a peer sends them: method and `:authority` (through the same
//! `http` types h2 hands the server) give a target or a refusal, and a target is exactly the
//! authority's address (canonical) and port; `forwarded` and anything else in the head
//! change nothing. The baggage the proxy writes round-trips any workload names, and no name
//! adds a member; baggage read from a peer never yields more members than asked for.
//!
//! Input: fields separated by 0xff: method, authority, forwarded, then five names (cluster,
//! namespace, pod, app, version) for the baggage writer; the whole input is also read as a
//! peer's baggage, and as a `forwarded` header whose `host=` is a plain name or nothing.
#![no_main]

use std::net::SocketAddr;

use ambit::{
    pod::baggage::{self, SourceBaggage},
    proxy::hbone::head,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut f = data.split(|b| *b == 0xff);
    let mut next = || f.next().unwrap_or_default();
    let (method, authority, forwarded) = (next(), next(), next());
    let (cluster, ns, pod, app, version) = (next(), next(), next(), next(), next());
    if let Ok(method) = http::Method::from_bytes(method) {
        // The request as h2 would hand it over: `:authority` must be a valid URI authority.
        let mut req = http::Request::builder().method(method.clone());
        if let Ok(a) = std::str::from_utf8(authority) {
            req = req.uri(a);
        }
        if let Ok(v) = http::HeaderValue::from_bytes(forwarded) {
            req = req.header("forwarded", v);
        }
        if let Ok(req) = req.body(()) {
            let authority = req.uri().authority().map(http::uri::Authority::as_str);
            let got = head::connect_target(req.method(), authority);
            let without_forwarded = head::connect_target(&method, authority);
            assert_eq!(got, without_forwarded);
            if let Ok(dst) = got {
                assert_eq!(method, http::Method::CONNECT);
                let parsed: SocketAddr =
                    authority.expect("a target has an authority").parse().expect("parses");
                assert_eq!(dst.port(), parsed.port());
                assert_eq!(dst.ip(), ambit::capture::addr::canonical(parsed.ip()));
            }
        }
    }
    let [cluster, ns, pod, app, version] = [cluster, ns, pod, app, version].map(String::from_utf8_lossy);
    let source =
        SourceBaggage { cluster: &cluster, namespace: &ns, pod: &pod, service: &app, version: &version };
    let written = baggage::baggage(&source).expect("baggage is always a valid header");
    let read = baggage::parse_baggage(written.as_bytes(), 8);
    let want: Vec<(&str, &str)> = source.members().collect();
    assert_eq!(read.len(), want.len(), "{written:?}");
    for ((k, v), (wk, wv)) in read.iter().zip(want) {
        assert_eq!((k.as_str(), v.as_str()), (wk, wv));
    }
    if let Some(host) = head::forwarded_host(data) {
        assert!(!host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    }
    assert!(baggage::parse_baggage(data, 4).len() <= 4);
});
