//! Mesh-file policies → xDS → the proxy's state → decisions, without a network.

use std::path::Path;

use super::{authorization::STRICT_POLICY, translate::translate};
use crate::{
    authz::{self, Conn, Peer},
    identity::Identity,
    meshfile::{parse, Checks},
    pb::istio::security::Scope,
    state::StateStore,
};

const MESH: &str = "\
namespaces:
  - name: demo
    labels: {istio.io/dataplane-mode: ambient}
  - name: other
    labels: {istio.io/dataplane-mode: ambient}
pods:
  - {name: web, namespace: demo, serviceAccount: server, ips: [10.2.0.2], netns: /x, labels: {app: web}}
  - {name: db, namespace: demo, serviceAccount: db, ips: [10.2.0.3], netns: /x, labels: {app: db}}
  - {name: api, namespace: other, serviceAccount: api, ips: [10.2.0.4], netns: /x, labels: {app: web}}
policies:
";

fn state_for(policies: &str) -> StateStore {
    let mesh =
        parse(Path::new("mesh.yaml"), &format!("{MESH}{policies}"), &Checks { node: None }).expect("valid");
    let store = StateStore::default();
    let errors = store.replace_all(&translate(&mesh, "cluster.local"));
    assert!(errors.is_empty(), "{errors:?}");
    store
}

/// Whether a connection from `src` (namespace, sa; `None`: plaintext) to `dst_ip:port` is allowed.
fn allowed(store: &StateStore, src: Option<(&str, &str)>, dst_ip: &str, port: u16) -> bool {
    let st = store.read();
    let w = st.workload_by_ip(dst_ip.parse().expect("ip")).expect("workload");
    let policies = st.policies_for(&w.namespace, &w.authorization_policies);
    let peer = src.map(|(ns, sa)| Peer::new(Identity::new("cluster.local", ns, sa)));
    let conn = Conn {
        src: peer.as_ref(),
        src_ip: "10.1.0.2".parse().expect("ip"),
        dst_ip: dst_ip.parse().expect("ip"),
        dst_port: port,
    };
    authz::evaluate(&policies, &conn).allowed()
}

#[test]
fn scopes_follow_istio_namespaces_and_selectors() {
    let store = state_for(
        "  - kind: AuthorizationPolicy
    metadata: {name: everywhere, namespace: istio-system}
    spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
  - kind: AuthorizationPolicy
    metadata: {name: demo-wide, namespace: demo}
    spec: {action: DENY, rules: [{to: [{operation: {ports: [\"22\"]}}]}]}
  - kind: AuthorizationPolicy
    metadata: {name: web-only, namespace: demo}
    spec: {selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]}
",
    );
    let st = store.read();
    let scope = |n: &str| st.dump().policies.into_iter().find(|p| p.key == n).map(|p| p.scope);
    assert_eq!(scope("istio-system/everywhere"), Some(authz::Scope::Global));
    assert_eq!(scope("demo/demo-wide"), Some(authz::Scope::Namespace));
    assert_eq!(scope("demo/web-only"), Some(authz::Scope::WorkloadSelector));
    let web = st.workload_by_ip("10.2.0.2".parse().expect("ip")).expect("web");
    assert_eq!(web.authorization_policies, ["demo/web-only"]);
    // app=web in another namespace is not selected by demo's policy.
    let api = st.workload_by_ip("10.2.0.4".parse().expect("ip")).expect("api");
    assert!(api.authorization_policies.is_empty());
    drop(st);
    assert!(allowed(&store, Some(("demo", "client")), "10.2.0.2", 8080));
    assert!(!allowed(&store, Some(("demo", "other")), "10.2.0.2", 8080), "web-only allows only the client");
    assert!(allowed(&store, Some(("demo", "other")), "10.2.0.3", 8080), "db is not selected");
    assert!(!allowed(&store, Some(("demo", "other")), "10.2.0.3", 22), "demo-wide DENY");
    assert!(allowed(&store, Some(("demo", "other")), "10.2.0.4", 22), "other namespace");
    assert!(!allowed(&store, Some(("evil", "x")), "10.2.0.4", 80), "the global DENY");
}

#[test]
fn strict_comes_from_the_nearest_peer_authentication() {
    // Mesh STRICT; namespace demo PERMISSIVE; but db in demo STRICT again.
    let store = state_for(
        "  - kind: PeerAuthentication
    metadata: {name: default, namespace: istio-system}
    spec: {mtls: {mode: STRICT}}
  - kind: PeerAuthentication
    metadata: {name: default, namespace: demo}
    spec: {mtls: {mode: PERMISSIVE}}
  - kind: PeerAuthentication
    metadata: {name: db, namespace: demo}
    spec: {selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}
",
    );
    assert!(allowed(&store, None, "10.2.0.2", 80), "web: PERMISSIVE (namespace)");
    assert!(!allowed(&store, None, "10.2.0.3", 80), "db: STRICT (workload)");
    assert!(!allowed(&store, None, "10.2.0.4", 80), "api: STRICT (mesh)");
    assert!(allowed(&store, Some(("demo", "client")), "10.2.0.3", 80), "mTLS clients pass STRICT");
    let st = store.read();
    let db = st.workload_by_ip("10.2.0.3".parse().expect("ip")).expect("db");
    assert_eq!(db.authorization_policies, [format!("demo/{STRICT_POLICY}")]);
}

#[test]
fn the_xds_form_is_what_istiod_sends() {
    let mesh = parse(
        Path::new("mesh.yaml"),
        &format!(
            "{MESH}  - kind: AuthorizationPolicy
    metadata: {{name: p, namespace: demo}}
    spec:
      rules:
        - from: [{{source: {{namespaces: [a]}}}}, {{source: {{namespaces: [b]}}}}]
          to: [{{operation: {{ports: [\"80\"]}}}}]
          when: [{{key: source.ip, values: [10.0.0.0/8]}}, {{key: destination.port, notValues: [\"81\"]}}]
"
        ),
        &Checks { node: None },
    )
    .expect("valid");
    let r = translate(&mesh, "cluster.local");
    let p = &r.authorizations["demo/p"];
    assert_eq!(p.scope, Scope::Namespace as i32);
    let clauses = &p.rules[0].clauses;
    // from (two alternatives), to, and one clause per condition.
    assert_eq!(clauses.iter().map(|c| c.matches.len()).collect::<Vec<_>>(), [2, 1, 1, 1]);
    assert_eq!(clauses[1].matches[0].destination_ports, [80]);
    assert_eq!(clauses[2].matches[0].source_ips[0].length, 8);
    assert_eq!(clauses[3].matches[0].not_destination_ports, [81]);
}
