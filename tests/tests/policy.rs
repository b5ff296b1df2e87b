//! L4 authorization and STRICT mTLS, enforced by the destination's node proxy: Istio
//! AuthorizationPolicy and PeerAuthentication resources in the control plane's mesh file,
//! real connections from pods of different identities and namespaces, and from a pod outside
//! the mesh (plaintext).

mod common;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use ambit_testbed::{
    ambit::write_mesh,
    apps::http_server_on,
    controlplane::ControlPlane,
    mesh::{Mesh, AMBIENT},
    Ambit, Bed, Chat, Node, Pod, Proc,
};
use common::*;

const TWO_SECONDS: Duration = Duration::from_secs(2);

/// n1: `a` (demo, sa client), `d` (demo, sa admin), `c` (other, sa client), `x` (plain: not in
/// the mesh). n2: `b` (demo, sa server, app=web) serving 8080 and 9090, `e` (demo, sa db,
/// app=db) serving 8080. A control plane linked to both nodes.
struct Cluster<'b> {
    n1: Node,
    n2: Node,
    cp: Node,
    a: Pod,
    d: Pod,
    c: Pod,
    x: Pod,
    b: Pod,
    e: Pod,
    mesh: PathBuf,
    _servers: Vec<Proc<'b>>,
}

fn cluster(bed: &Bed) -> Cluster<'_> {
    let (n1, n2, cp) = (bed.node("n1"), bed.node("n2"), bed.node("cp"));
    bed.link(&n1, &n2);
    bed.link(&cp, &n1);
    bed.link(&cp, &n2);
    let (a, d, c, x) = (bed.pod(&n1, "a"), bed.pod(&n1, "d"), bed.pod(&n1, "c"), bed.pod(&n1, "x"));
    let (b, e) = (bed.pod(&n2, "b"), bed.pod(&n2, "e"));
    let servers = vec![
        http_server_on(bed, &b, 8080, "b\n"),
        http_server_on(bed, &b, 9090, "b\n"),
        http_server_on(bed, &e, 8080, "e\n"),
    ];
    let mesh = bed.dir().join("mesh.yaml");
    Cluster { n1, n2, cp, a, d, c, x, b, e, mesh, _servers: servers }
}

impl Cluster<'_> {
    fn mesh(&self, policies: &str) -> Mesh {
        Mesh::default()
            .namespace("demo", &[AMBIENT])
            .namespace("other", &[AMBIENT])
            .namespace("plain", &[])
            .pod_with_sa(&self.a, "demo", &[], "client")
            .pod_with_sa(&self.d, "demo", &[], "admin")
            .pod_with_sa(&self.c, "other", &[], "client")
            .pod(&self.x, "plain", &[])
            .pod_with_sa(&self.b, "demo", &[("app", "web")], "server")
            .pod_with_sa(&self.e, "demo", &[("app", "db")], "db")
            .policies(policies)
    }

    fn pod(&self, name: &str) -> &Pod {
        match name {
            "a" => &self.a,
            "d" => &self.d,
            "c" => &self.c,
            "x" => &self.x,
            "b" => &self.b,
            "e" => &self.e,
            other => panic!("no pod {other}"),
        }
    }
}

/// Whether a request from `src` to `url` is answered.
fn reaches(src: &Pod, url: &str) -> bool {
    curl(src, url).status.success()
}

/// The policy keys the destination proxy holds.
fn held(p: &Ambit) -> BTreeSet<String> {
    p.config_dump()["mesh"]["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["key"].as_str().map(String::from))
        .collect()
}

/// One AuthorizationPolicy item for the `policies:` section.
fn ap(name: &str, namespace: &str, spec: &str) -> String {
    let mut s = format!("  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata:\n      name: {name}\n      namespace: {namespace}\n");
    if name.contains("dry-run") {
        s.push_str("      annotations:\n        istio.io/dry-run: \"true\"\n");
    }
    s.push_str("    spec:\n");
    for line in spec.lines() {
        s.push_str(&format!("      {line}\n"));
    }
    s
}

const WEB: &str = "selector:\n  matchLabels:\n    app: web\n";

/// A case: its policies (name, namespace, spec), and connections with the expected outcome:
/// (source pod, destination pod, destination port, IPv6?, allowed?).
struct Case {
    name: &'static str,
    policies: Vec<(&'static str, &'static str, String)>,
    checks: Vec<(&'static str, &'static str, u16, bool, bool)>,
}

fn cases(c: &Cluster<'_>) -> Vec<Case> {
    let rule = |body: &str| format!("{WEB}rules:\n  - {body}\n");
    let a4 = c.a.ipv4.to_string();
    let b4 = c.b.ipv4.to_string();
    let x4 = c.x.ipv4.to_string();
    vec![
        Case { name: "no policy: everything is allowed", policies: vec![], checks: vec![("a", "b", 8080, false, true), ("c", "b", 8080, false, true), ("x", "b", 8080, false, true)] },
        Case { name: "ALLOW principals", policies: vec![("allow", "demo", rule("from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]"))], checks: vec![("a", "b", 8080, false, true), ("d", "b", 8080, false, false), ("d", "e", 8080, false, true)] },
        Case { name: "ALLOW notPrincipals", policies: vec![("allow", "demo", rule("from: [{source: {notPrincipals: [cluster.local/ns/demo/sa/client]}}]"))], checks: vec![("a", "b", 8080, false, false), ("d", "b", 8080, false, true)] },
        Case { name: "ALLOW namespaces", policies: vec![("allow", "demo", rule("from: [{source: {namespaces: [other]}}]"))], checks: vec![("c", "b", 8080, false, true), ("a", "b", 8080, false, false)] },
        Case { name: "ALLOW notNamespaces", policies: vec![("allow", "demo", rule("from: [{source: {notNamespaces: [demo]}}]"))], checks: vec![("a", "b", 8080, false, false), ("c", "b", 8080, false, true)] },
        Case { name: "ALLOW serviceAccounts", policies: vec![("allow", "demo", rule("from: [{source: {serviceAccounts: [demo/admin]}}]"))], checks: vec![("d", "b", 8080, false, true), ("a", "b", 8080, false, false)] },
        Case { name: "ALLOW notServiceAccounts", policies: vec![("allow", "demo", rule("from: [{source: {notServiceAccounts: [demo/admin]}}]"))], checks: vec![("d", "b", 8080, false, false), ("a", "b", 8080, false, true)] },
        Case { name: "ALLOW ipBlocks", policies: vec![("allow", "demo", rule(&format!("from: [{{source: {{ipBlocks: [{a4}/32]}}}}]")))], checks: vec![("a", "b", 8080, false, true), ("d", "b", 8080, false, false)] },
        Case { name: "ALLOW notIpBlocks", policies: vec![("allow", "demo", rule(&format!("from: [{{source: {{notIpBlocks: [{a4}]}}}}]")))], checks: vec![("a", "b", 8080, false, false), ("d", "b", 8080, false, true)] },
        Case { name: "ALLOW ports", policies: vec![("allow", "demo", rule("to: [{operation: {ports: [\"8080\"]}}]"))], checks: vec![("a", "b", 8080, false, true), ("a", "b", 9090, false, false)] },
        Case { name: "ALLOW notPorts", policies: vec![("allow", "demo", rule("to: [{operation: {notPorts: [\"8080\"]}}]"))], checks: vec![("a", "b", 8080, false, false), ("a", "b", 9090, false, true)] },
        Case { name: "when destination.ip", policies: vec![("allow", "demo", rule(&format!("when: [{{key: destination.ip, values: [{b4}]}}]")))], checks: vec![("a", "b", 8080, false, true), ("a", "b", 8080, true, false)] },
        Case { name: "when source.namespace notValues", policies: vec![("allow", "demo", rule("when: [{key: source.namespace, notValues: [other]}]"))], checks: vec![("a", "b", 8080, false, true), ("c", "b", 8080, false, false)] },
        Case { name: "when source.principal (suffix)", policies: vec![("allow", "demo", rule("when: [{key: source.principal, values: [\"*/sa/admin\"]}]"))], checks: vec![("d", "b", 8080, false, true), ("a", "b", 8080, false, false)] },
        Case { name: "DENY principals", policies: vec![("deny", "demo", format!("{WEB}action: DENY\nrules:\n  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]\n"))], checks: vec![("a", "b", 8080, false, false), ("d", "b", 8080, false, true)] },
        Case {
            name: "DENY over ALLOW",
            policies: vec![
                ("allow", "demo", rule("from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]")),
                ("deny", "demo", format!("{WEB}action: DENY\nrules:\n  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]\n")),
            ],
            checks: vec![("a", "b", 8080, false, false), ("d", "b", 8080, false, false)],
        },
        Case { name: "namespace scope", policies: vec![("allow", "demo", "rules:\n  - from: [{source: {principals: [cluster.local/ns/demo/sa/admin]}}]\n".into())], checks: vec![("a", "b", 8080, false, false), ("a", "e", 8080, false, false), ("d", "e", 8080, false, true), ("c", "e", 8080, false, false)] },
        Case { name: "workload scope", policies: vec![("deny", "demo", "selector: {matchLabels: {app: db}}\naction: DENY\nrules:\n  - from: [{source: {namespaces: [other]}}]\n".into())], checks: vec![("c", "e", 8080, false, false), ("c", "b", 8080, false, true)] },
        Case { name: "global scope (root namespace)", policies: vec![("deny", "istio-system", "action: DENY\nrules:\n  - from: [{source: {principals: [\"*/sa/admin\"]}}]\n".into())], checks: vec![("d", "b", 8080, false, false), ("d", "e", 8080, false, false), ("a", "b", 8080, false, true)] },
        Case { name: "dry run reports, denies nothing", policies: vec![("dry-run", "demo", format!("{WEB}action: DENY\nrules:\n  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]\n"))], checks: vec![("a", "b", 8080, false, true)] },
        Case { name: "ALLOW without rules allows nothing", policies: vec![("allow", "demo", WEB.into())], checks: vec![("a", "b", 8080, false, false), ("x", "b", 8080, false, false), ("a", "e", 8080, false, true)] },
        Case { name: "ALLOW with an empty rule allows everything", policies: vec![("allow", "demo", format!("{WEB}rules:\n  - {{}}\n"))], checks: vec![("a", "b", 8080, false, true), ("x", "b", 8080, false, true)] },
        Case { name: "principals \"*\": any authenticated client", policies: vec![("allow", "demo", rule("from: [{source: {principals: [\"*\"]}}]"))], checks: vec![("c", "b", 8080, false, true), ("x", "b", 8080, false, false)] },
        Case { name: "plaintext client allowed by address", policies: vec![("allow", "demo", rule(&format!("from: [{{source: {{ipBlocks: [{x4}]}}}}]")))], checks: vec![("x", "b", 8080, false, true), ("a", "b", 8080, false, false)] },
    ]
}

fn denial_lines(p: &Ambit, needles: &[&str]) -> usize {
    p.log().lines().filter(|l| l.contains(" access: ") && needles.iter().all(|n| l.contains(n))).count()
}

#[test]
fn authorization_policies_allow_and_deny_real_connections_as_istio_defines_them() {
    let bed = Bed::new("policy-table");
    let c = cluster(&bed);
    write_mesh(&c.mesh, &c.mesh("").yaml());
    let cp = ControlPlane::start(&bed, &c.cp, &c.mesh, &[&c.n1, &c.n2], &[]);
    let _p1 = cp.start_node(&c.n1, &c.mesh, &[]);
    let p2 = cp.start_node(&c.n2, &c.mesh, &[]);
    let all = cases(&c);
    assert!(all.len() >= 20, "{} cases", all.len());
    let mut failures = Vec::new();
    for (i, case) in all.iter().enumerate() {
        // Each case's policies carry its number, so the proxy's state says when it has them.
        let prefix = format!("c{i:02}-");
        let yaml: String =
            case.policies.iter().map(|(n, ns, spec)| ap(&format!("{prefix}{n}"), ns, spec)).collect();
        let expected: BTreeSet<String> =
            case.policies.iter().map(|(n, ns, _)| format!("{ns}/{prefix}{n}")).collect();
        write_mesh(&c.mesh, &c.mesh(&yaml).yaml());
        assert!(
            eventually(T, || held(&p2) == expected),
            "case {i} ({}): n2 holds {:?}",
            case.name,
            held(&p2)
        );
        for &(src, dst, port, v6, allow) in &case.checks {
            let dst_pod = c.pod(dst);
            let url = if v6 {
                format!("http://[{}]:{port}/", dst_pod.ipv6)
            } else {
                format!("http://{}:{port}/", dst_pod.ipv4)
            };
            let id = match src {
                "x" => "src_identity=-".to_string(),
                "c" => "src_identity=spiffe://cluster.local/ns/other/sa/".to_string(),
                _ => "src_identity=spiffe://cluster.local/ns/demo/sa/".to_string(),
            };
            let policy = format!("/{prefix}");
            let before = denial_lines(&p2, &["connection denied", &policy, &id]);
            let got = reaches(c.pod(src), &url);
            let what =
                format!("case {i} ({}): {src} -> {dst}:{port}{}", case.name, if v6 { " (IPv6)" } else { "" });
            if got != allow {
                failures.push(format!(
                    "{what}: expected {}, got {}",
                    if allow { "allow" } else { "deny" },
                    if got { "allow" } else { "deny" }
                ));
                continue;
            }
            if !allow {
                // Each denial is logged by the destination, with the policy and identities.
                let logged =
                    eventually(T, || denial_lines(&p2, &["connection denied", &policy, &id]) > before);
                if !logged {
                    failures.push(format!("{what}: denial not logged with its policy and {id}"));
                }
            }
        }
        if case.name.starts_with("dry run") {
            let needle = format!("policy=demo/{prefix}dry-run");
            assert!(
                eventually(T, || denial_lines(&p2, &["dry run: connection would be denied", &needle]) == 1),
                "{}",
                p2.log()
            );
        }
    }
    assert!(failures.is_empty(), "{} of the checks failed:\n{}", failures.len(), failures.join("\n"));
    // Counted too, by policy; dry runs apart.
    let scrape = p2.metrics();
    let count = |needle: &str| {
        scrape
            .lines()
            .filter(|l| l.starts_with("ambit_authorization_denials_total") && l.contains(needle))
            .count()
    };
    assert!(count(r#"policy="demo/c01-allow""#) >= 1, "{scrape}");
    assert!(count(r#"mode="dry_run""#) >= 1, "{scrape}");
}

#[test]
fn strict_mtls_refuses_plaintext_and_permissive_lets_it_in() {
    let bed = Bed::new("policy-strict");
    let c = cluster(&bed);
    let pa = |mode: &str| {
        format!("  - apiVersion: security.istio.io/v1\n    kind: PeerAuthentication\n    metadata: {{name: default, namespace: demo}}\n    spec:\n      mtls:\n        mode: {mode}\n")
    };
    write_mesh(&c.mesh, &c.mesh(&pa("STRICT")).yaml());
    let cp = ControlPlane::start(&bed, &c.cp, &c.mesh, &[&c.n1, &c.n2], &[]);
    let _p1 = cp.start_node(&c.n1, &c.mesh, &[]);
    let p2 = cp.start_node(&c.n2, &c.mesh, &[]);
    let url = format!("http://{}:8080/", c.b.ipv4);
    // STRICT: the pod outside the mesh is refused, the mesh client gets through.
    assert!(!reaches(&c.x, &url), "plaintext got through STRICT");
    assert!(reaches(&c.a, &url));
    assert!(
        eventually(T, || denial_lines(
            &p2,
            &[
                "connection denied",
                "policy=demo/peer_authentication_strict",
                "src_identity=-",
                "security=none"
            ]
        ) == 1),
        "{}",
        p2.log()
    );
    // PERMISSIVE: plaintext is accepted again.
    write_mesh(&c.mesh, &c.mesh(&pa("PERMISSIVE")).yaml());
    assert!(eventually(T, || reaches(&c.x, &url)), "PERMISSIVE still refuses plaintext:\n{}", p2.log());
    assert!(reaches(&c.a, &url));
}

#[test]
fn a_new_deny_closes_an_open_connection_within_two_seconds() {
    let bed = Bed::new("policy-recheck");
    let c = cluster(&bed);
    let mut echo = netprobe(&bed, &c.b, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    write_mesh(&c.mesh, &c.mesh("").yaml());
    let cp = ControlPlane::start(&bed, &c.cp, &c.mesh, &[&c.n1, &c.n2], &[]);
    let _p1 = cp.start_node(&c.n1, &c.mesh, &[]);
    let p2 = cp.start_node(&c.n2, &c.mesh, &[]);
    let echo_b = format!("{}:7000", c.b.ipv4);
    let mut a_chat = Chat::open(&bed, &c.a, &echo_b).expect("a's long-lived connection");
    let mut d_chat = Chat::open(&bed, &c.d, &echo_b).expect("d's long-lived connection");
    assert_eq!(a_chat.say("hello").expect("echo"), "hello");

    let deny = ap("deny-client", "demo", &format!("{WEB}action: DENY\nrules:\n  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]\n"));
    write_mesh(&c.mesh, &c.mesh(&deny).yaml());
    let t0 = Instant::now();
    let mut n = 0;
    let closed = eventually(TWO_SECONDS, || {
        n += 1;
        a_chat.say(&format!("ping {n}")).is_err()
    });
    let took = t0.elapsed();
    assert!(closed, "a's connection still open 2 s after the DENY:\n{}", p2.log());
    println!("open connection closed {took:?} after the policy was written");
    assert!(p2.log().contains("open connection closed: denied after a policy change"), "{}", p2.log());
    assert!(
        denial_lines(
            &p2,
            &[
                "open connection closed",
                "policy=demo/deny-client",
                "src_identity=spiffe://cluster.local/ns/demo/sa/client"
            ]
        ) == 1
    );
    // The admin's connection is not denied: untouched.
    assert_eq!(d_chat.say("still here").expect("d's connection survives"), "still here");
    // New connections of a are refused; removing the DENY lets them in again.
    assert!(!reaches(&c.a, &format!("http://{}:8080/", c.b.ipv4)));
    write_mesh(&c.mesh, &c.mesh("").yaml());
    assert!(eventually(TWO_SECONDS, || reaches(&c.a, &format!("http://{}:8080/", c.b.ipv4))), "{}", p2.log());
    let scrape = p2.metrics();
    assert!(
        scrape
            .lines()
            .any(|l| l.contains("ambit_authorization_denials_total") && l.contains(r#"when="open""#)),
        "{scrape}"
    );
}

#[test]
fn policies_in_the_node_s_own_mesh_file_are_enforced_without_a_control_plane() {
    let bed = Bed::new("policy-offline");
    let c = cluster(&bed);
    // Offline: no CA, so everything arrives in plaintext; a DENY by address still holds.
    let deny = ap(
        "deny-a",
        "demo",
        &format!("{WEB}action: DENY\nrules:\n  - from: [{{source: {{ipBlocks: [{}]}}}}]\n", c.a.ipv4),
    );
    let mesh = c.mesh(&deny);
    write_mesh(&c.mesh, &mesh.yaml());
    let _p1 = Ambit::start(&bed, &c.n1, &c.mesh, &[]);
    let p2 = Ambit::start(&bed, &c.n2, &c.mesh, &[]);
    let url = format!("http://{}:8080/", c.b.ipv4);
    assert!(!reaches(&c.a, &url));
    assert!(reaches(&c.d, &url));
    assert!(
        eventually(T, || denial_lines(&p2, &["connection denied", "policy=demo/deny-a"]) == 1),
        "{}",
        p2.log()
    );
}
