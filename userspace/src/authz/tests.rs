use std::sync::Arc;

use super::*;
use crate::pb::istio::security::{self as pb, string_match::MatchType, Address, StringMatch};

fn exact(s: &str) -> StringMatch {
    StringMatch { match_type: Some(MatchType::Exact(s.into())) }
}

fn presence() -> StringMatch {
    StringMatch { match_type: Some(MatchType::Presence(())) }
}

fn ip(s: &str, len: u32) -> Address {
    let a: IpAddr = s.parse().expect("ip");
    let address = match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    };
    Address { address, length: len }
}

fn policy(name: &str, action: pb::Action, scope: pb::Scope, matches: Vec<pb::Match>) -> Arc<Policy> {
    let p = pb::Authorization {
        name: name.into(),
        namespace: "demo".into(),
        scope: scope as i32,
        action: action as i32,
        rules: vec![pb::Rule { clauses: vec![pb::Clause { matches }] }],
        dry_run: false,
    };
    Arc::new(compile(&p).expect("valid"))
}

fn peer(ns: &str, sa: &str) -> Peer {
    Peer::new(Identity::new("cluster.local", ns, sa))
}

fn conn<'a>(src: Option<&'a Peer>, src_ip: &str, dst_port: u16) -> Conn<'a> {
    Conn { src, src_ip: src_ip.parse().expect("ip"), dst_ip: "10.2.0.2".parse().expect("ip"), dst_port }
}

const NS: pb::Scope = pb::Scope::Namespace;

#[test]
fn each_field_and_its_negation() {
    let client = peer("demo", "client");
    let other = peer("other", "client");
    let a = conn(Some(&client), "10.1.0.2", 8080);
    let b = conn(Some(&other), "10.1.0.9", 9090);
    let plain = conn(None, "10.1.0.7", 8080);
    let m = pb::Match::default;
    let cases: Vec<(&str, pb::Match, [bool; 3])> = vec![
        ("namespaces", pb::Match { namespaces: vec![exact("demo")], ..m() }, [true, false, false]),
        ("not_namespaces", pb::Match { not_namespaces: vec![exact("demo")], ..m() }, [false, true, true]),
        (
            "principals",
            pb::Match { principals: vec![exact("cluster.local/ns/other/sa/client")], ..m() },
            [false, true, false],
        ),
        (
            "not_principals presence",
            pb::Match { not_principals: vec![presence()], ..m() },
            [false, false, true],
        ),
        (
            "principals suffix",
            pb::Match {
                principals: vec![StringMatch { match_type: Some(MatchType::Suffix("/sa/client".into())) }],
                ..m()
            },
            [true, true, false],
        ),
        (
            "principals prefix",
            pb::Match {
                principals: vec![StringMatch {
                    match_type: Some(MatchType::Prefix("cluster.local/ns/demo/".into())),
                }],
                ..m()
            },
            [true, false, false],
        ),
        (
            "service_accounts",
            pb::Match {
                service_accounts: vec![pb::ServiceAccountMatch {
                    namespace: "other".into(),
                    service_account: "client".into(),
                }],
                ..m()
            },
            [false, true, false],
        ),
        (
            "not_service_accounts",
            pb::Match {
                not_service_accounts: vec![pb::ServiceAccountMatch {
                    namespace: "other".into(),
                    service_account: "client".into(),
                }],
                ..m()
            },
            [true, false, true],
        ),
        ("source_ips", pb::Match { source_ips: vec![ip("10.1.0.0", 29)], ..m() }, [true, false, true]),
        (
            "not_source_ips",
            pb::Match { not_source_ips: vec![ip("10.1.0.2", 32)], ..m() },
            [false, true, true],
        ),
        (
            "source_ips v4-mapped",
            pb::Match { source_ips: vec![ip("::ffff:10.1.0.9", 128)], ..m() },
            [false, true, false],
        ),
        (
            "destination_ips",
            pb::Match { destination_ips: vec![ip("10.2.0.2", 32)], ..m() },
            [true, true, true],
        ),
        (
            "not_destination_ips",
            pb::Match { not_destination_ips: vec![ip("10.2.0.0", 16)], ..m() },
            [false, false, false],
        ),
        ("destination_ports", pb::Match { destination_ports: vec![8080], ..m() }, [true, false, true]),
        (
            "not_destination_ports",
            pb::Match { not_destination_ports: vec![8080], ..m() },
            [false, true, false],
        ),
        (
            "two fields: both must hold",
            pb::Match { namespaces: vec![exact("demo")], destination_ports: vec![9090], ..m() },
            [false, false, false],
        ),
        ("empty match: everything", m(), [true, true, true]),
    ];
    for (what, matcher, expected) in cases {
        let p = policy("p", pb::Action::Allow, NS, vec![matcher]);
        let got = [a, b, plain].map(|c| p.matches(&c));
        assert_eq!(got, expected, "{what}");
    }
}

#[test]
fn deny_wins_then_allow_must_match() {
    let client = peer("demo", "client");
    let admin = peer("demo", "admin");
    let c = conn(Some(&client), "10.1.0.2", 8080);
    let d = conn(Some(&admin), "10.1.0.4", 8080);
    let allow_client = policy(
        "allow-client",
        pb::Action::Allow,
        NS,
        vec![pb::Match { principals: vec![exact("cluster.local/ns/demo/sa/client")], ..Default::default() }],
    );
    let deny_client = policy(
        "deny-client",
        pb::Action::Deny,
        NS,
        vec![pb::Match { principals: vec![exact("cluster.local/ns/demo/sa/client")], ..Default::default() }],
    );
    // No policy: allowed.
    assert!(evaluate(&[], &c).allowed());
    // An ALLOW applies: only what it matches.
    assert!(evaluate(std::slice::from_ref(&allow_client), &c).allowed());
    let denied = evaluate(std::slice::from_ref(&allow_client), &d).denied.expect("denied");
    assert_eq!(denied, Denial::NotAllowed { allow_policies: vec!["demo/allow-client".into()] });
    assert_eq!(denied.policy(), "demo/allow-client");
    // DENY over ALLOW.
    let denied = evaluate(&[allow_client.clone(), deny_client.clone()], &c).denied.expect("denied");
    assert_eq!(denied, Denial::Denied { policy: "demo/deny-client".into() });
    // A DENY alone leaves the rest allowed.
    assert!(evaluate(&[deny_client], &d).allowed());
}

#[test]
fn rules_and_clauses_combine_as_istio_does() {
    let client = peer("demo", "client");
    let c = conn(Some(&client), "10.1.0.2", 8080);
    let m = |port| pb::Match { destination_ports: vec![port], ..Default::default() };
    let mk = |rules: Vec<pb::Rule>| {
        compile(&pb::Authorization {
            name: "p".into(),
            namespace: "demo".into(),
            scope: NS as i32,
            action: pb::Action::Allow as i32,
            rules,
            dry_run: false,
        })
        .expect("valid")
    };
    // A clause matches when any of its matches does; a rule when all clauses do.
    let any = mk(vec![pb::Rule { clauses: vec![pb::Clause { matches: vec![m(1), m(8080)] }] }]);
    assert!(any.matches(&c));
    let all = mk(vec![pb::Rule {
        clauses: vec![pb::Clause { matches: vec![m(8080)] }, pb::Clause { matches: vec![m(1)] }],
    }]);
    assert!(!all.matches(&c));
    // A policy matches when any rule does; no rules: nothing; an empty rule: everything.
    let two = mk(vec![
        pb::Rule { clauses: vec![pb::Clause { matches: vec![m(1)] }] },
        pb::Rule { clauses: vec![pb::Clause { matches: vec![m(8080)] }] },
    ]);
    assert!(two.matches(&c));
    assert!(!mk(vec![]).matches(&c), "ALLOW without rules allows nothing");
    assert!(mk(vec![pb::Rule::default()]).matches(&c), "an empty rule matches everything");
}

#[test]
fn scopes_decide_which_workloads_a_policy_applies_to() {
    let g = policy("g", pb::Action::Deny, pb::Scope::Global, vec![]);
    let n = policy("n", pb::Action::Deny, NS, vec![]);
    let w = policy("w", pb::Action::Deny, pb::Scope::WorkloadSelector, vec![]);
    let selected = vec!["demo/w".to_string()];
    assert!(g.applies_to("other", &[]));
    assert!(n.applies_to("demo", &[]) && !n.applies_to("other", &[]));
    assert!(w.applies_to("demo", &selected) && !w.applies_to("demo", &[]));
}

#[test]
fn dry_run_policies_are_reported_not_enforced() {
    let client = peer("demo", "client");
    let c = conn(Some(&client), "10.1.0.2", 8080);
    let mut deny = (*policy("shadow", pb::Action::Deny, NS, vec![pb::Match::default()])).clone();
    deny.dry_run = true;
    let d = evaluate(&[Arc::new(deny)], &c);
    assert!(d.allowed());
    assert_eq!(d.dry_run_denied, Some(Denial::Denied { policy: "demo/shadow".into() }));
}

#[test]
fn invalid_policies_are_refused_naming_the_field() {
    let base = pb::Authorization { name: "p".into(), namespace: "demo".into(), ..Default::default() };
    let with = |m: pb::Match| pb::Authorization {
        rules: vec![pb::Rule { clauses: vec![pb::Clause { matches: vec![m] }] }],
        ..base.clone()
    };
    let cases = [
        (pb::Authorization { name: String::new(), ..base.clone() }, "policy without a name"),
        (pb::Authorization { scope: 7, ..base.clone() }, "unknown scope 7"),
        (pb::Authorization { action: 3, ..base.clone() }, "unknown action 3"),
        (
            pb::Authorization { namespace: String::new(), scope: NS as i32, ..base.clone() },
            "without a namespace",
        ),
        (
            with(pb::Match {
                source_ips: vec![Address { address: vec![1, 2, 3, 4, 5], length: 32 }],
                ..Default::default()
            }),
            "rules[0].clauses[0].matches[0].source_ips[0] has 5 bytes",
        ),
        (
            with(pb::Match { not_destination_ips: vec![ip("10.0.0.0", 33)], ..Default::default() }),
            "not_destination_ips[0] has prefix length 33 (at most 32)",
        ),
        (
            with(pb::Match { destination_ports: vec![70000], ..Default::default() }),
            "destination_ports[0] = 70000 is not a port",
        ),
        (
            with(pb::Match { principals: vec![StringMatch { match_type: None }], ..Default::default() }),
            "principals[0] sets no match",
        ),
    ];
    for (p, expected) in cases {
        let err = compile(&p).expect_err(expected).to_string();
        assert!(err.contains(expected), "{err:?} does not contain {expected:?}");
    }
}

#[test]
fn cidrs_match_by_prefix_and_family() {
    let block = |s: &str, len| Cidr { addr: s.parse().expect("ip"), len };
    assert!(block("10.0.0.0", 8).contains("10.200.1.1".parse().expect("ip")));
    assert!(!block("10.0.0.0", 8).contains("11.0.0.1".parse().expect("ip")));
    assert!(block("0.0.0.0", 0).contains("1.2.3.4".parse().expect("ip")));
    assert!(!block("0.0.0.0", 0).contains("::1".parse().expect("ip")), "families never mix");
    assert!(block("fd00::", 16).contains("fd00:1::2".parse().expect("ip")));
    assert!(block("fd00:1::2", 128).contains("fd00:1::2".parse().expect("ip")));
}
