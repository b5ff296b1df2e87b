//! ambit's Helm chart (`daemonset/helm/ambit`), with the real helm built from its Go module:
//! `helm lint --strict` passes; rendered with its defaults it gives exactly the objects of the
//! kustomize base `daemonset/istiod` (one source, two ways to install); the values Istio users
//! set (hub and tag, resources, tolerations, the istiod address, fail-open, the upgrade
//! strategy, the log format) land where they should; and the rendering is applied
//! server-side to the real API server, which accepts every object.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use ambit_testbed::{realkube::Kube, run_with_timeout, tools, Bed};
use common::*;
use serde_norway::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

fn chart() -> PathBuf {
    root().join("daemonset/helm/ambit")
}

/// Runs helm with a private home (no repositories, no cache outside the run).
fn helm(args: &[&str]) -> (bool, String) {
    let home = std::env::temp_dir().join(format!("ambit-helm-{}", std::process::id()));
    let mut c = Command::new(tools::helm());
    c.args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", "/dev/null");
    let out = run_with_timeout(c, T).expect("helm runs");
    let _scratch_may_not_exist = std::fs::remove_dir_all(&home);
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

fn docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Objects by `Kind/name`.
fn by_name(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|o| {
            (
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["metadata"]["name"].as_str().unwrap_or("?")
                ),
                o,
            )
        })
        .collect()
}

/// `helm template` of the chart into istio-system with `sets`.
fn template(sets: &[&str]) -> BTreeMap<String, Value> {
    let chart = chart();
    let mut args = vec!["template", "ambit", chart.to_str().expect("utf-8"), "--namespace", "istio-system"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, out) = helm(&args);
    assert!(ok, "helm template {sets:?}: {out}");
    by_name(docs(&out))
}

fn container(objects: &BTreeMap<String, Value>) -> &Value {
    &objects["DaemonSet/ambit"]["spec"]["template"]["spec"]["containers"][0]
}

fn env(objects: &BTreeMap<String, Value>, name: &str) -> Option<String> {
    container(objects)["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str().map(String::from))
}

#[test]
fn the_chart_lints_and_renders_the_kustomize_base_s_objects() {
    let (ok, out) = helm(&["lint", "--strict", chart().to_str().expect("utf-8")]);
    assert!(ok && out.contains("1 chart(s) linted, 0 chart(s) failed"), "{out}");

    let rendered = template(&[]);
    let kustomized = {
        let mut c = Command::new(tools::kubectl());
        c.arg("kustomize").arg(root().join("daemonset/istiod"));
        let out = run_with_timeout(c, T).expect("kubectl kustomize");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        by_name(docs(&String::from_utf8_lossy(&out.stdout)))
    };
    assert_eq!(rendered.keys().collect::<Vec<_>>(), kustomized.keys().collect::<Vec<_>>());
    for (name, object) in &kustomized {
        assert_eq!(&rendered[name], object, "{name}: the chart's defaults differ from daemonset/istiod");
    }
}

#[test]
fn the_values_istio_users_set_land_where_they_should() {
    let objects = template(&[
        "hub=registry.example/mesh",
        "tag=1.2.3",
        "xdsAddress=https://istiod.mesh.svc:15012",
        "caAddress=",
        "multiCluster.clusterName=east",
        "failOpen=true",
        "dnsCapture=false",
        "logAsJson=false",
        "accessLogFormat=ztunnel",
        "metricsComponent=ztunnel",
        "resources.requests.memory=256Mi",
        "tolerations=null",
        "takeover=false",
        "updateStrategy.rollingUpdate.maxSurge=0",
        "updateStrategy.rollingUpdate.maxUnavailable=1",
        "cni.enabled=false",
        "resourceQuotas.enabled=true",
    ]);
    let c = container(&objects);
    assert_eq!(c["image"].as_str(), Some("registry.example/mesh/ambit:1.2.3"));
    assert_eq!(c["resources"]["requests"]["memory"].as_str(), Some("256Mi"));
    let cm = &objects["ConfigMap/ambit-node"]["data"];
    assert_eq!(cm["AMBIT_XDS_ADDRESS"].as_str(), Some("https://istiod.mesh.svc:15012"));
    assert_eq!(
        cm["AMBIT_CA_ADDRESS"].as_str(),
        Some("https://istiod.mesh.svc:15012"),
        "the CA defaults to xDS"
    );
    assert_eq!(cm["AMBIT_CLUSTER_ID"].as_str(), Some("east"));
    assert_eq!(cm["AMBIT_FAIL_OPEN"].as_str(), Some("true"));
    assert_eq!(cm["AMBIT_CNI_FAIL_OPEN"].as_str(), Some("true"));
    assert_eq!(cm["AMBIT_DNS_CAPTURE"].as_str(), Some("false"));
    assert_eq!(cm["AMBIT_LOG_FORMAT"].as_str(), Some("text"));
    assert_eq!(cm["AMBIT_ACCESS_LOG_FORMAT"].as_str(), Some("ztunnel"));
    assert_eq!(cm["AMBIT_METRICS_COMPONENT"].as_str(), Some("ztunnel"));
    let pod = &objects["DaemonSet/ambit"]["spec"]["template"]["spec"];
    assert!(pod["tolerations"].is_null() || pod["tolerations"].as_sequence().is_some_and(Vec::is_empty));
    let rolling = &objects["DaemonSet/ambit"]["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!((rolling["maxSurge"].as_u64(), rolling["maxUnavailable"].as_u64()), (Some(0), Some(1)));
    assert_eq!(env(&objects, "AMBIT_TAKEOVER").as_deref(), Some("false"));
    assert_eq!(env(&objects, "AMBIT_CNI").as_deref(), Some("false"));
    let quota = &objects["ResourceQuota/ambit-critical-pods"]["spec"];
    assert_eq!(
        quota["scopeSelector"]["matchExpressions"][0]["values"][0].as_str(),
        Some("system-node-critical")
    );
    // A required value left empty is an error that names it.
    let chart = chart();
    let (ok, out) = helm(&["template", "ambit", chart.to_str().expect("utf-8"), "--set", "xdsAddress="]);
    assert!(!ok && out.contains("xdsAddress is required"), "{out}");
}

#[test]
fn the_rendered_chart_is_accepted_by_the_real_api_server() {
    let bed = Bed::new("helm-apply");
    let cp = bed.node("cp");
    let kube = Kube::start(&bed, &cp);
    kube.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n").expect("namespace");
    let chart = chart();
    let (ok, rendered) = helm(&[
        "template",
        "ambit",
        chart.to_str().expect("utf-8"),
        "--namespace",
        "istio-system",
        "--set",
        "resourceQuotas.enabled=true",
    ]);
    assert!(ok, "{rendered}");
    let out = kube.apply(&rendered).unwrap_or_else(|e| panic!("server-side apply: {e:#}"));
    for object in [
        "serviceaccount/ambit",
        "clusterrole.rbac.authorization.k8s.io/ambit-node",
        "configmap/ambit-node",
        "daemonset.apps/ambit",
        "resourcequota/ambit-critical-pods",
    ] {
        assert!(out.contains(object), "{object} not applied: {out}");
    }
    assert_eq!(
        kube.get("daemonset", "istio-system", "ambit", "{.spec.updateStrategy.rollingUpdate.maxSurge}")
            .expect("get"),
        "1"
    );
}
