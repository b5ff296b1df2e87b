//! Metrics computed at scrape time: the kernel's capture counters (read from the eBPF stats
//! map) and values other parts of the proxy already keep (xDS, certificates), turned into
//! metric families only when scraped.

use std::sync::Arc;

use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
    IntCounterVec, Opts,
};

use crate::capture::KernelStats;

/// `ambit_capture_events_total{event}` from the kernel's per-CPU counters.
pub struct KernelCollector {
    stats: Arc<KernelStats>,
    desc: Desc,
}

const KERNEL_HELP: &str =
    "Decisions of the eBPF programs (connect, sock_ops, TC ingress, tracing), by event: captured, bypassed, \
     refused or dropped while no proxy listened (fail_closed), events lost.";

impl KernelCollector {
    pub fn new(stats: Arc<KernelStats>) -> Self {
        let desc = Desc::new(
            "ambit_capture_events_total".into(),
            KERNEL_HELP.into(),
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
        let vec = IntCounterVec::new(Opts::new("ambit_capture_events_total", KERNEL_HELP), &["event"])
            .expect("valid metric");
        for (name, value) in ambit_common::stats::NAMES.iter().zip(values) {
            vec.with_label_values(&[name]).inc_by(value);
        }
        vec.collect()
    }
}

/// A family (or several) produced by a function at each scrape.
pub struct FnCollector {
    descs: Vec<Desc>,
    f: Box<dyn Fn() -> Vec<MetricFamily> + Send + Sync>,
}

impl FnCollector {
    /// `families`: (name, help, label names) of what `f` returns, for the registry's checks.
    pub fn new(
        families: &[(&str, &str, &[&str])],
        f: impl Fn() -> Vec<MetricFamily> + Send + Sync + 'static,
    ) -> FnCollector {
        let descs = families
            .iter()
            .map(|(name, help, labels)| {
                Desc::new(
                    (*name).to_string(),
                    (*help).to_string(),
                    labels.iter().map(|l| (*l).to_string()).collect(),
                    Default::default(),
                )
                .expect("valid descriptor")
            })
            .collect();
        FnCollector { descs, f: Box::new(f) }
    }
}

impl Collector for FnCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        (self.f)()
    }
}

fn gauge_family(
    name: &str,
    help: &str,
    label: Option<&str>,
    samples: &[(Option<String>, f64)],
) -> MetricFamily {
    let g = prometheus::GaugeVec::new(Opts::new(name, help), label.as_slice()).expect("valid metric");
    for (l, v) in samples {
        match l {
            Some(l) => g.with_label_values(&[l.as_str()]).set(*v),
            None => g.with_label_values(&[] as &[&str]).set(*v),
        }
    }
    g.collect().pop().expect("one family")
}

fn counter_family(name: &str, help: &str, value: u64) -> MetricFamily {
    let c = prometheus::IntCounter::new(name, help).expect("valid metric");
    c.inc_by(value);
    c.collect().pop().expect("one family")
}

const XDS_CONNECTED: (&str, &str) =
    ("ambit_xds_connected", "1 while the xDS stream to the control plane is up.");
const XDS_SYNCED: (&str, &str) = ("ambit_xds_synced", "1 once every subscribed type has been received.");
const XDS_CONNECTS: (&str, &str) =
    ("ambit_xds_connects_total", "xDS streams opened (the first and every reconnect).");
const XDS_ACKS: (&str, &str) = ("ambit_xds_acks_total", "xDS responses accepted.");
const XDS_NACKS: (&str, &str) = ("ambit_xds_nacks_total", "xDS responses refused (an invalid resource).");
const CERTS: (&str, &str) =
    ("ambit_certificates", "Workload certificates of this node's identities, by state.");
const CERT_EXPIRY: (&str, &str) =
    ("ambit_certificate_expiry_timestamp_seconds", "When each identity's current certificate expires.");

/// xDS and certificate health, from what the xDS client and the identity manager keep.
pub fn health(
    xds: Option<Arc<std::sync::Mutex<crate::xds::client::XdsStatus>>>,
    identities: crate::identity::IdentityManager,
) -> FnCollector {
    let families: [(&str, &str, &[&str]); 7] = [
        (XDS_CONNECTED.0, XDS_CONNECTED.1, &[]),
        (XDS_SYNCED.0, XDS_SYNCED.1, &[]),
        (XDS_CONNECTS.0, XDS_CONNECTS.1, &[]),
        (XDS_ACKS.0, XDS_ACKS.1, &[]),
        (XDS_NACKS.0, XDS_NACKS.1, &[]),
        (CERTS.0, CERTS.1, &["state"]),
        (CERT_EXPIRY.0, CERT_EXPIRY.1, &["identity"]),
    ];
    FnCollector::new(&families, move || {
        let mut out = Vec::new();
        if let Some(x) = &xds {
            let x = x.lock().unwrap_or_else(|p| p.into_inner()).clone();
            out.push(gauge_family(
                XDS_CONNECTED.0,
                XDS_CONNECTED.1,
                None,
                &[(None, f64::from(u8::from(x.connected)))],
            ));
            out.push(gauge_family(
                XDS_SYNCED.0,
                XDS_SYNCED.1,
                None,
                &[(None, f64::from(u8::from(x.synced)))],
            ));
            out.push(counter_family(XDS_CONNECTS.0, XDS_CONNECTS.1, x.connects));
            out.push(counter_family(XDS_ACKS.0, XDS_ACKS.1, x.acks));
            out.push(counter_family(XDS_NACKS.0, XDS_NACKS.1, x.nacks));
        }
        let certs = identities.dump();
        let mut by_state: std::collections::BTreeMap<String, f64> =
            ["requesting", "valid", "renewal_failing", "unavailable"]
                .iter()
                .map(|s| (s.to_string(), 0.0))
                .collect();
        let mut expiry = Vec::new();
        for c in &certs {
            let state = match c.state {
                crate::identity::CertState::Requesting => "requesting",
                crate::identity::CertState::Valid => "valid",
                crate::identity::CertState::RenewalFailing { .. } => "renewal_failing",
                crate::identity::CertState::Unavailable { .. } => "unavailable",
            };
            *by_state.entry(state.to_string()).or_default() += 1.0;
            if let Some(s) = &c.certificate {
                expiry.push((Some(c.identity.to_string()), s.expires_unix as f64));
            }
        }
        let states: Vec<(Option<String>, f64)> = by_state.into_iter().map(|(k, v)| (Some(k), v)).collect();
        out.push(gauge_family(CERTS.0, CERTS.1, Some("state"), &states));
        if !expiry.is_empty() {
            out.push(gauge_family(CERT_EXPIRY.0, CERT_EXPIRY.1, Some("identity"), &expiry));
        }
        out
    })
}
