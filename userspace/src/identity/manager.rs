//! One certificate per identity present on the node: obtained when the first pod with that
//! identity is enrolled, renewed at half-life (with jitter) and retried with jittered
//! exponential backoff, kept while valid when the CA is unreachable, and dropped — key
//! included — when the last such pod leaves. Keys exist in memory only.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rand::Rng;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};

use super::{cert::rfc3339, CertSource, CertSummary, Identity, WorkloadCert};

#[derive(Clone, Debug, Serialize)]
pub struct IdentitySettings {
    pub trust_domain: String,
    /// Validity requested for workload certificates.
    #[serde(serialize_with = "secs")]
    pub validity: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}s", d.as_secs()))
}

/// Where an identity's certificate stands.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CertState {
    Requesting,
    Valid,
    /// Renewal is failing; the current certificate (if any) is still presented.
    RenewalFailing {
        error: String,
        since: String,
    },
    /// No valid certificate: connections of this identity fail until the CA answers.
    Unavailable {
        error: String,
    },
}

struct Entry {
    refs: usize,
    cert: watch::Sender<Option<Arc<WorkloadCert>>>,
    state: Arc<Mutex<CertState>>,
    task: JoinHandle<()>,
}

struct Inner {
    ca: Option<Arc<dyn CertSource>>,
    settings: IdentitySettings,
    entries: Mutex<HashMap<Identity, Entry>>,
    /// Roots known before any certificate arrived (the CA's trust bundle file).
    bootstrap_roots: Vec<CertificateDer<'static>>,
    /// Certificates issued on this node so far: what readiness waits on changes with it.
    issued: watch::Sender<u64>,
}

/// Shared handle; cheap to clone.
#[derive(Clone)]
pub struct IdentityManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityManager")
    }
}

/// One identity's certificate as the config dump shows it.
#[derive(Debug, Serialize)]
pub struct CertDump {
    pub identity: Identity,
    pub pods: usize,
    #[serde(flatten)]
    pub state: CertState,
    pub certificate: Option<CertSummary>,
    /// ztunnel's fields, for `istioctl ztunnel-config certificates`.
    #[serde(rename = "certChain")]
    pub cert_chain: Vec<super::cert::ChainEntry>,
    #[serde(rename = "rootCerts")]
    pub root_certs: Vec<super::cert::ChainEntry>,
}

impl IdentityManager {
    /// `ca: None` means no mesh CA is configured: no certificates, no mTLS.
    pub fn new(
        ca: Option<Arc<dyn CertSource>>,
        settings: IdentitySettings,
        bootstrap_roots: Vec<CertificateDer<'static>>,
    ) -> Self {
        IdentityManager {
            inner: Arc::new(Inner {
                ca,
                settings,
                entries: Mutex::new(HashMap::new()),
                bootstrap_roots,
                issued: watch::channel(0).0,
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.ca.is_some()
    }

    pub fn trust_domain(&self) -> &str {
        &self.inner.settings.trust_domain
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pod with `identity` is now on the node.
    pub fn acquire(&self, identity: &Identity) {
        let Some(ca) = self.inner.ca.clone() else { return };
        let mut entries = self.entries();
        if let Some(e) = entries.get_mut(identity) {
            e.refs += 1;
            return;
        }
        let (tx, _) = watch::channel(None);
        let state = Arc::new(Mutex::new(CertState::Requesting));
        let task = tokio::spawn(refresh(
            ca,
            identity.clone(),
            self.inner.settings.validity,
            tx.clone(),
            state.clone(),
            self.inner.issued.clone(),
        ));
        entries.insert(identity.clone(), Entry { refs: 1, cert: tx, state, task });
    }

    /// A pod with `identity` left the node; the last one takes the certificate and key along.
    pub fn release(&self, identity: &Identity) {
        let mut entries = self.entries();
        let Some(e) = entries.get_mut(identity) else { return };
        e.refs -= 1;
        if e.refs == 0 {
            if let Some(e) = entries.remove(identity) {
                e.task.abort();
                tracing::info!(%identity, "no pod with this identity left on the node: certificate and key dropped");
            }
        }
    }

    /// The certificate to present for `identity` now, if there is a valid one.
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCert>> {
        let entries = self.entries();
        let cert = entries.get(identity)?.cert.borrow().clone()?;
        cert.valid_at(SystemTime::now()).then_some(cert)
    }

    /// Waits up to `timeout` for a valid certificate for `identity`.
    pub async fn wait(&self, identity: &Identity, timeout: Duration) -> Option<Arc<WorkloadCert>> {
        let mut rx = self.entries().get(identity)?.cert.subscribe();
        let wait = async {
            loop {
                if let Some(c) = rx.borrow_and_update().clone().filter(|c| c.valid_at(SystemTime::now())) {
                    return Some(c);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    /// Trust anchors: the bootstrap bundle and the roots of every current certificate.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        let mut roots = self.inner.bootstrap_roots.clone();
        for e in self.entries().values() {
            if let Some(c) = e.cert.borrow().as_ref() {
                for r in &c.roots {
                    if !roots.contains(r) {
                        roots.push(r.clone());
                    }
                }
            }
        }
        roots
    }

    /// Changes with every certificate issued or renewed on the node.
    pub fn issued(&self) -> watch::Receiver<u64> {
        self.inner.issued.subscribe()
    }

    /// Whether every identity on the node has a valid certificate (readiness).
    pub fn all_ready(&self) -> bool {
        let now = SystemTime::now();
        self.entries().values().all(|e| e.cert.borrow().as_ref().is_some_and(|c| c.valid_at(now)))
    }

    pub fn dump(&self) -> Vec<CertDump> {
        let mut out: Vec<CertDump> = self
            .entries()
            .iter()
            .map(|(id, e)| {
                let cert = e.cert.borrow();
                let (cert_chain, root_certs) = cert.as_ref().map(|c| c.chain_dump()).unwrap_or_default();
                CertDump {
                    identity: id.clone(),
                    pods: e.refs,
                    state: e.state.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    certificate: cert.as_ref().map(|c| c.summary()),
                    cert_chain,
                    root_certs,
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

/// ±10 % of `d`, so that proxies started together do not renew together.
fn jitter(d: Duration) -> Duration {
    let f = rand::rng().random_range(0.9..1.1);
    d.mul_f64(f)
}

async fn refresh(
    ca: Arc<dyn CertSource>,
    identity: Identity,
    validity: Duration,
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    state: Arc<Mutex<CertState>>,
    issued: watch::Sender<u64>,
) {
    let set = |s: CertState| *state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    // Retries start fast and back off exponentially, but never wait longer than a quarter of
    // the validity, so short-lived certificates are retried before they run out.
    let floor = Duration::from_millis(250);
    let cap = (validity / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut backoff = floor;
    let mut failing_since: Option<SystemTime> = None;
    loop {
        match ca.sign(&identity, validity).await {
            Ok(cert) => {
                let renewed = tx.borrow().is_some();
                tracing::info!(
                    %identity,
                    serial = %cert.serial,
                    not_after = %rfc3339(cert.not_after),
                    "{}",
                    if renewed { "certificate renewed" } else { "certificate issued" }
                );
                let refresh_at = cert.refresh_at();
                tx.send_replace(Some(Arc::new(cert)));
                set(CertState::Valid);
                issued.send_modify(|n| *n += 1);
                backoff = floor;
                failing_since = None;
                let wait = refresh_at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(jitter(wait)).await;
            }
            Err(e) => {
                let now = SystemTime::now();
                let since = *failing_since.get_or_insert(now);
                let current = tx.borrow().clone();
                let remaining = current.as_ref().and_then(|c| c.not_after.duration_since(now).ok());
                match remaining {
                    Some(left) => {
                        tracing::warn!(%identity, error = %e, expires_in_s = left.as_secs(), retry_in_ms = backoff.as_millis() as u64,
                            "certificate renewal failed; the current certificate is still valid");
                        set(CertState::RenewalFailing { error: e.to_string(), since: rfc3339(since) });
                    }
                    None => {
                        if current.is_some() {
                            tx.send_replace(None);
                        }
                        tracing::error!(%identity, error = %e, retry_in_ms = backoff.as_millis() as u64,
                            "no valid certificate: connections of this identity fail until the CA answers");
                        set(CertState::Unavailable { error: e.to_string() });
                    }
                }
                // Wake at expiry too, to stop presenting a certificate that ran out.
                let sleep = remaining.map_or(backoff, |left| backoff.min(left + Duration::from_millis(1)));
                tokio::time::sleep(jitter(sleep)).await;
                backoff = (backoff * 2).min(cap);
            }
        }
    }
}
