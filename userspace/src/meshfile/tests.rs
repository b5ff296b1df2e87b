use std::path::Path;

use super::*;

const NODE: Checks<'static> = Checks { node: Some("node-a") };

fn parse_str(text: &str) -> Result<Mesh, MeshFileError> {
    parse(Path::new("mesh.yaml"), text, &NODE)
}

/// A valid file; `/proc/self/ns/net` is a network namespace that always exists.
const GOOD: &str = "\
namespaces:
  - name: demo
    labels:
      istio.io/dataplane-mode: ambient
  - name: plain
pods:
  - name: client
    namespace: demo
    ips: [10.1.0.2, fd00:1::2]
    netns: /proc/self/ns/net
  - name: opted-out
    namespace: demo
    labels: {istio.io/dataplane-mode: none}
    ips: [10.1.0.3]
    netns: /proc/self/ns/net
  - name: outside
    namespace: plain
    ips: [10.1.0.4]
    netns: /proc/self/ns/net
  - name: solo
    namespace: plain
    labels: {istio.io/dataplane-mode: ambient}
    ips: [10.1.0.5]
    netns: /proc/self/ns/net
  - name: remote
    namespace: demo
    node: node-b
    serviceAccount: remote-sa
    ips: [10.2.0.2]
    netns: /var/run/netns/does-not-exist-here
";

#[test]
fn parses_a_good_file_and_applies_istio_enrolment_rules() {
    let mesh = parse_str(GOOD).expect("valid");
    let enrolled: Vec<_> = mesh.pods_on("node-a").filter(|p| mesh.is_enrolled(p)).map(PodSpec::key).collect();
    assert_eq!(enrolled, ["demo/client", "plain/solo"]);
    let remote = mesh.pods.iter().find(|p| p.name == "remote").expect("listed");
    assert_eq!(remote.service_account, "remote-sa");
    assert_eq!(mesh.pods[0].service_account, "default");
    assert_eq!(mesh.pods[0].interface, "eth0");
    assert_eq!(mesh.pods[0].ips.len(), 2);
    assert!(mesh.pods_on("node-b").any(|p| p.name == "remote"));
}

/// Asserts that `text` is refused with an error on `line` naming `field` and containing `what`.
fn refused(text: &str, line: usize, field: &str, what: &str) {
    let err = parse_str(text).expect_err("must be refused");
    let msg = err.to_string();
    assert_eq!(err.location.map(|l| l.line), Some(line), "wrong line in: {msg}");
    assert_eq!(err.field, field, "wrong field in: {msg}");
    assert!(msg.contains(what), "{msg:?} does not mention {what:?}");
    assert!(msg.starts_with(&format!("mesh.yaml:{line}:")), "{msg}");
}

#[test]
fn unknown_field_is_refused_with_its_line() {
    let text = GOOD.replace("    ips: [10.1.0.3]", "    ips: [10.1.0.3]\n    colour: blue");
    refused(&text, 15, "pods[1]", "unknown field `colour`");
}

#[test]
fn bad_ip_is_refused_with_its_line() {
    let text = GOOD.replace("10.1.0.4", "10.1.0.300");
    refused(&text, 18, "pods[2].ips[0]", "\"10.1.0.300\" is not an IPv4 or IPv6 address");
}

#[test]
fn duplicate_pod_is_refused_with_its_line() {
    let text =
        GOOD.replace("  - name: outside\n    namespace: plain", "  - name: client\n    namespace: demo");
    refused(&text, 16, "pods[2].name", "duplicate pod demo/client");
}

#[test]
fn duplicate_ip_is_refused() {
    let text = GOOD.replace("10.1.0.4", "10.1.0.2");
    refused(&text, 18, "pods[2].ips[0]", "already the address of pods[0]");
}

/// The same address written IPv4-mapped is the same address (the fuzzer's finding: two pods
/// were accepted), and a mapped loopback is loopback.
#[test]
fn an_ipv4_mapped_duplicate_or_loopback_is_refused() {
    let text = GOOD.replace("10.1.0.4", "\"::ffff:10.1.0.2\"");
    refused(&text, 18, "pods[2].ips[0]", "10.1.0.2 is already the address of pods[0]");
    let text = GOOD.replace("10.1.0.4", "\"::ffff:127.0.0.1\"");
    refused(&text, 18, "pods[2].ips[0]", "127.0.0.1 cannot be a pod address");
    let mapped = parse_str(&GOOD.replace("10.1.0.4", "\"::ffff:10.1.0.4\"")).expect("valid");
    assert_eq!(mapped.pods[2].ips, vec!["10.1.0.4".parse::<std::net::IpAddr>().expect("ip")]);
}

/// The fuzzer's second finding: an unknown key under a policy's metadata (which the
/// validator ignores) nested 20,000 levels deep took the YAML parsers seconds (100,000 took
/// over a minute). Deep nesting is refused before parsing, naming the limit and where.
#[test]
fn deeply_nested_collections_are_refused_before_parsing() {
    let deep = |n: usize| {
        format!(
            "{GOOD}policies:\n  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata:\n      name: p\n      namespace: demo\n      x: {}{}\n",
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    let err = parse_str(&deep(20_000)).expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("nested deeper than 64 levels"), "{msg}");
    assert_eq!(err.location.map(|l| (l.line, l.column)), Some((37, 74)), "{msg}");
    // At the limit it parses (and the unknown metadata key is ignored, as before).
    parse_str(&deep(MAX_FLOW_DEPTH)).expect("64 levels");
    // Brackets in quotes, comments and plain scalars do not count.
    let text = format!("{GOOD}# {}\n", "[".repeat(200));
    parse_str(&text).expect("a comment");
    let text = GOOD.replace("name: outside", &format!("name: outside # {}", "{".repeat(100)));
    parse_str(&text).expect("a trailing comment");
    let quoted = format!("{GOOD}policies: []\n# \"{}\"\n", "[".repeat(100));
    parse_str(&quoted).expect("quoted");
    let too_big = "#".repeat(MAX_FILE_BYTES as usize + 1);
    assert!(parse_str(&too_big).expect_err("refused").to_string().contains("larger than 16 MiB"));
}

#[test]
fn missing_netns_is_refused_for_local_pods_only() {
    let text = GOOD.replace(
        "    ips: [10.1.0.4]\n    netns: /proc/self/ns/net",
        "    ips: [10.1.0.4]\n    netns: /var/run/netns/ambit-no-such-netns",
    );
    refused(&text, 19, "pods[2].netns", "does not exist");
    // The remote pod's netns does not exist either, and that is fine: it is not on this node.
    assert!(parse_str(GOOD).is_ok());
}

#[test]
fn a_file_that_is_not_a_netns_is_refused() {
    let text = GOOD.replace(
        "    ips: [10.1.0.4]\n    netns: /proc/self/ns/net",
        "    ips: [10.1.0.4]\n    netns: /proc/self/status",
    );
    refused(&text, 19, "pods[2].netns", "is not a network namespace");
}

#[test]
fn undeclared_namespace_is_refused() {
    let text =
        GOOD.replace("    namespace: plain\n    ips: [10.1.0.4]", "    namespace: nope\n    ips: [10.1.0.4]");
    refused(&text, 17, "pods[2].namespace", "not declared");
}

#[test]
fn wrong_type_is_refused_with_its_line() {
    let text = GOOD.replace("    ips: [10.1.0.4]", "    ips: 7");
    let err = parse_str(&text).expect_err("refused");
    assert_eq!(err.location.map(|l| l.line), Some(18), "{err}");
    assert!(err.to_string().contains("pods[2].ips"), "{err}");
}

#[test]
fn empty_file_is_an_empty_mesh() {
    assert_eq!(parse_str("").expect("empty is fine"), Mesh::default());
}

#[test]
fn not_yaml_is_refused() {
    let err = parse_str("pods: [\n").expect_err("refused");
    assert!(err.location.is_some(), "{err}");
}

const SERVICES: &str = "\
services:
  - name: web
    namespace: demo
    addresses: [10.96.0.10, fd00:96::10]
    ports:
      - port: 80
        targetPort: 8080
    selector:
      app: web
";

fn with_services(services: &str) -> String {
    let pods = GOOD.replace(
        "    ips: [10.1.0.2, fd00:1::2]\n",
        "    ips: [10.1.0.2, fd00:1::2]\n    labels: {app: web}\n    status: unhealthy\n",
    );
    format!("{pods}{services}")
}

#[test]
fn services_parse_with_their_endpoints_and_istio_hostnames() {
    let mesh = parse_str(&with_services(SERVICES)).expect("valid");
    let web = &mesh.services[0];
    assert_eq!(web.key(), "demo/web.demo.svc.cluster.local");
    assert_eq!(web.ports, [ServicePortSpec { port: 80, target_port: 8080 }]);
    assert_eq!(web.addresses.len(), 2);
    let selected: Vec<_> = mesh.pods.iter().filter(|p| web.selects(p)).map(PodSpec::key).collect();
    assert_eq!(selected, ["demo/client"]);
    assert!(!mesh.pods[0].healthy, "status: unhealthy");
    assert!(mesh.pods[1].healthy, "healthy by default");
    // Without a selector a service selects nothing (as in Kubernetes).
    let bare =
        parse_str(&with_services(&SERVICES.replace("    selector:\n      app: web\n", ""))).expect("valid");
    assert!(!mesh.pods.iter().any(|p| bare.services[0].selects(p)));
}

#[test]
fn invalid_services_are_refused_with_line_and_field() {
    // Lines: `services:` is line 33 of the sample.
    let cases = [
        ("port: 80", "port: 0", 38, "services[0].ports[0].port", "ports are 1 to 65535"),
        ("targetPort: 8080", "targetPort: 0", 39, "services[0].ports[0].targetPort", "ports are 1 to 65535"),
        ("10.96.0.10,", "10.1.0.5,", 36, "services[0].addresses[0]", "already the address of pods[3]"),
        ("10.96.0.10,", "127.0.0.1,", 36, "services[0].addresses[0]", "cannot be a service address"),
        (
            "    namespace: demo\n    addresses",
            "    namespace: nope\n    addresses",
            35,
            "services[0].namespace",
            "not declared",
        ),
        ("name: web", "name: Web_1", 34, "services[0].name", ""),
    ];
    for (from, to, line, field, what) in cases {
        let text = with_services(&SERVICES.replace(from, to));
        assert_ne!(text, with_services(SERVICES), "{from} not in the sample");
        refused(&text, line, field, what);
    }
    let twice =
        SERVICES.replace("        targetPort: 8080\n", "        targetPort: 8080\n      - port: 80\n");
    refused(&with_services(&twice), 40, "services[0].ports[1].port", "port 80 is listed twice");
    let status = with_services(SERVICES).replace("status: unhealthy", "status: sick");
    let err = parse_str(&status).expect_err("refused");
    assert!(err.to_string().contains("pods[0].status") && err.to_string().contains("sick"), "{err}");
}

/// Mutations of the mesh files in `fuzz/corpus/meshfile/` (truncated, bytes flipped, junk
/// spliced in): each is parsed or refused with a message naming the file; never a panic.
mod hostile {
    use proptest::prelude::*;

    use super::*;

    const CORPUS: [(&str, &str); 3] = [
        ("pods.yaml", include_str!("../../../fuzz/corpus/meshfile/pods.yaml")),
        ("services.yaml", include_str!("../../../fuzz/corpus/meshfile/services.yaml")),
        ("policies.yaml", include_str!("../../../fuzz/corpus/meshfile/policies.yaml")),
    ];
    /// The control plane's view: no network namespace is checked.
    const CP: Checks<'static> = Checks { node: None };

    #[test]
    fn the_corpus_is_valid() {
        for (name, text) in CORPUS {
            if let Err(e) = parse(Path::new(name), text, &CP) {
                panic!("{name}: {e}");
            }
        }
    }

    fn mutate(text: &str, kind: u8, at: usize, junk: &[u8]) -> Vec<u8> {
        let mut b = text.as_bytes().to_vec();
        let at = at % (b.len() + 1);
        match kind % 4 {
            0 => b.truncate(at),
            1 => {
                for (i, x) in junk.iter().enumerate() {
                    if let Some(c) = b.get_mut(at + i) {
                        *c ^= x;
                    }
                }
            }
            2 => {
                b.splice(at..at, junk.iter().copied());
            }
            _ => {
                let end = (at + junk.len()).min(b.len());
                b.drain(at..end);
            }
        }
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        #[test]
        fn mutated_files_are_parsed_or_refused_by_name(
            file in 0usize..3,
            kind in any::<u8>(),
            at in any::<usize>(),
            junk in proptest::collection::vec(any::<u8>(), 1..24),
        ) {
            let (name, text) = CORPUS[file];
            let bytes = mutate(text, kind, at, &junk);
            // The node reads bytes from disk: invalid UTF-8 is refused before YAML.
            if let Ok(text) = std::str::from_utf8(&bytes) {
                if let Err(e) = parse(Path::new(name), text, &CP) {
                    prop_assert!(e.to_string().contains(name), "{e}");
                }
            }
        }

        #[test]
        fn random_text_is_refused_or_parsed(text in "\\PC{0,256}") {
            if let Err(e) = parse(Path::new("random.yaml"), &text, &CP) {
                prop_assert!(e.to_string().contains("random.yaml"), "{e}");
            }
        }
    }
}

fn label_map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn canonical_service_and_revision_follow_istio_s_precedence() {
    let all = label_map(&[
        ("service.istio.io/canonical-name", "cn"),
        ("app.kubernetes.io/name", "k8s-name"),
        ("app", "app"),
        ("service.istio.io/canonical-revision", "cr"),
        ("app.kubernetes.io/version", "k8s-v"),
        ("version", "v"),
    ]);
    assert_eq!((canonical_name(&all, "wl"), canonical_revision(&all)), ("cn", "cr"));
    let k8s = label_map(&[
        ("app.kubernetes.io/name", "k8s-name"),
        ("app", "app"),
        ("app.kubernetes.io/version", "k8s-v"),
        ("version", "v"),
    ]);
    assert_eq!((canonical_name(&k8s, "wl"), canonical_revision(&k8s)), ("k8s-name", "k8s-v"));
    let plain = label_map(&[("app", "app"), ("version", "v")]);
    assert_eq!((canonical_name(&plain, "wl"), canonical_revision(&plain)), ("app", "v"));
    // A present label wins even when empty, as in istiod; without labels: the
    // workload's name and `latest`.
    let empty = label_map(&[("app", ""), ("version", "")]);
    assert_eq!((canonical_name(&empty, "wl"), canonical_revision(&empty)), ("", ""));
    let none = label_map(&[]);
    assert_eq!((canonical_name(&none, "wl"), canonical_revision(&none)), ("wl", "latest"));
}
