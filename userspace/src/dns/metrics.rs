//! The DNS proxy's metrics, as ztunnel's DNS proxy reports them: queries by type, protocol and
//! asking workload; forwarded queries, their failures and their time.

use prometheus::{core::Collector, HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// The labels of every family, in this order.
const LABELS: [&str; 4] =
    ["request_query_type", "request_protocol", "source_canonical_service", "source_canonical_revision"];

/// Cheap to clone: the families are shared.
#[derive(Clone)]
pub struct DnsMetrics {
    requests: IntCounterVec,
    upstream_requests: IntCounterVec,
    upstream_failures: IntCounterVec,
    upstream_duration: HistogramVec,
}

/// Who asked what, as the labels carry it.
#[derive(Clone, Debug)]
pub struct Asked<'a> {
    pub query_type: &'a str,
    pub protocol: &'static str,
    pub service: &'a str,
    pub revision: &'a str,
}

impl Asked<'_> {
    fn values(&self) -> [&str; 4] {
        [self.query_type, self.protocol, self.service, self.revision]
    }
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DnsMetrics {
    pub fn new() -> DnsMetrics {
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &LABELS).expect("valid metric definition")
        };
        DnsMetrics {
            requests: counter("istio_dns_requests_total", "DNS queries received from enrolled pods."),
            upstream_requests: counter(
                "istio_dns_upstream_requests_total",
                "DNS queries forwarded to a pod's upstream resolvers.",
            ),
            upstream_failures: counter(
                "istio_dns_upstream_failures_total",
                "Forwarded DNS queries no upstream resolver answered.",
            ),
            upstream_duration: HistogramVec::new(
                HistogramOpts::new(
                    "istio_dns_upstream_request_duration_seconds",
                    "Time the upstream resolvers took to answer a forwarded query.",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                &LABELS,
            )
            .expect("valid metric definition"),
        }
    }

    /// The families, for the process's registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.upstream_requests.clone()),
            Box::new(self.upstream_failures.clone()),
            Box::new(self.upstream_duration.clone()),
        ]
    }

    pub fn request(&self, asked: &Asked<'_>) {
        self.requests.with_label_values(&asked.values()).inc();
    }

    /// A forwarded query: answered after `seconds`, or not at all (`None`).
    pub fn forwarded(&self, asked: &Asked<'_>, seconds: Option<f64>) {
        let values = asked.values();
        self.upstream_requests.with_label_values(&values).inc();
        match seconds {
            Some(s) => self.upstream_duration.with_label_values(&values).observe(s),
            None => self.upstream_failures.with_label_values(&values).inc(),
        }
    }
}
