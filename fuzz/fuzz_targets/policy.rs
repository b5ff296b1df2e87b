//! Authorization policies as xDS delivers them: `istio.security.Authorization` bytes
//! compiled (or refused), then evaluated against connections built from the input. The
//! decision is deterministic and keeps Istio's semantics: an enforced DENY that matches
//! always denies; when enforced ALLOW policies apply, a connection is allowed only if one
//! of them matches; with none (and no matching DENY) it is allowed; dry-run policies never
//! change the enforced decision.
//!
//! Input: records (`ambit_fuzz::Records`): even op adds a policy, odd op
//! evaluates a connection (peer identity from a small alphabet, source and destination
//! address, port).
#![no_main]

use std::{net::IpAddr, sync::Arc};

use ambit::{
    authz::{self, Action, Conn, Denial, Peer, Policy},
    identity::Identity,
    pb::istio::security::Authorization,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const NAMES: [&str; 4] = ["default", "demo", "client", "istio-system"];

fn conn_parts(b: &[u8]) -> Option<(Option<Peer>, IpAddr, IpAddr, u16)> {
    if b.len() < 12 {
        return None;
    }
    let peer = (b[0] & 1 == 1).then(|| {
        let td = if b[0] & 2 == 0 { "cluster.local" } else { "other.domain" };
        Peer::new(Identity::new(td, NAMES[usize::from(b[1]) % 4], NAMES[usize::from(b[2]) % 4]))
    });
    let ip = |o: &[u8]| IpAddr::from([o[0], o[1], o[2], o[3]]);
    Some((peer, ip(&b[3..7]), ip(&b[7..11]), u16::from(b[11]) * 257))
}

fn check(policies: &[Arc<Policy>], c: &Conn<'_>) {
    let d = authz::evaluate(policies, c);
    assert_eq!(d, authz::evaluate(policies, c), "not deterministic");
    let enforced = || policies.iter().filter(|p| !p.dry_run);
    let deny = enforced().any(|p| p.action == Action::Deny && p.matches(c));
    let allows: Vec<&Arc<Policy>> = enforced().filter(|p| p.action == Action::Allow).collect();
    match &d.denied {
        Some(Denial::Denied { policy }) => {
            assert!(deny, "denied by {policy}, but no enforced DENY matches");
        }
        Some(Denial::NotAllowed { .. }) => {
            assert!(!deny && !allows.is_empty() && !allows.iter().any(|p| p.matches(c)), "{d:?}");
        }
        None => assert!(!deny && (allows.is_empty() || allows.iter().any(|p| p.matches(c))), "{d:?}"),
    }
    // Dry-run policies only ever add a report, never change the outcome.
    let enforced_only: Vec<Arc<Policy>> = enforced().cloned().collect();
    assert_eq!(authz::evaluate(&enforced_only, c).denied, d.denied, "a dry-run policy changed the decision");
}

fuzz_target!(|data: &[u8]| {
    let mut policies: Vec<Arc<Policy>> = Vec::new();
    for (op, chunk) in ambit_fuzz::Records::new(data) {
        if op % 2 == 0 {
            let Ok(a) = Authorization::decode(chunk) else { continue };
            if let Ok(p) = authz::compile(&a) {
                assert_eq!(p.key, format!("{}/{}", a.namespace, a.name));
                policies.push(Arc::new(p));
            }
        } else if let Some((peer, src_ip, dst_ip, dst_port)) = conn_parts(chunk) {
            check(&policies, &Conn { src: peer.as_ref(), src_ip, dst_ip, dst_port });
        }
    }
});
