//! The Kubernetes manifests under `daemonset/`: every kustomization rendered (resources and
//! namespace, the only kustomize features they use) and every object validated with
//! `kubernetes-validate --strict` against two Kubernetes versions; the RBAC read back and
//! checked to grant exactly get/list/watch on namespaces and pods.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde_norway::Value;

/// Kubernetes versions the manifests must be valid for (the DaemonSet's AppArmor field needs
/// 1.30+).
const VERSIONS: [&str; 2] = ["1.31.0", "1.34.0"];
/// Cluster-scoped kinds among ours (kustomize's namespace does not apply to them).
const CLUSTER_SCOPED: [&str; 3] = ["Namespace", "ClusterRole", "ClusterRoleBinding"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

fn kubernetes_validate() -> PathBuf {
    let p = std::env::var_os("AMBIT_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/tools/venv/bin/kubernetes-validate"));
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` (it installs kubernetes-validate)",
        p.display()
    );
    p
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// `kubectl kustomize <dir>` for the subset the manifests use: `resources` (files and
/// directories with a kustomization) and `namespace`. Anything else is refused, so the
/// rendering here cannot silently differ from kustomize's.
fn render(dir: &Path) -> Vec<Value> {
    let k = dir.join("kustomization.yaml");
    let doc = yaml_docs(&k).pop().unwrap_or_else(|| panic!("{} is empty", k.display()));
    let map = doc.as_mapping().unwrap_or_else(|| panic!("{}: not a map", k.display()));
    for key in map.keys() {
        let key = key.as_str().unwrap_or_default();
        assert!(
            ["apiVersion", "kind", "namespace", "resources"].contains(&key),
            "{}: `{key}` is not understood by this test's renderer: extend it",
            k.display()
        );
    }
    let mut out = Vec::new();
    for r in doc["resources"].as_sequence().unwrap_or_else(|| panic!("{}: no resources", k.display())) {
        let p = dir.join(r.as_str().expect("resource path"));
        if p.is_dir() {
            out.extend(render(&p));
        } else {
            out.extend(yaml_docs(&p));
        }
    }
    if let Some(ns) = doc["namespace"].as_str() {
        for o in &mut out {
            if !CLUSTER_SCOPED.contains(&o["kind"].as_str().unwrap_or_default()) {
                o["metadata"]["namespace"] = Value::String(ns.to_string());
            }
        }
    }
    out
}

fn variants() -> Vec<(&'static str, Vec<Value>)> {
    ["istiod", "standalone"].into_iter().map(|v| (v, render(&root().join("daemonset").join(v)))).collect()
}

fn validate(file: &Path, version: &str) -> (bool, String) {
    let out = Command::new(kubernetes_validate())
        .args(["--strict", "--kubernetes-version", version])
        .arg(file)
        .output()
        .expect("running kubernetes-validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("ERROR"), text)
}

#[test]
fn every_manifest_is_valid_for_two_kubernetes_versions() {
    let dir = std::env::temp_dir().join(format!("ambit-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (variant, objects) in variants() {
        let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        for needed in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"] {
            assert!(kinds.contains(needed), "{variant}: no {needed} among {kinds:?}");
        }
        if variant == "standalone" {
            for needed in ["Namespace", "Deployment", "Service"] {
                assert!(kinds.contains(needed), "{variant}: no {needed}");
            }
        }
        let file = dir.join(format!("{variant}.yaml"));
        let text: String =
            objects.iter().map(|o| format!("---\n{}", serde_norway::to_string(o).expect("yaml"))).collect();
        std::fs::write(&file, text).expect("writing the rendering");
        for version in VERSIONS {
            let (ok, report) = validate(&file, version);
            assert!(ok, "{variant} against Kubernetes {version}:\n{report}");
            // Every object was looked at.
            let passed = report.lines().filter(|l| l.contains("passed for resource")).count();
            assert_eq!(passed, objects.len(), "{variant} against {version}:\n{report}");
        }
    }
    // The validator does refuse what is wrong: an unknown field in strict mode.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ncolour: blue\n")
        .expect("write");
    assert!(!validate(&bad, VERSIONS[0]).0, "kubernetes-validate accepted an unknown field");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// (apiGroups, resources, verbs) of a rule, as sets.
type Grant = (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>);

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(String::from)).collect()
}

#[test]
fn rbac_grants_exactly_reading_namespaces_and_pods_and_annotating_pods() {
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    for (variant, objects) in variants() {
        let roles: Vec<&Value> =
            objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("ClusterRole" | "Role"))).collect();
        assert_eq!(roles.len(), 1, "{variant}: one role, the node proxy's");
        let grants: Vec<Grant> = roles[0]["rules"]
            .as_sequence()
            .expect("rules")
            .iter()
            .map(|r| {
                assert!(r.get("resourceNames").is_none() && r.get("nonResourceURLs").is_none(), "{r:?}");
                (strings(&r["apiGroups"]), strings(&r["resources"]), strings(&r["verbs"]))
            })
            .collect();
        // Expand to (group, resource, verb) triples so the split into rules does not matter.
        let triples: BTreeSet<(String, String, String)> = grants
            .iter()
            .flat_map(|(g, r, v)| {
                g.iter().flat_map(move |g| {
                    r.iter().flat_map(move |r| v.iter().map(move |v| (g.clone(), r.clone(), v.clone())))
                })
            })
            .collect();
        let mut expected: BTreeSet<(String, String, String)> = set(&["namespaces", "pods"])
            .into_iter()
            .flat_map(|r| {
                set(&["get", "list", "watch"]).into_iter().map(move |v| (String::new(), r.clone(), v))
            })
            .collect();
        // The pod's `ambient.istio.io/redirection` annotation, written through the status
        // subresource as istio-cni writes it.
        expected.insert((String::new(), "pods/status".into(), "patch".into()));
        assert_eq!(
            triples, expected,
            "{variant}: the role grants exactly get/list/watch on core namespaces and pods, and \
             patch on pods/status"
        );
        // Bound to the node proxy's service account only.
        let bindings: Vec<&Value> = objects
            .iter()
            .filter(|o| matches!(o["kind"].as_str(), Some("ClusterRoleBinding" | "RoleBinding")))
            .collect();
        assert_eq!(bindings.len(), 1, "{variant}");
        let b = bindings[0];
        assert_eq!(b["roleRef"]["name"], roles[0]["metadata"]["name"]);
        let subjects = b["subjects"].as_sequence().expect("subjects");
        assert_eq!(subjects.len(), 1);
        let sa_ns = objects
            .iter()
            .find(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == subjects[0]["name"])
            .map(|o| o["metadata"]["namespace"].clone())
            .expect("the bound service account exists");
        assert_eq!(
            (subjects[0]["kind"].as_str(), &subjects[0]["namespace"]),
            (Some("ServiceAccount"), &sa_ns),
            "{variant}"
        );
        // The control plane needs no API access at all.
        for o in objects
            .iter()
            .filter(|o| o["metadata"]["labels"]["app.kubernetes.io/component"] == "controlplane")
        {
            if o["kind"] == "ServiceAccount" || o["kind"] == "Deployment" {
                let automount = if o["kind"] == "Deployment" {
                    &o["spec"]["template"]["spec"]["automountServiceAccountToken"]
                } else {
                    &o["automountServiceAccountToken"]
                };
                assert_eq!(
                    automount.as_bool(),
                    Some(false),
                    "{variant}: {} mounts an API token",
                    o["kind"].as_str().unwrap_or("")
                );
            }
        }
    }
}

#[test]
fn the_daemonset_runs_with_capabilities_not_privileged_and_mounts_what_ambit_needs() {
    for (variant, objects) in variants() {
        let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").expect("a DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "{variant}");
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"].as_bool(), Some(false), "{variant}: not privileged");
        let added = strings(&sc["capabilities"]["add"]);
        for cap in ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"] {
            assert!(added.contains(cap), "{variant}: {cap} missing from {added:?}");
        }
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL".to_string()].into());
        let mounts: BTreeMap<String, String> = c["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .map(|m| {
                (
                    m["mountPath"].as_str().expect("path").to_string(),
                    m["name"].as_str().expect("name").to_string(),
                )
            })
            .collect();
        for path in [
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
            "/host/proc",
            "/var/run/netns",
            "/etc/cni/net.d",
            "/opt/cni/bin",
            "/var/run/ambit",
        ] {
            assert!(mounts.contains_key(path), "{variant}: {path} not mounted ({mounts:?})");
        }
        assert_eq!(c["readinessProbe"]["httpGet"]["port"].as_u64(), Some(15021));
        let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"].as_str(), Some("15020"));
        // Requests, and no limit that could OOM-kill or throttle the node's proxy.
        assert!(c["resources"]["requests"].is_mapping(), "{variant}");
        assert!(c["resources"].get("limits").is_none(), "{variant}: no limits");
        // Upgrades hand over (surge, takeover): none refuses a connection.
        let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
        assert_eq!((rolling["maxSurge"].as_u64(), rolling["maxUnavailable"].as_u64()), (Some(1), Some(0)));
        assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz/live"));
        assert_eq!(pod["nodeSelector"]["kubernetes.io/os"].as_str(), Some("linux"));
        // The environment names flags ambit has: the pod source and the /proc mount.
        let env: BTreeMap<String, String> = c["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .filter_map(|e| {
                Some((e["name"].as_str()?.to_string(), e["value"].as_str().unwrap_or("").to_string()))
            })
            .collect();
        assert_eq!(env.get("AMBIT_POD_SOURCE").map(String::as_str), Some("kubernetes"));
        assert_eq!(env.get("AMBIT_PROC_DIR").map(String::as_str), Some("/host/proc"));
        // The CNI plugin is on, and its directories are the host's, at the host's paths:
        // the plugin runs on the host and reads the paths ambit writes.
        assert_eq!(env.get("AMBIT_CNI").map(String::as_str), Some("true"), "{variant}");
        assert_eq!(env.get("AMBIT_TAKEOVER").map(String::as_str), Some("true"), "{variant}");
        let volumes: BTreeMap<String, String> = pod["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .filter_map(|v| {
                Some((v["name"].as_str()?.to_string(), v["hostPath"]["path"].as_str()?.to_string()))
            })
            .collect();
        for path in ["/etc/cni/net.d", "/opt/cni/bin", "/var/run/ambit"] {
            assert_eq!(volumes.get(&mounts[path]).map(String::as_str), Some(path), "{variant}: {path}");
        }
    }
}

/// `AMBIT_*` variables a container of `component` is given (its env and its ConfigMaps).
fn ambit_env(objects: &[Value], component: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for o in objects.iter().filter(|o| o["metadata"]["labels"]["app.kubernetes.io/component"] == component) {
        if o["kind"] == "ConfigMap" && o["metadata"]["name"].as_str().is_some_and(|n| n.ends_with("-node")) {
            names.extend(
                o["data"]
                    .as_mapping()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, _)| k.as_str().map(String::from)),
            );
        }
        for c in o["spec"]["template"]["spec"]["containers"].as_sequence().into_iter().flatten() {
            names.extend(
                c["env"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["name"].as_str().map(String::from)),
            );
        }
    }
    names.retain(|n| n.starts_with("AMBIT_"));
    names
}

#[test]
fn every_setting_in_the_manifests_is_one_ambit_reads() {
    let help = |sub: &str| {
        let out = Command::new(ambit_testbed::exec::workspace_bin("ambit"))
            .args([sub, "--help"])
            .output()
            .expect("ambit --help");
        assert!(out.status.success(), "ambit {sub} --help failed");
        // Help wraps lines: compare with whitespace collapsed.
        String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let (node_help, cp_help) = (help("node"), help("controlplane"));
    for (variant, objects) in variants() {
        let node = ambit_env(&objects, "node");
        assert!(node.len() >= 8, "{variant}: {node:?}");
        for name in &node {
            assert!(
                node_help.contains(&format!("[env: {name}=")),
                "{variant}: ambit node has no setting {name}"
            );
        }
        for name in ambit_env(&objects, "controlplane") {
            assert!(
                cp_help.contains(&format!("[env: {name}=")),
                "{variant}: ambit controlplane has no setting {name}"
            );
        }
    }
}
