//! Cost of one authorization decision: a connection evaluated against 100 policies that all
//! apply to its destination (the worst case: global and namespace scope), most of them
//! ALLOWs that do not match, so every rule is looked at. `cargo bench -p ambit --bench authz`.

use std::{hint::black_box, sync::Arc};

use ambit::{
    authz::{compile, evaluate, Conn, Peer, Policy},
    identity::Identity,
    pb::istio::security::{
        string_match::MatchType, Action, Address, Authorization, Clause, Match, Rule, Scope, StringMatch,
    },
};
use criterion::{criterion_group, criterion_main, Criterion};

fn exact(s: &str) -> StringMatch {
    StringMatch { match_type: Some(MatchType::Exact(s.into())) }
}

/// Policy `i`: two rules (from a principal + a namespace, to two ports; and an address block
/// with a `not_` port), DENY for every tenth, ALLOW otherwise; none matches the benchmark's
/// connection, so evaluation walks all of them.
fn policy(i: usize) -> Arc<Policy> {
    let from = Clause {
        matches: vec![
            Match {
                principals: vec![exact(&format!("cluster.local/ns/team-{i}/sa/client"))],
                ..Default::default()
            },
            Match { namespaces: vec![exact(&format!("team-{i}"))], ..Default::default() },
        ],
    };
    let to = Clause {
        matches: vec![Match { destination_ports: vec![8000 + i as u32, 9000], ..Default::default() }],
    };
    let block = Clause {
        matches: vec![Match {
            source_ips: vec![Address { address: vec![172, 16, (i % 256) as u8, 0], length: 24 }],
            not_destination_ports: vec![22],
            ..Default::default()
        }],
    };
    let p = Authorization {
        name: format!("policy-{i}"),
        namespace: "demo".into(),
        scope: if i % 2 == 0 { Scope::Global } else { Scope::Namespace } as i32,
        action: if i % 10 == 0 { Action::Deny } else { Action::Allow } as i32,
        rules: vec![Rule { clauses: vec![from, to] }, Rule { clauses: vec![block] }],
        dry_run: false,
    };
    Arc::new(compile(&p).expect("valid policy"))
}

fn bench(c: &mut Criterion) {
    let policies: Vec<Arc<Policy>> = (0..100).map(policy).collect();
    let peer = Peer::new(Identity::new("cluster.local", "demo", "client"));
    let conn = Conn {
        src: Some(&peer),
        src_ip: "10.1.0.2".parse().expect("ip"),
        dst_ip: "10.2.0.2".parse().expect("ip"),
        dst_port: 8080,
    };
    assert!(!evaluate(&policies, &conn).allowed(), "no ALLOW matches: every policy is evaluated");
    c.bench_function("evaluate: 1 connection x 100 policies (none matching)", |b| {
        b.iter(|| evaluate(black_box(&policies), black_box(&conn)))
    });
    // The common case: an ALLOW among them matches early.
    let mut first_allows = policies.clone();
    let allow_all = Authorization {
        name: "allow-all".into(),
        namespace: "demo".into(),
        scope: Scope::Namespace as i32,
        action: Action::Allow as i32,
        rules: vec![Rule::default()],
        dry_run: false,
    };
    first_allows.insert(0, Arc::new(compile(&allow_all).expect("valid")));
    c.bench_function("evaluate: 1 connection x 101 policies (an ALLOW matches)", |b| {
        b.iter(|| evaluate(black_box(&first_allows), black_box(&conn)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
