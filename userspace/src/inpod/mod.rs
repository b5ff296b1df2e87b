//! Enrolled pods: for each, the proxy's listeners inside the pod's netns, its inbound capture
//! attachment and its entries in the capture maps; enrolling, unenrolling and reconciling
//! them with what the pod source wants.

pub mod delivery;
pub mod dns;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
};

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    capture::{addr, Capture, CaptureError},
    identity::{Identity, IdentityManager},
    meshfile::PodSpec,
    os::{cookie::NetnsCookie, netns::Netns},
    pod::{Direction, PodCtx},
    proxy::Proxy,
};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("opening network namespace {path}: {source}")]
    Netns { path: std::path::PathBuf, source: std::io::Error },
    #[error("creating listeners in {path}: {source}")]
    Listeners { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

struct EnrolledPod {
    spec: PodSpec,
    identity: Option<Identity>,
    id: u32,
    netns: Arc<Netns>,
    tc: crate::capture::TcState,
    listeners: Vec<(Direction, SocketAddr)>,
    /// The DNS listener's addresses (UDP and TCP each), when DNS is captured.
    dns: Vec<SocketAddr>,
    /// The pod's namespace is prepared for delivery from the client's address.
    deliver_from_client: bool,
    /// What the data path holds of the pod; each of its connections holds it too.
    ctx: Arc<PodCtx>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Ports of the in-pod listeners, and how inbound connections are delivered.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub hbone: u16,
    /// `Some(mark)`: deliver from the client's address, with this mark (`delivery`).
    pub delivery_mark: Option<u32>,
}

pub struct PodManager {
    /// The cluster's name (`--cluster-id`), for the baggage of the pods' tunnels.
    cluster: String,
    capture: Capture,
    proxy: Proxy,
    identities: IdentityManager,
    ports: Ports,
    pods: BTreeMap<String, EnrolledPod>,
    /// Pods that should be enrolled but could not be, with the reason; retried on every
    /// reconcile.
    failed: BTreeMap<String, Failure>,
    /// Unenrolled pods whose delivery settings stay until their last delivered connection
    /// has closed (the application's replies to it need them): see [`PodManager::tidy`].
    leaving: Vec<Leaving>,
    next_id: u32,
    /// Answering the pods' DNS, when it is captured.
    dns: Option<Arc<dns::DnsServing>>,
}

/// An unenrolled pod whose namespace still has the delivery settings.
struct Leaving {
    key: String,
    ctx: Arc<PodCtx>,
    v4: bool,
    v6: bool,
}

/// One pod in the config dump.
#[derive(Debug, Serialize)]
pub struct PodDump {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub identity: Option<Identity>,
    pub ips: Vec<std::net::IpAddr>,
    pub netns: std::path::PathBuf,
    pub netns_cookie: NetnsCookie,
    pub pod_id: u32,
    pub inbound_attachment: crate::capture::TcState,
    pub listeners: Vec<(Direction, SocketAddr)>,
    /// The DNS listener (UDP and TCP on each address), when DNS is captured.
    pub dns: Vec<SocketAddr>,
    /// Inbound connections reach the application from the client's address.
    pub deliver_from_client: bool,
}

/// Why a wanted pod is not enrolled, and in which network namespace it was tried: a CNI ADD
/// for a new sandbox must not take the failure of an earlier one for its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub netns: std::path::PathBuf,
    pub reason: String,
}

/// Kernel state left from an earlier run that no current pod accounts for.
#[derive(Debug, Default, Serialize)]
pub struct StaleRemoved {
    pub enrolled: usize,
    pub pod_ips: usize,
    pub inbound_attachments: usize,
}

impl PodManager {
    /// `cluster`: the cluster's name, for the baggage pods' tunnels carry.
    pub fn new(
        capture: Capture,
        proxy: Proxy,
        identities: IdentityManager,
        ports: Ports,
        cluster: String,
    ) -> PodManager {
        PodManager {
            cluster,
            capture,
            proxy,
            identities,
            ports,
            pods: BTreeMap::new(),
            failed: BTreeMap::new(),
            leaving: Vec::new(),
            next_id: 1,
            dns: None,
        }
    }

    /// Gives each pod enrolled from now on a DNS listener (the capture steers its DNS there).
    pub fn serve_dns(&mut self, serving: dns::DnsServing) {
        self.dns = Some(Arc::new(serving));
    }

    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    pub fn capture_mut(&mut self) -> &mut Capture {
        &mut self.capture
    }

    /// Makes the enrolled set exactly `desired`: pods that left or changed are unenrolled,
    /// new ones enrolled. A pod that fails is logged and retried on the next call; the others
    /// proceed.
    pub async fn reconcile(&mut self, desired: &[PodSpec]) {
        let want: BTreeMap<String, &PodSpec> = desired.iter().map(|p| (p.key(), p)).collect();
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, pod)| want.get(*key).is_none_or(|spec| !spec.same_capture(&pod.spec)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            if let Some(pod) = self.pods.remove(&key) {
                self.unenroll(pod).await;
            }
        }
        self.failed.retain(|key, _| want.contains_key(key));
        for (key, spec) in want {
            if let Some(pod) = self.pods.get_mut(&key) {
                pod.spec = spec.clone();
                continue;
            }
            match self.enroll(spec) {
                Ok(pod) => {
                    tracing::info!(
                        pod = %key,
                        netns = %spec.netns.display(),
                        netns_cookie = %pod.netns.cookie(),
                        ips = ?spec.ips,
                        inbound = ?pod.tc,
                        "pod enrolled"
                    );
                    self.failed.remove(&key);
                    self.pods.insert(key, pod);
                }
                Err(e) => {
                    tracing::error!(pod = %key, error = %e, "cannot enrol pod; will retry");
                    self.failed.insert(key, Failure { netns: spec.netns.clone(), reason: e.to_string() });
                }
            }
        }
    }

    /// Whether some wanted pod is waiting for a retry.
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    fn enroll(&mut self, spec: &PodSpec) -> Result<EnrolledPod, EnrollError> {
        let netns = Arc::new(
            Netns::open(&spec.netns)
                .map_err(|source| EnrollError::Netns { path: spec.netns.clone(), source })?,
        );
        let cookie = netns.cookie();
        let identity = self
            .identities
            .enabled()
            .then(|| Identity::new(self.identities.trust_domain(), &spec.namespace, &spec.service_account));
        let hbone = identity.as_ref().map(|_| self.ports.hbone);
        let deliver_from_client = self.ports.delivery_mark.is_some_and(|mark| {
            let (v4, v6) = (spec.ips.iter().any(|ip| ip.is_ipv4()), spec.ips.iter().any(|ip| ip.is_ipv6()));
            match delivery::prepare(&netns, v4, v6, mark) {
                Ok(()) => true,
                Err(e) => {
                    // Captured all the same: only the address the application sees differs.
                    tracing::error!(
                        pod = %spec.key(),
                        error = %e,
                        "cannot prepare the pod to receive connections from the client's address; \
                         they arrive from the pod's own address"
                    );
                    false
                }
            }
        });
        let made =
            crate::pod::listeners::create(&netns, &spec.ips, self.ports.outbound, self.ports.inbound, hbone)
                .map_err(|source| EnrollError::Listeners { path: spec.netns.clone(), source })?;
        let dns = match &self.dns {
            Some(serving) => Some(
                serving
                    .listen(&netns, &spec.ips)
                    .map_err(|source| EnrollError::Listeners { path: spec.netns.clone(), source })?,
            ),
            None => None,
        };
        // Listeners first, so that capture never points at a socket that is not there yet.
        for l in &made {
            if let Some(key) = l.key(cookie) {
                self.capture.register_listener(key, &l.socket)?;
            }
        }
        for (key, sock) in dns.iter().flat_map(|d| d.keys(cookie)) {
            self.capture.register_listener(key, sock)?;
        }
        // Addresses before the inbound program: it drops SYNs to addresses it does not know.
        if let Err(e) = self.capture.add_pod_ips(cookie, &spec.ips) {
            self.rollback(cookie, &netns, &spec.interface);
            return Err(e.into());
        }
        let tc = match self.capture.attach_pod(&netns, &spec.interface) {
            Ok(tc) => tc,
            Err(e) => {
                self.rollback(cookie, &netns, &spec.interface);
                return Err(e.into());
            }
        };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        if let Err(e) = self.capture.enroll(cookie, id) {
            self.rollback(cookie, &netns, &spec.interface);
            return Err(e.into());
        }
        if let Some(id) = &identity {
            self.identities.acquire(id);
        }
        let app = spec.canonical_name().to_string();
        let baggage = crate::pod::baggage::baggage(&crate::pod::baggage::SourceBaggage {
            cluster: &self.cluster,
            namespace: &spec.namespace,
            pod: &spec.name,
            service: &app,
            version: spec.canonical_revision(),
        });
        let ctx = Arc::new(PodCtx {
            baggage,
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            service_account: spec.service_account.clone(),
            identity_uri: identity.as_ref().map(|i| i.to_string().into()),
            identity: identity.clone(),
            app,
            ips: spec.ips.iter().map(|ip| addr::canonical(*ip)).collect(),
            netns: netns.clone(),
            deliver_from_client,
            deliveries: Default::default(),
        });
        self.proxy.pods().insert(cookie, ctx.clone());
        let stop = CancellationToken::new();
        let mut tasks = Vec::with_capacity(made.len());
        let mut bound = Vec::with_capacity(made.len());
        let mut started = Ok(());
        for l in made {
            bound.push((l.direction, l.addr));
            match self.proxy.serve(ctx.clone(), l, stop.clone()) {
                Ok(task) => tasks.push(task),
                Err(e) => {
                    started = Err(e);
                    break;
                }
            }
        }
        let mut dns_addrs = Vec::new();
        if let (Ok(()), Some(serving), Some(listeners)) = (&started, &self.dns, dns) {
            dns_addrs = listeners.addrs.clone();
            match serving.serve(spec, netns.clone(), listeners, &stop) {
                Ok(more) => tasks.extend(more),
                Err(e) => started = Err(e),
            }
        }
        if let Err(e) = started {
            stop.cancel();
            self.proxy.pods().remove(cookie);
            if let Some(id) = &identity {
                self.identities.release(id);
            }
            self.rollback(cookie, &netns, &spec.interface);
            return Err(EnrollError::Listeners { path: spec.netns.clone(), source: e });
        }
        Ok(EnrolledPod {
            spec: spec.clone(),
            identity,
            id,
            netns,
            tc,
            listeners: bound,
            dns: dns_addrs,
            deliver_from_client,
            ctx,
            stop,
            tasks,
        })
    }

    /// Undoes a half-done enrolment; errors are logged, as the original error is the one
    /// that matters to the caller.
    fn rollback(&mut self, cookie: NetnsCookie, netns: &Netns, interface: &str) {
        if let Err(e) = self.capture.unenroll(cookie) {
            tracing::warn!(netns_cookie = %cookie, error = %e, "rollback: removing map entries");
        }
        if let Err(e) = self.capture.detach_pod(cookie, Some(netns), interface) {
            tracing::warn!(netns_cookie = %cookie, error = %e, "rollback: detaching inbound capture");
        }
        if let Err(e) = self.capture.remove_pod_ips(cookie) {
            tracing::warn!(netns_cookie = %cookie, error = %e, "rollback: removing the pod's addresses");
        }
    }

    /// Stops capturing a pod. Connections already proxied keep running to their end: they do
    /// not depend on the listeners or the maps any more.
    async fn unenroll(&mut self, pod: EnrolledPod) {
        let key = pod.spec.key();
        let cookie = pod.netns.cookie();
        // Outbound first: no new connect is rewritten towards listeners about to close.
        if let Err(e) = self.capture.unenroll(cookie) {
            tracing::error!(pod = %key, error = %e, "removing capture map entries");
        }
        if let Err(e) = self.capture.detach_pod(cookie, Some(&pod.netns), &pod.spec.interface) {
            tracing::error!(pod = %key, error = %e, "detaching inbound capture");
        }
        // Only once detached: the inbound program drops SYNs to addresses it does not know.
        if let Err(e) = self.capture.remove_pod_ips(cookie) {
            tracing::error!(pod = %key, error = %e, "removing the pod's addresses from capture");
        }
        pod.stop.cancel();
        self.proxy.pods().remove(cookie);
        for task in pod.tasks {
            if let Err(e) = task.await {
                tracing::warn!(pod = %key, error = %e, "accept loop ended abnormally");
            }
        }
        if let Some(id) = &pod.identity {
            self.identities.release(id);
        }
        if pod.deliver_from_client {
            let (v4, v6) =
                (pod.spec.ips.iter().any(|ip| ip.is_ipv4()), pod.spec.ips.iter().any(|ip| ip.is_ipv6()));
            self.leaving.push(Leaving { key: key.clone(), ctx: pod.ctx, v4, v6 });
            self.tidy();
        }
        tracing::info!(pod = %key, netns_cookie = %cookie, "pod unenrolled");
    }

    /// Undoes the delivery settings of unenrolled pods once none of their delivered
    /// connections is open, unless the pod came back.
    pub fn tidy(&mut self) {
        let Some(mark) = self.ports.delivery_mark else { return };
        let enrolled: BTreeSet<NetnsCookie> = self.pods.values().map(|p| p.netns.cookie()).collect();
        self.leaving.retain(|l| {
            if enrolled.contains(&l.ctx.netns.cookie()) {
                // Enrolled again: its settings are in use.
                return false;
            }
            if l.ctx.deliveries.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                return true;
            }
            if let Err(e) = delivery::undo(&l.ctx.netns, l.v4, l.v6, mark) {
                tracing::warn!(pod = %l.key, error = %e, "undoing the pod's delivery settings");
            }
            false
        });
    }

    /// Unenrolled pods whose delivery settings wait for their connections to close.
    pub fn leaving(&self) -> usize {
        self.leaving.len()
    }

    /// Removes kernel state that belongs to no enrolled pod: entries and attachments an
    /// earlier run left for pods that are gone or no longer enrolled.
    pub fn remove_stale(&mut self) -> Result<StaleRemoved, CaptureError> {
        // The maps and pins hold the kernel's numbers.
        let live: BTreeSet<u64> = self.pods.values().map(|p| p.netns.cookie().0).collect();
        let maps = self.capture.maps();
        let enrolled: BTreeSet<u64> = maps.enrolled()?.into_iter().map(|(c, _)| c).collect();
        let ips = maps.pod_ips()?;
        let stale_cookies: BTreeSet<u64> = enrolled
            .iter()
            .copied()
            .chain(ips.iter().map(|(_, c)| *c))
            .filter(|c| !live.contains(c))
            .collect();
        let removed = StaleRemoved {
            enrolled: enrolled.iter().filter(|c| !live.contains(c)).count(),
            pod_ips: ips.iter().filter(|(_, c)| !live.contains(c)).count(),
            inbound_attachments: 0,
        };
        for cookie in &stale_cookies {
            self.capture.unenroll(NetnsCookie(*cookie))?;
        }
        let stale_tc: Vec<u64> =
            self.capture.attached_pods()?.into_iter().filter(|c| !live.contains(c)).collect();
        for cookie in &stale_tc {
            // The pod's netns is unknown or gone: the tcx link goes with its pin.
            self.capture.detach_pod(NetnsCookie(*cookie), None, "")?;
        }
        for cookie in stale_cookies {
            self.capture.remove_pod_ips(NetnsCookie(cookie))?;
        }
        Ok(StaleRemoved { inbound_attachments: stale_tc.len(), ..removed })
    }

    /// Stops accepting in every pod (listeners close: new connects of enrolled pods are
    /// refused while no proxy runs) and leaves the pinned capture state in place for the next
    /// proxy. Used on shutdown.
    pub async fn stop_accepting(&mut self) {
        for pod in self.pods.values_mut() {
            pod.stop.cancel();
            for task in pod.tasks.drain(..) {
                if let Err(e) = task.await {
                    tracing::warn!(pod = %pod.spec.key(), error = %e, "accept loop ended abnormally");
                }
            }
        }
    }

    pub fn dump(&self) -> (Vec<PodDump>, BTreeMap<String, String>) {
        let pods = self
            .pods
            .values()
            .map(|p| PodDump {
                namespace: p.spec.namespace.clone(),
                name: p.spec.name.clone(),
                service_account: p.spec.service_account.clone(),
                identity: p.identity.clone(),
                ips: p.spec.ips.clone(),
                netns: p.spec.netns.clone(),
                netns_cookie: p.netns.cookie(),
                pod_id: p.id,
                inbound_attachment: p.tc,
                listeners: p.listeners.clone(),
                dns: p.dns.clone(),
                deliver_from_client: p.deliver_from_client,
            })
            .collect();
        (pods, self.failed.iter().map(|(k, f)| (k.clone(), f.reason.clone())).collect())
    }

    /// The enrolled pods, as `namespace/name`.
    /// The enrolled pods (`namespace/name` → network namespace they are captured in).
    pub fn enrolled_netns(&self) -> BTreeMap<String, std::path::PathBuf> {
        self.pods.iter().map(|(k, p)| (k.clone(), p.spec.netns.clone())).collect()
    }

    /// The pods that should be enrolled and are not, the netns that was tried, and why.
    pub fn failures(&self) -> &BTreeMap<String, Failure> {
        &self.failed
    }

    pub fn enrolled_count(&self) -> usize {
        self.pods.len()
    }
}
