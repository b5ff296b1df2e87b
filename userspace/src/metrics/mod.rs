//! Prometheus metrics (served on 15020 `/stats/prometheus`).
//!
//! - Istio's `istio_tcp_*` families with the labels its dashboards use ([`istio`]), reported
//!   by the source's proxy and by the destination's;
//! - ambit's own per-pod counters (`ambit_proxy_*`), authorization denials, enrolled pods;
//! - computed at scrape time ([`collectors`]): the kernel's capture counters, xDS and
//!   certificate health;
//! - the process (`process_*`) and the build (`istio_build`).

pub mod collectors;
pub mod istio;

use std::sync::Arc;

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

pub use istio::{Reporter, ServiceLabel, Side, SideCache, TcpLabels};

use crate::{
    capture::KernelStats,
    pod::{Direction, PodCtx, Refusal},
};

/// One direction of a relayed connection, counted in the pod's family and Istio's.
#[derive(Clone)]
pub struct ByteCounter {
    pod: IntCounter,
    istio: IntCounter,
}

impl ByteCounter {
    pub fn add(&self, n: u64) {
        self.pod.inc_by(n);
        self.istio.inc_by(n);
    }
}

/// Every counter one connection touches, for one label set: looked up once per label set,
/// not once per connection (a 19-label lookup costs as much as the rest of a connection's
/// bookkeeping).
struct Resolved {
    /// Shared by every connection of the label set (the access log reads them at close).
    labels: Arc<TcpLabels>,
    request: ByteCounter,
    response: ByteCounter,
    pod_opened: IntCounter,
    pod_closed: IntCounter,
    istio_opened: IntCounter,
    istio_closed: IntCounter,
    active: IntGauge,
}

/// The counters of a relayed connection. One pointer to its label set's: every open
/// connection keeps this, so copies of the byte counters would cost it 32 bytes more.
pub struct RelayCounters(Arc<Resolved>);

impl RelayCounters {
    /// From the side that connected to the destination.
    pub fn request(&self) -> &ByteCounter {
        &self.0.request
    }

    /// Back from the destination.
    pub fn response(&self) -> &ByteCounter {
        &self.0.response
    }

    /// The Istio labels the connection is counted under.
    pub fn labels(&self) -> &TcpLabels {
        &self.0.labels
    }
}

/// Label sets resolved so far; cleared when it grows past this (workloads come and go).
const RESOLVED_MAX: usize = 4096;

type ResolvedKey = (&'static str, String, String, TcpLabels);

pub struct Metrics {
    registry: Registry,
    opened: IntCounterVec,
    closed: IntCounterVec,
    failed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    active: IntGaugeVec,
    denied: IntCounterVec,
    istio: istio::IstioTcp,
    /// Every new connection looks its label set up here; keys are never attacker-chosen
    /// beyond what the mesh state says, so a fast keyed hash does.
    resolved:
        std::sync::Mutex<std::collections::HashMap<ResolvedKey, Arc<Resolved>, foldhash::fast::RandomState>>,
    /// Each workload's labels, made once per version of it.
    pub sides: istio::SideCache,
    pub enrolled_pods: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

const POD_LABELS: [&str; 3] = ["direction", "namespace", "pod"];

impl Metrics {
    pub fn new() -> Metrics {
        Self::with_component("ambit")
    }

    /// `component`: what `istio_build{component}` says (`ztunnel` keeps the version panel of
    /// Istio's ztunnel dashboard working).
    pub fn with_component(component: &str) -> Metrics {
        let registry = Registry::new();
        let opened = counter(
            &registry,
            "ambit_proxy_connections_opened_total",
            "Captured connections relayed by the proxy.",
            &POD_LABELS,
        );
        let closed = counter(
            &registry,
            "ambit_proxy_connections_closed_total",
            "Relayed connections that ended.",
            &POD_LABELS,
        );
        let failed = counter(
            &registry,
            "ambit_proxy_connections_failed_total",
            "Captured connections the proxy refused or could not connect upstream.",
            &["direction", "namespace", "pod", "reason"],
        );
        let sent = counter(
            &registry,
            "ambit_proxy_sent_bytes_total",
            "Bytes from the connecting side to the destination.",
            &POD_LABELS,
        );
        let received = counter(
            &registry,
            "ambit_proxy_received_bytes_total",
            "Bytes from the destination back to the connecting side.",
            &POD_LABELS,
        );
        let active = IntGaugeVec::new(
            Opts::new("ambit_proxy_connections_active", "Connections being relayed now."),
            &["direction"],
        )
        .expect("valid metric");
        registry.register(Box::new(active.clone())).expect("unique");
        let denied = counter(
            &registry,
            "ambit_authorization_denials_total",
            "Inbound connections denied by authorization policy: at accept, closed after a policy \
             change (when=open), or only reported by a dry-run policy (mode=dry_run).",
            &["namespace", "pod", "policy", "when", "mode"],
        );
        let istio = istio::IstioTcp::register(&registry);
        let enrolled_pods =
            IntGauge::new("ambit_enrolled_pods", "Pods whose traffic is captured.").expect("valid metric");
        registry.register(Box::new(enrolled_pods.clone())).expect("unique");
        let build = IntGaugeVec::new(
            Opts::new("istio_build", "The running build (Istio dashboards read the version here)."),
            &["component", "tag"],
        )
        .expect("valid metric");
        build.with_label_values(&[component, env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build)).expect("unique");
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("registered once");
        Metrics {
            registry,
            opened,
            closed,
            failed,
            sent,
            received,
            active,
            denied,
            istio,
            resolved: Default::default(),
            sides: Default::default(),
            enrolled_pods,
        }
    }

    /// Adds a collector computed at scrape time (kernel counters, health).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::error!(error = %e, "registering a metrics collector");
        }
    }

    /// Adds xDS and certificate health, computed on every scrape.
    pub fn register_health(
        &self,
        xds: Option<Arc<std::sync::Mutex<crate::xds::client::XdsStatus>>>,
        identities: crate::identity::IdentityManager,
    ) {
        self.register(Box::new(collectors::health(xds, identities)));
    }

    /// Adds the kernel-side counters, read from the eBPF stats map on every scrape.
    pub fn register_kernel_stats(&self, stats: Arc<KernelStats>) {
        self.register(Box::new(collectors::KernelCollector::new(stats)));
    }

    fn resolve(&self, d: Direction, pod: &PodCtx, labels: &TcpLabels) -> Arc<Resolved> {
        let key: ResolvedKey = (d.as_str(), pod.namespace.clone(), pod.name.clone(), labels.clone());
        let mut cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = cache.get(&key) {
            return r.clone();
        }
        if cache.len() >= RESOLVED_MAX {
            cache.clear();
        }
        let pod_labels = [key.0, key.1.as_str(), key.2.as_str()];
        let values = labels.values(crate::pod::flags::NONE);
        let r = Arc::new(Resolved {
            labels: Arc::new(labels.clone()),
            request: ByteCounter {
                pod: self.sent.with_label_values(&pod_labels),
                istio: self.istio.received.with_label_values(&values),
            },
            response: ByteCounter {
                pod: self.received.with_label_values(&pod_labels),
                istio: self.istio.sent.with_label_values(&values),
            },
            pod_opened: self.opened.with_label_values(&pod_labels),
            pod_closed: self.closed.with_label_values(&pod_labels),
            istio_opened: self.istio.opened.with_label_values(&values),
            istio_closed: self.istio.closed.with_label_values(&values),
            active: self.active.with_label_values(&[key.0]),
        });
        cache.insert(key, r.clone());
        r
    }

    pub fn connection_opened(&self, d: Direction, pod: &PodCtx, labels: &TcpLabels) -> RelayCounters {
        let r = self.resolve(d, pod, labels);
        r.pod_opened.inc();
        r.istio_opened.inc();
        r.active.inc();
        RelayCounters(r)
    }

    pub fn connection_closed(&self, counters: &RelayCounters) {
        let r = &counters.0;
        r.pod_closed.inc();
        r.istio_closed.inc();
        r.active.dec();
    }

    pub fn connection_failed(&self, d: Direction, pod: &PodCtx, reason: Refusal, labels: &TcpLabels) {
        self.failed
            .with_label_values(&[d.as_str(), pod.namespace.as_str(), pod.name.as_str(), reason.as_str()])
            .inc();
        self.istio.failed.with_label_values(&labels.values(reason.response_flags())).inc();
    }

    /// A denial by `policy` (`<namespace>/<name>`), of a new connection (`open` false) or an
    /// open one after a policy change; `dry_run`: reported only.
    pub fn authorization_denied(&self, pod: &PodCtx, policy: &str, open: bool, dry_run: bool) {
        let when = if open { "open" } else { "connect" };
        let mode = if dry_run { "dry_run" } else { "enforced" };
        self.denied.with_label_values(&[pod.namespace.as_str(), pod.name.as_str(), policy, when, mode]).inc();
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
