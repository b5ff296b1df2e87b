//! Prometheus metrics (served on 15020 `/stats/prometheus`).
//!
//! The proxy's connection counters are labelled with the enrolled pod they belong to and the
//! direction; the kernel-side capture counters are read from the eBPF stats map at scrape time.

use std::sync::Arc;

use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
    Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::{
    capture::KernelStats,
    inpod::Direction,
    proxy::{PodCtx, RelayCounters},
};

pub struct Metrics {
    registry: Registry,
    opened: IntCounterVec,
    closed: IntCounterVec,
    failed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    denied: IntCounterVec,
    pub enrolled_pods: IntGauge,
}

fn direction_label(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "outbound",
        Direction::Inbound | Direction::Hbone => "inbound",
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

const POD_LABELS: [&str; 3] = ["direction", "namespace", "pod"];

impl Metrics {
    pub fn new() -> Metrics {
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
        let denied = counter(
            &registry,
            "ambit_authorization_denials_total",
            "Inbound connections denied by authorization policy: at accept, closed after a policy \
             change (when=open), or only reported by a dry-run policy (mode=dry_run).",
            &["namespace", "pod", "policy", "when", "mode"],
        );
        let enrolled_pods =
            IntGauge::new("ambit_enrolled_pods", "Pods whose traffic is captured.").expect("valid metric");
        registry.register(Box::new(enrolled_pods.clone())).expect("unique");
        Metrics { registry, opened, closed, failed, sent, received, denied, enrolled_pods }
    }

    /// Adds the kernel-side counters, read from the eBPF stats map on every scrape.
    pub fn register_kernel_stats(&self, stats: Arc<KernelStats>) {
        self.registry.register(Box::new(KernelCollector::new(stats))).expect("registered once");
    }

    pub fn connection_opened(&self, d: Direction, pod: &PodCtx) -> RelayCounters {
        let labels = [direction_label(d), pod.namespace.as_str(), pod.name.as_str()];
        self.opened.with_label_values(&labels).inc();
        RelayCounters {
            sent: self.sent.with_label_values(&labels),
            received: self.received.with_label_values(&labels),
        }
    }

    pub fn connection_closed(&self, d: Direction, pod: &PodCtx) {
        self.closed.with_label_values(&[direction_label(d), pod.namespace.as_str(), pod.name.as_str()]).inc();
    }

    pub fn connection_failed(&self, d: Direction, pod: &PodCtx, reason: &str) {
        self.failed
            .with_label_values(&[direction_label(d), pod.namespace.as_str(), pod.name.as_str(), reason])
            .inc();
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

/// `ambit_capture_events_total{event}` from the kernel's per-CPU counters.
struct KernelCollector {
    stats: Arc<KernelStats>,
    desc: Desc,
}

impl KernelCollector {
    fn new(stats: Arc<KernelStats>) -> Self {
        let desc = Desc::new(
            "ambit_capture_events_total".into(),
            "Decisions of the eBPF capture programs (connect, sock_ops and TC ingress), by event.".into(),
            vec!["event".into()],
            Default::default(),
        )
        .expect("valid descriptor");
        KernelCollector { stats, desc }
    }
}

impl Collector for KernelCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let values = match self.stats.read() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "reading eBPF counters");
                return Vec::new();
            }
        };
        let vec = IntCounterVec::new(
            Opts::new(
                "ambit_capture_events_total",
                "Decisions of the eBPF capture programs (connect, sock_ops and TC ingress), by event.",
            ),
            &["event"],
        )
        .expect("valid metric");
        for (name, value) in ambit_common::stats::NAMES.iter().zip(values) {
            vec.with_label_values(&[name]).inc_by(value);
        }
        vec.collect()
    }
}
