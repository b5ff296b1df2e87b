//! One pod looked up fresh from the API, and whether it is to be captured: what a CNI ADD
//! needs before the pod's first packet, when the pod may not have reached the node's watch
//! yet (or the node proxy is not running and the plugin must decide by itself).

use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace as KubeNamespace, Pod};
use kube::{Api, Client, ResourceExt};

use crate::meshfile::{Enrolment, Label, Mesh, Namespace};

/// Why a lookup did not answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("pod {namespace}/{name} does not exist in the API")]
    NoPod { namespace: String, name: String },
    #[error("namespace {namespace} does not exist in the API")]
    NoNamespace { namespace: String },
    #[error("getting {what} from the API: {source}")]
    Api { what: String, source: kube::Error },
    #[error("{0:#}")]
    Client(anyhow::Error),
}

/// Why the node does not capture a pod: not a failure, an answer (a CNI ADD passes it
/// uncaptured).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotEnrolled {
    /// It shares the node's network namespace: capturing it would capture the node.
    #[error("host network")]
    HostNetwork,
    #[error("runs an Istio sidecar")]
    Sidecar,
    /// Succeeded or Failed: nothing of it runs any more.
    #[error("finished")]
    Finished,
    #[error("not enrolled (no {enrol} on the pod or its namespace, or {opt_out})")]
    NotLabelled { enrol: Label, opt_out: Label },
}

/// The pod and its namespace, as the API holds them now.
pub async fn fetch(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(Pod, KubeNamespace), LookupError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = match pods.get_opt(name).await {
        Ok(Some(p)) => p,
        Ok(None) => return Err(LookupError::NoPod { namespace: namespace.into(), name: name.into() }),
        Err(source) => return Err(LookupError::Api { what: format!("pod {namespace}/{name}"), source }),
    };
    let namespaces: Api<KubeNamespace> = Api::all(client.clone());
    let ns = match namespaces.get_opt(namespace).await {
        Ok(Some(n)) => n,
        Ok(None) => return Err(LookupError::NoNamespace { namespace: namespace.into() }),
        Err(source) => return Err(LookupError::Api { what: format!("namespace {namespace}"), source }),
    };
    Ok((pod, ns))
}

/// Whether the node captures `pod`: `Ok(())` it does, `Err(why not)` it never does. The
/// same rules as the pod watch: host-network, sidecar and finished pods are never captured;
/// the others by their labels and their namespace's.
pub fn decide(pod: &Pod, ns: &KubeNamespace, rules: &Enrolment) -> Result<(), NotEnrolled> {
    if let Some(why) = super::never_captured(pod) {
        return Err(why);
    }
    let namespace = pod.namespace().unwrap_or_default();
    let mut mesh = Mesh::default();
    mesh.namespaces
        .insert(namespace.clone(), Namespace { name: namespace.clone(), labels: ns.labels().clone() });
    let spec = super::pod_spec(pod, "", Vec::new());
    if rules.is_enrolled(&mesh, &spec) {
        Ok(())
    } else {
        Err(NotEnrolled::NotLabelled { enrol: rules.enrol.clone(), opt_out: rules.opt_out.clone() })
    }
}

/// [`fetch`] then [`decide`], with the credentials of a kubeconfig file: for the CNI plugin
/// when the node proxy cannot be asked.
pub async fn should_capture(
    kubeconfig: &Path,
    rules: &Enrolment,
    namespace: &str,
    name: &str,
) -> Result<Result<(), NotEnrolled>, LookupError> {
    let client = super::client_from(Some(kubeconfig)).await.map_err(LookupError::Client)?;
    let (pod, ns) = fetch(&client, namespace, name).await?;
    Ok(decide(&pod, &ns, rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_s_rules_decide() {
        let ns = |labels: serde_json::Value| -> KubeNamespace {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "demo", "labels": labels}}))
                .expect("ns")
        };
        let pod = |extra: serde_json::Value| -> Pod {
            let mut v = serde_json::json!({"metadata": {"name": "a", "namespace": "demo"}, "spec": {"containers": []}});
            if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                for (k, x) in e {
                    m.insert(k.clone(), x.clone());
                }
            }
            serde_json::from_value(v).expect("pod")
        };
        let rules = Enrolment::default();
        let ambient = ns(serde_json::json!({"istio.io/dataplane-mode": "ambient"}));
        let plain = ns(serde_json::json!({}));
        assert_eq!(decide(&pod(serde_json::json!({})), &ambient, &rules), Ok(()));
        assert!(decide(&pod(serde_json::json!({})), &plain, &rules).is_err());
        let opted_out = pod(
            serde_json::json!({"metadata": {"name": "a", "namespace": "demo", "labels": {"istio.io/dataplane-mode": "none"}}}),
        );
        assert!(decide(&opted_out, &ambient, &rules).is_err());
        let own_label = pod(
            serde_json::json!({"metadata": {"name": "a", "namespace": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        );
        assert_eq!(decide(&own_label, &plain, &rules), Ok(()));
        let host = pod(serde_json::json!({"spec": {"hostNetwork": true, "containers": []}}));
        assert_eq!(decide(&host, &ambient, &rules), Err(NotEnrolled::HostNetwork));
        assert_eq!(decide(&host, &ambient, &rules).map_err(|e| e.to_string()), Err("host network".into()));
    }
}
