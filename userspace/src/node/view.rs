//! What the admin endpoints show of the node ([`admin::View`]): the config dump and readiness,
//! computed when asked, and the kernel switches. The pods and the capture maps belong to the
//! node loop, so their part of the dump is asked of it ([`pods_part`]).

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    admin::{self, KernelSwitches},
    capture::{klog::KernelLogLevel, maps::ConfigHandle, Adoption, CaptureError},
    config::NodeSettings,
    enroll::kube::KubeStatus,
    identity::IdentityManager,
    inpod::PodManager,
    proxy::Proxy,
    state::StateStore,
    trace::Tracer,
    xds::client::XdsStatus,
};

/// How long `/config_dump` waits for the node loop (busy enrolling a batch, say).
const LOOP_ANSWER: Duration = Duration::from_secs(5);

/// A request for the pods' part of the dump, answered by the node loop.
pub(super) type PodsRequest = oneshot::Sender<serde_json::Value>;

/// The node as the admin endpoints see it.
pub(super) struct NodeView {
    pub settings: NodeSettings,
    pub adoption: Adoption,
    pub proxy: Proxy,
    pub identities: IdentityManager,
    pub state: Arc<StateStore>,
    pub synced: watch::Receiver<bool>,
    pub xds_status: Option<Arc<std::sync::Mutex<XdsStatus>>>,
    pub pod_source_status: Option<Arc<std::sync::Mutex<KubeStatus>>>,
    pub pods: mpsc::Sender<PodsRequest>,
    pub kernel: Kernel,
}

impl NodeView {
    /// Ready once the first xDS sync arrived and every identity on the node has a valid
    /// certificate (the programs are attached and the first pod set enrolled by then).
    pub fn readiness(&self) -> Option<String> {
        if !*self.synced.borrow() {
            Some("waiting for the first xDS sync".to_string())
        } else if !self.identities.all_ready() {
            Some("waiting for workload certificates".to_string())
        } else {
            None
        }
    }

    /// Returns once the node is ready; `false` if it never can be (shutting down).
    pub async fn wait_ready(&self) -> bool {
        let mut synced = self.synced.clone();
        if synced.wait_for(|s| *s).await.is_err() {
            return false;
        }
        let mut issued = self.identities.issued();
        while self.readiness().is_some() {
            if issued.changed().await.is_err() {
                return false;
            }
        }
        true
    }

    async fn pods(&self) -> serde_json::Value {
        let (tx, rx) = oneshot::channel();
        if self.pods.send(tx).await.is_err() {
            return serde_json::json!({ "pods": "unavailable: the node is stopping" });
        }
        match tokio::time::timeout(LOOP_ANSWER, rx).await {
            Ok(Ok(part)) => part,
            Ok(Err(_)) => serde_json::json!({ "pods": "unavailable: the node is stopping" }),
            Err(_) => serde_json::json!({
                "pods": format!("unavailable: the node loop did not answer in {LOOP_ANSWER:?}")
            }),
        }
    }
}

impl admin::View for NodeView {
    /// ztunnel's shape at the top (what `istioctl ztunnel-config` reads), ambit's own detail
    /// under the other keys.
    fn config_dump(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let mut dump = self.pods().await;
            let xds = self.xds_status.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone());
            let pod_source =
                self.pod_source_status.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone());
            let mesh = self.state.read().dump();
            let (workloads, services, policies) = mesh.ztunnel();
            let rest = serde_json::json!({
                "settings": self.settings,
                "workloads": workloads,
                "services": services,
                "policies": policies,
                "certificates": self.identities.dump(),
                "hbone_pools": self.proxy.hbone_pools(),
                "active_connections": self.proxy.active_connections(),
                "mesh": mesh,
                "xds": xds,
                "pod_source": pod_source,
            });
            if let (Some(obj), serde_json::Value::Object(rest)) = (dump.as_object_mut(), rest) {
                obj.extend(rest);
                let capture = obj.entry("capture").or_insert_with(|| serde_json::json!({}));
                if let Some(capture) = capture.as_object_mut() {
                    capture.insert("adoption".into(), serde_json::json!(self.adoption));
                    capture.insert(
                        "unaccepted_original_destinations".into(),
                        serde_json::json!(self.proxy.pending_records()),
                    );
                }
            }
            dump
        })
    }

    fn not_ready(&self) -> Option<String> {
        self.readiness()
    }

    fn kernel(&self) -> Option<&dyn KernelSwitches> {
        Some(&self.kernel)
    }
}

/// The node loop's answer to [`PodsRequest`]: what only it holds, the pods and the maps.
pub(super) fn pods_part(pods: &PodManager) -> serde_json::Value {
    let (enrolled, failed) = pods.dump();
    let maps = pods.capture().maps();
    serde_json::json!({
        "capture": {
            "pin_dir": pods.capture().pin_dir(),
            "registered_listeners": maps.listeners().map(|l| l.len()).unwrap_or(0),
            "kubelet_probes_open": maps.probes_count(),
            "pending_connects": maps.pending_count(),
        },
        "pods": enrolled,
        "failed_pods": failed,
    })
}

/// The programs' config map and the reader of their events.
pub(super) struct Kernel {
    pub config: ConfigHandle,
    pub tracer: Option<Tracer>,
}

impl KernelSwitches for Kernel {
    fn log_level(&self) -> Result<KernelLogLevel, CaptureError> {
        let raw = self.config.get()?.log_level;
        // The programs log when `log_level >= level`: any higher value acts as debug.
        Ok(KernelLogLevel::from_raw(raw).unwrap_or(KernelLogLevel::Debug))
    }

    fn set_log_level(&self, level: KernelLogLevel) -> Result<(), CaptureError> {
        self.config.update(|c| c.log_level = level as u8).map(|_| ())
    }

    fn tracing(&self) -> Result<bool, CaptureError> {
        Ok(self.config.get()?.flags & ambit_common::maps::CONFIG_TRACE != 0)
    }

    fn set_tracing(&self, on: bool) -> Result<(), CaptureError> {
        use ambit_common::maps::CONFIG_TRACE;
        self.config
            .update(|c| c.flags = if on { c.flags | CONFIG_TRACE } else { c.flags & !CONFIG_TRACE })
            .map(|_| ())
    }

    fn tracer(&self) -> Option<Tracer> {
        self.tracer.clone()
    }
}
