//! The pod annotation that tells istiod a pod's traffic is captured:
//! `ambient.istio.io/redirection: enabled`. istiod serves a pod's workload with
//! `tunnel_protocol: HBONE` only when it carries it, so clients send HBONE to it; istio-cni
//! writes it once capture is in place and removes it when the pod leaves the mesh, and ambit
//! does the same.
//!
//! The annotator compares two views and patches the difference (through the pods' `status`
//! subresource, as istio-cni does, which is all the node proxy's role may write):
//! - the pods of this node the proxy has actually enrolled (reported after every reconcile);
//! - the annotation each pod of this node carries (from the pod watch).
//!
//! Failures are retried every few seconds; the views converge after a restart too.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Patch, PatchParams},
    Api, Client,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const REDIRECTION: &str = "ambient.istio.io/redirection";
const ENABLED: &str = "enabled";
/// Between rounds while something could not be patched.
const RETRY: Duration = Duration::from_secs(2);

/// `namespace/name` → the pod's current redirection annotation, if any.
pub type Annotations = BTreeMap<String, Option<String>>;

/// What a pod needs: `Some(true)` the annotation written, `Some(false)` removed.
fn wanted<V>(enrolled: &BTreeMap<String, V>, current: &Annotations) -> Vec<(String, bool)> {
    current
        .iter()
        .filter_map(|(pod, value)| {
            let on = value.as_deref() == Some(ENABLED);
            match (enrolled.contains_key(pod), on) {
                (true, false) => Some((pod.clone(), true)),
                (false, true) => Some((pod.clone(), false)),
                _ => None,
            }
        })
        .collect()
}

/// Runs until `stop`: keeps the pods' annotations in line with what is enrolled.
/// `enrolled` is `None` until the node's first reconcile: nothing is removed before the
/// proxy knows what it captures.
pub async fn run(
    client: Client,
    mut enrolled: watch::Receiver<Option<crate::enroll::EnrolledReport>>,
    mut current: watch::Receiver<Annotations>,
    stop: CancellationToken,
) {
    loop {
        let todo = match &*enrolled.borrow_and_update() {
            Some(e) => wanted(&e.pods, &current.borrow_and_update()),
            None => Vec::new(),
        };
        let mut failed = false;
        for (pod, on) in todo {
            let Some((ns, name)) = pod.split_once('/') else { continue };
            let api: Api<Pod> = Api::namespaced(client.clone(), ns);
            let value = if on { serde_json::Value::from(ENABLED) } else { serde_json::Value::Null };
            let patch = serde_json::json!({ "metadata": { "annotations": { REDIRECTION: value } } });
            match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    tracing::info!(pod = %pod, annotation = REDIRECTION, written = on, "pod annotation updated for istiod")
                }
                // Gone meanwhile: nothing left to annotate.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    failed = true;
                    tracing::warn!(pod = %pod, error = %e, "cannot update the pod's {REDIRECTION} annotation; retrying");
                }
            }
        }
        let retry = async {
            if failed {
                tokio::time::sleep(RETRY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            r = enrolled.changed() => if r.is_err() { return },
            r = current.changed() => if r.is_err() { return },
            () = retry => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolled_pods_get_the_annotation_and_others_lose_it() {
        let enrolled: BTreeMap<String, ()> =
            ["demo/a", "demo/b"].iter().map(|s| (s.to_string(), ())).collect();
        let current: Annotations = [
            ("demo/a", None),
            ("demo/b", Some("enabled")),
            ("demo/c", Some("enabled")),
            ("demo/d", None),
            ("demo/e", Some("pending")),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
        .collect();
        assert_eq!(wanted(&enrolled, &current), vec![("demo/a".into(), true), ("demo/c".into(), false)]);
    }
}
