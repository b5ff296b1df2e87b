//! The mesh file's `policies`: Istio resources pasted as they are, L7 and unsupported fields
//! refused with line and field.

use std::path::Path;

use super::{
    policy::{ConditionSpec, IpBlock, MtlsMode, Pattern, PolicyAction},
    *,
};

const HEAD: &str = "\
namespaces:
  - name: demo
pods: []
policies:
";

fn parse_policies(policies: &str) -> Result<Mesh, MeshFileError> {
    parse(Path::new("mesh.yaml"), &format!("{HEAD}{policies}"), &Checks { node: None })
}

/// What `kubectl get authorizationpolicy -o yaml` prints, trimmed to one object.
const PASTED: &str = r#"  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      annotations:
        istio.io/dry-run: "true"
      creationTimestamp: "2026-11-20T10:00:00Z"
      generation: 1
      name: allow-client
      namespace: demo
      resourceVersion: "4242"
      uid: 0b3c8f0e-1111-2222-3333-444455556666
    spec:
      selector:
        matchLabels:
          app: web
      action: ALLOW
      rules:
        - from:
            - source:
                principals: ["cluster.local/ns/demo/sa/client", "*/sa/admin"]
                notNamespaces: ["kube-*"]
                ipBlocks: ["10.1.0.0/16", "fd00:1::2"]
                serviceAccounts: ["demo/client"]
          to:
            - operation:
                ports: ["8080", 9090]
          when:
            - key: destination.port
              notValues: ["22"]
    status: {}
"#;

#[test]
fn a_policy_pasted_from_a_cluster_is_read_as_istio_means_it() {
    let mesh = parse_policies(PASTED).expect("valid");
    let p = &mesh.authorization_policies[0];
    assert_eq!(
        (p.name.as_str(), p.namespace.as_str(), p.action, p.dry_run),
        ("allow-client", "demo", PolicyAction::Allow, true)
    );
    assert_eq!(p.selector.as_ref().and_then(|s| s.get("app")).map(String::as_str), Some("web"));
    let rule = &p.rules[0];
    let src = &rule.from[0];
    assert_eq!(
        src.principals.any_of,
        [Pattern::Exact("cluster.local/ns/demo/sa/client".into()), Pattern::Suffix("/sa/admin".into())]
    );
    assert_eq!(src.namespaces.none_of, [Pattern::Prefix("kube-".into())]);
    assert_eq!(src.ip_blocks.any_of[1], IpBlock { addr: "fd00:1::2".parse().expect("ip"), len: 128 });
    assert_eq!(src.service_accounts.any_of, [("demo".to_string(), "client".to_string())]);
    assert_eq!(rule.to[0].ports.any_of, [8080, 9090]);
    assert!(matches!(&rule.when[0], ConditionSpec::DestinationPort(v) if v.none_of == [22]));
}

#[test]
fn peer_authentications_set_the_mode() {
    let mesh = parse_policies(
        "  - kind: PeerAuthentication\n    metadata: {name: default, namespace: istio-system}\n    spec:\n      mtls: {mode: STRICT}\n\
         \x20 - kind: PeerAuthentication\n    metadata: {name: relaxed, namespace: demo}\n    spec:\n      mtls: {mode: PERMISSIVE}\n",
    )
    .expect("valid");
    let modes: Vec<_> = mesh.peer_authentications.iter().map(|p| (p.namespace.as_str(), p.mode)).collect();
    assert_eq!(modes, [("istio-system", MtlsMode::Strict), ("demo", MtlsMode::Permissive)]);
}

fn refused(policies: &str, line: usize, field: &str, what: &str) {
    let err = parse_policies(policies).expect_err(what);
    let msg = err.to_string();
    assert_eq!(err.field, field, "{msg}");
    assert_eq!(err.location.map(|l| l.line), Some(line), "{msg}");
    assert!(msg.contains(what), "{msg:?} does not say {what:?}");
}

/// A minimal AuthorizationPolicy (lines 5–9 of the file) with `extra` under `spec`.
fn minimal(extra: &str) -> String {
    format!("  - kind: AuthorizationPolicy\n    metadata: {{name: p, namespace: demo}}\n    spec:\n{extra}")
}

#[test]
fn l7_and_unsupported_fields_are_refused_where_they_are_written() {
    let rule = |body: &str| minimal(&format!("      rules:\n        - {body}\n"));
    let cases: Vec<(String, usize, &str, &str)> = vec![
        (
            rule("to: [{operation: {methods: [GET]}}]"),
            9,
            "policies[0].spec.rules[0].to[0].operation.methods",
            "HTTP (L7)",
        ),
        (
            rule("to: [{operation: {paths: [/admin]}}]"),
            9,
            "policies[0].spec.rules[0].to[0].operation.paths",
            "HTTP (L7)",
        ),
        (
            rule("to: [{operation: {hosts: [a.b]}}]"),
            9,
            "policies[0].spec.rules[0].to[0].operation.hosts",
            "HTTP (L7)",
        ),
        (
            rule("from: [{source: {requestPrincipals: [x]}}]"),
            9,
            "policies[0].spec.rules[0].from[0].source.requestPrincipals",
            "HTTP (L7)",
        ),
        (
            rule("from: [{source: {remoteIpBlocks: [1.2.3.4]}}]"),
            9,
            "policies[0].spec.rules[0].from[0].source.remoteIpBlocks",
            "HTTP (L7)",
        ),
        (
            rule("when: [{key: \"request.headers[x]\", values: [y]}]"),
            9,
            "policies[0].spec.rules[0].when[0].key",
            "HTTP (L7)",
        ),
        (
            rule("when: [{key: source.colour, values: [y]}]"),
            9,
            "policies[0].spec.rules[0].when[0].key",
            "unknown condition key",
        ),
        (rule("when: [{key: source.ip}]"), 9, "policies[0].spec.rules[0].when[0]", "values or notValues"),
        (
            rule("from: [{source: {ipBlocks: [10.0.0.0/33]}}]"),
            9,
            "policies[0].spec.rules[0].from[0].source.ipBlocks[0]",
            "prefix length",
        ),
        (
            rule("from: [{source: {principals: [\"a*b\"]}}]"),
            9,
            "policies[0].spec.rules[0].from[0].source.principals[0]",
            "'*' may only",
        ),
        (
            rule("from: [{source: {serviceAccounts: [client]}}]"),
            9,
            "policies[0].spec.rules[0].from[0].source.serviceAccounts[0]",
            "<namespace>/<service account>",
        ),
        (
            rule("to: [{operation: {ports: [http]}}]"),
            9,
            "policies[0].spec.rules[0].to[0].operation.ports[0]",
            "is not a port",
        ),
        (minimal("      action: CUSTOM\n"), 8, "policies[0].spec.action", "CUSTOM is not supported"),
        (minimal("      action: AUDIT\n"), 8, "policies[0].spec.action", "AUDIT is not supported"),
        (
            minimal("      targetRef: {kind: Service, name: web}\n"),
            8,
            "policies[0].spec.targetRef",
            "waypoint",
        ),
        (
            minimal("      mtls: {mode: STRICT}\n"),
            8,
            "policies[0].spec.mtls",
            "belongs to a PeerAuthentication",
        ),
        (minimal("      colour: blue\n"), 8, "policies[0].spec", "unknown field `colour`"),
    ];
    for (text, line, field, what) in cases {
        refused(&text, line, field, what);
    }
}

#[test]
fn bad_resources_are_refused_with_line_and_field() {
    let pa = |mtls: &str| {
        format!("  - kind: PeerAuthentication\n    metadata: {{name: p, namespace: demo}}\n    spec:\n{mtls}")
    };
    refused(
        &pa("      mtls: {mode: DISABLE}\n"),
        8,
        "policies[0].spec.mtls.mode",
        "DISABLE is not supported",
    );
    refused(
        &pa("      portLevelMtls: {8080: {mode: STRICT}}\n"),
        8,
        "policies[0].spec.portLevelMtls",
        "per-port",
    );
    refused(&pa("      action: DENY\n"), 8, "policies[0].spec.action", "belongs to an AuthorizationPolicy");
    refused(
        "  - kind: Sidecar\n    metadata: {name: p, namespace: demo}\n",
        5,
        "policies[0].kind",
        "unknown kind \"Sidecar\"",
    );
    refused(
        "  - apiVersion: networking.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {name: p, namespace: demo}\n",
        5,
        "policies[0].apiVersion",
        "security.istio.io/v1",
    );
    refused(
        "  - kind: AuthorizationPolicy\n    metadata: {name: p, namespace: elsewhere}\n",
        6,
        "policies[0].metadata.namespace",
        "not declared",
    );
    let twice = format!("{}{}", minimal("      action: DENY\n"), minimal("      action: DENY\n"));
    refused(&twice, 10, "policies[1].metadata.name", "duplicate AuthorizationPolicy demo/p");
    let dry = "  - kind: AuthorizationPolicy\n    metadata:\n      name: p\n      namespace: demo\n      annotations: {istio.io/dry-run: \"yes\"}\n";
    refused(dry, 9, "policies[0].metadata.annotations.istio.io/dry-run", "expected \"true\" or \"false\"");
}
