//! What the admin endpoints show of the node: the config dump (the part rebuilt after every
//! change, and the live part computed per request), readiness, and the kernel switches.

use std::sync::Arc;

use crate::{
    admin::{AdminState, LiveDump},
    capture::{klog::KernelLogLevel, Adoption},
    config::NodeSettings,
    enroll::kube::KubeStatus,
    identity::IdentityManager,
    inpod::PodManager,
    metrics::Metrics,
    proxy::Proxy,
    state::StateStore,
    xds::client::XdsStatus,
};

/// What the admin endpoints show, and what it is made from; published after every change.
pub(super) struct Shown {
    pub synced: tokio::sync::watch::Receiver<bool>,
    pub admin: Arc<AdminState>,
    pub metrics: Arc<Metrics>,
    pub settings: NodeSettings,
    pub adoption: Adoption,
    pub proxy: Proxy,
    pub identities: IdentityManager,
}

impl Shown {
    /// Publishes the dump and readiness; whether the proxy is ready.
    pub fn publish(&self, pods: &PodManager) -> bool {
        let (enrolled, failed) = pods.dump();
        self.metrics.enrolled_pods.set(enrolled.len() as i64);
        let maps = pods.capture().maps();
        let listeners = maps.listeners().map(|l| l.len()).unwrap_or(0);
        self.admin.set_dump(serde_json::json!({
            "settings": self.settings,
            "capture": {
                "pin_dir": pods.capture().pin_dir(),
                "adoption": self.adoption,
                "registered_listeners": listeners,
                "kubelet_probes_open": maps.probes_count(),
                "pending_connects": maps.pending_count(),
                "unaccepted_original_destinations": self.proxy.pending_records(),
            },
            "pods": enrolled,
            "failed_pods": failed,
        }));
        // Ready once the programs are attached (we are past that) and every identity on the
        // node has a valid certificate.
        let not_ready = if !*self.synced.borrow() {
            Some("waiting for the first xDS sync".to_string())
        } else if !self.identities.all_ready() {
            Some("waiting for workload certificates".to_string())
        } else {
            None
        };
        let ready = not_ready.is_none();
        self.admin.set_ready(not_ready);
        ready
    }
}

/// The part of the dump computed when asked: ztunnel's shape at the top (what `istioctl
/// ztunnel-config` reads), ambit's own detail under the other keys.
pub(super) fn live_dump(
    proxy: &Proxy,
    identities: &IdentityManager,
    state: &Arc<StateStore>,
    xds_status: Option<Arc<std::sync::Mutex<XdsStatus>>>,
    pod_source_status: Option<Arc<std::sync::Mutex<KubeStatus>>>,
) -> LiveDump {
    let (proxy, identities, state) = (proxy.clone(), identities.clone(), state.clone());
    Arc::new(move || {
        let xds = xds_status.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let mesh = state.read().dump();
        let (workloads, services, policies) = mesh.ztunnel();
        serde_json::json!({
            "workloads": workloads,
            "services": services,
            "policies": policies,
            "certificates": identities.dump(),
            "hbone_pools": proxy.hbone_pools(),
            "active_connections": proxy.active_connections(),
            "mesh": mesh,
            "xds": xds,
            "pod_source": pod_source_status.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        })
    })
}

/// `/logging?ebpf=` and `/tracing`: the programs' log level and kernel tracing, switched in
/// the programs' config map without a reload.
pub(super) fn kernel_switches(
    admin: &AdminState,
    kernel_config: &crate::capture::maps::ConfigHandle,
    settings: &NodeSettings,
) {
    let config = kernel_config.clone();
    let set = move |level: KernelLogLevel| {
        config.update(|c| c.log_level = level as u8).map(|_| ()).map_err(|e| e.to_string())
    };
    admin.set_kernel_log(Arc::new(set), settings.ebpf_log_level);
    let kernel_config = kernel_config.clone();
    let switch = move |on: bool| {
        use ambit_common::maps::CONFIG_TRACE;
        kernel_config
            .update(|c| c.flags = if on { c.flags | CONFIG_TRACE } else { c.flags & !CONFIG_TRACE })
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    admin.set_kernel_tracing(Arc::new(switch), settings.kernel_tracing);
}
