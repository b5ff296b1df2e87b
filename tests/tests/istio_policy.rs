//! Istio's AuthorizationPolicy and PeerAuthentication, applied with kubectl to the real API
//! server, converted and served by the real istiod, enforced by ambit at the destination.

mod common;

use std::time::Duration;

use ambit_testbed::{
    apps::{http_server, http_server_on},
    istio::{self, workload, Spec},
    istiod::Istiod,
    realkube::Kube,
    Bed, Chat,
};
use common::{istio::*, *};

const POLICY_TIME: Duration = Duration::from_secs(15);

fn policy(name: &str, action: &str, from: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: {action}\n  rules:\n  - {from}\n"
    )
}

fn peer_authentication(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: demo\nspec:\n  mtls:\n    mode: {mode}\n"
    )
}

/// A case: its name, the objects applied, and (client, port, allowed?) checks.
type Case<'p> = (&'static str, Vec<String>, Vec<(&'p ambit_testbed::Pod, u16, bool)>);

#[test]
fn authorization_and_peer_authentication_from_kubectl_are_enforced() {
    let bed = Bed::new("istio-policy");
    let (n1, n2, cp) = nodes(&bed);
    let kube = Kube::start(&bed, &cp);
    setup(&kube, &n1, &n2);
    let istiod = Istiod::start(&kube, &istio::trusted_account());
    istio::namespace(&kube, "demo", &[("istio.io/dataplane-mode", "ambient")]).expect("demo");
    istio::namespace(&kube, "plain", &[]).expect("plain");
    let (a, d, x) = (bed.pod(&n1, "a"), bed.pod(&n1, "d"), bed.pod(&n1, "x"));
    let b = bed.pod(&n2, "b");
    let _w = [
        workload(&bed, &kube, &n1, &a, &spec("client", &[])).expect("a"),
        workload(&bed, &kube, &n1, &d, &spec("admin", &[])).expect("d"),
        workload(&bed, &kube, &n2, &b, &spec("server", &[("app", "web")])).expect("b"),
        workload(&bed, &kube, &n1, &x, &Spec { namespace: "plain", ..spec("default", &[]) }).expect("x"),
    ];
    let _h = [http_server(&bed, &b, "b\n"), http_server_on(&bed, &b, 9090, "b\n")];
    let mut echo = netprobe(&bed, &b, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    let _p1 = istio::start_ambit(&bed, &kube, &istiod, &n1, &[]).expect("ambit on n1");
    let p2 = istio::start_ambit(&bed, &kube, &istiod, &n2, &[]).expect("ambit on n2");
    assert!(eventually(SLOW, || served(&p2, "b").is_some_and(|w| w["tunnel"] == "hbone")));
    let url = |port: u16| format!("http://{}:{port}/", b.ipv4);
    let reaches = |from: &ambit_testbed::Pod, port: u16| curl(from, &url(port)).status.success();
    // Each case: what is applied (empty: nothing), and who reaches b on which port.
    let cases: Vec<Case<'_>> = vec![
        ("no policy", vec![], vec![(&a, 8080, true), (&d, 8080, true), (&x, 8080, true)]),
        (
            "ALLOW the client principal",
            vec![policy(
                "allow-client",
                "ALLOW",
                "from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]",
            )],
            vec![(&a, 8080, true), (&d, 8080, false), (&x, 8080, false)],
        ),
        (
            "ALLOW a port",
            vec![policy("allow-port", "ALLOW", "to: [{operation: {ports: [\"8080\"]}}]")],
            vec![(&a, 8080, true), (&a, 9090, false)],
        ),
        (
            "DENY the client's namespace, from a service account",
            vec![policy("deny-client", "DENY", "from: [{source: {serviceAccounts: [demo/client]}}]")],
            vec![(&a, 8080, false), (&d, 8080, true)],
        ),
        ("STRICT", vec![peer_authentication("STRICT")], vec![(&a, 8080, true), (&x, 8080, false)]),
        ("PERMISSIVE", vec![peer_authentication("PERMISSIVE")], vec![(&a, 8080, true), (&x, 8080, true)]),
    ];
    let mut applied: Vec<String> = Vec::new();
    for (name, objects, checks) in cases {
        for old in applied.drain(..) {
            kube.kubectl_as(&kube.admin, &["delete", "--ignore-not-found", "-f", "-"], Some(&old))
                .expect("delete");
        }
        for o in &objects {
            kube.apply(o).expect("apply");
            applied.push(o.clone());
        }
        for (from, port, allowed) in checks {
            assert!(
                eventually(POLICY_TIME, || reaches(from, port) == allowed),
                "{name}: {} -> b:{port} should be {}\n{}",
                from.name,
                if allowed { "allowed" } else { "denied" },
                p2.log()
            );
        }
    }
    assert!(access_lines(&p2, &["connection denied", "demo/allow-client"]) >= 1, "{}", p2.log());

    // A DENY applied while connections are open closes those it now denies.
    for old in applied.drain(..) {
        kube.kubectl_as(&kube.admin, &["delete", "--ignore-not-found", "-f", "-"], Some(&old))
            .expect("delete");
    }
    let target = format!("{}:7000", b.ipv4);
    let mut a_chat = Chat::open(&bed, &a, &target).expect("a's connection");
    let mut d_chat = Chat::open(&bed, &d, &target).expect("d's connection");
    assert_eq!(a_chat.say("hello").expect("echo"), "hello");
    kube.apply(&policy(
        "deny-client",
        "DENY",
        "from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]",
    ))
    .expect("deny");
    assert!(
        eventually(POLICY_TIME, || a_chat.say("still there?").is_err()),
        "a's connection outlived the DENY"
    );
    assert_eq!(d_chat.say("and me?").expect("d's connection survives"), "and me?");
    assert!(eventually(T, || access_lines(&p2, &["open connection closed", CLIENT]) >= 1), "{}", p2.log());
}
