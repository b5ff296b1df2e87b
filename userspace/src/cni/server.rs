//! The node's side of `ambit-cni`: a unix socket (root only) on which the plugin hands over
//! a pod's sandbox during the runtime's CNI ADD, and gets its answer once capture is
//! attached.
//!
//! ADD looks the pod up fresh in the API (the watch may not have it yet), decides as the
//! watch does, registers the sandbox with the pod source ([`Sandboxes`]), and waits until the
//! node reports the pod enrolled in exactly that network namespace. A refusal, a failed
//! enrolment or the deadline passing answers `failed`, and the registration is withdrawn, so
//! the runtime tears the sandbox down with nothing of it left captured. DEL withdraws the
//! pod and waits (briefly) until it is unenrolled.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Client, ResourceExt};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{watch, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::protocol::{Command, Outcome, Request, Response, MAX_LINE};
use crate::{
    enroll::{
        kube::{
            lookup,
            sandboxes::{Sandbox, Sandboxes},
        },
        EnrolledReport,
    },
    meshfile::Enrolment,
    os::netns::Netns,
};

/// How long a request may take to arrive once connected.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the API lookup of an ADD may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long DEL waits for the pod to be unenrolled.
const DEL_WAIT: Duration = Duration::from_secs(10);
/// Calls handled at once.
const CONCURRENCY: usize = 64;

/// What the server works with.
pub struct CniServer {
    pub client: Client,
    pub node: String,
    pub rules: Enrolment,
    pub sandboxes: Arc<Sandboxes>,
    pub report: watch::Receiver<Option<EnrolledReport>>,
    /// How long an ADD waits for capture.
    pub timeout: Duration,
}

/// The socket, bound; removed again on drop if it is still this one (a successor proxy may
/// have bound its own over it).
pub struct Bound {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), error = %e, "removing the CNI socket");
            }
        }
    }
}

/// Binds the socket at `path`, replacing a stale one; only root may connect.
pub fn bind(path: &Path) -> std::io::Result<Bound> {
    let context = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| context("creating the directory of", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "replacing the CNI socket of an earlier proxy"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(context("removing the stale", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| context("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| context("restricting", e))?;
    let ino = std::fs::metadata(path).map_err(|e| context("reading", e))?.ino();
    Ok(Bound { listener, path: path.to_path_buf(), ino })
}

impl CniServer {
    /// Serves until `stop`.
    pub async fn serve(self: Arc<Self>, bound: Bound, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        tracing::info!(socket = %bound.path.display(), "CNI plugin socket ready");
        loop {
            let conn = tokio::select! {
                () = stop.cancelled() => return,
                c = bound.listener.accept() => c,
            };
            match conn {
                Ok((stream, _)) => {
                    let Ok(slot) = slots.clone().acquire_owned().await else { return };
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.connection(stream).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting on the CNI socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(&self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read.take(MAX_LINE as u64));
        let response = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
            Err(_) => Response::new(Outcome::Failed, "no request within 10s"),
            Ok(Err(e)) => Response::new(Outcome::Failed, format!("reading the request: {e}")),
            Ok(Ok(_)) if !line.ends_with('\n') => {
                Response::new(Outcome::Failed, "incomplete or oversized request")
            }
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(request) => self.handle(&request).await,
                Err(e) => Response::new(Outcome::Failed, format!("not a request: {e}")),
            },
        };
        let mut out = serde_json::to_vec(&response).expect("a response serialises");
        out.push(b'\n');
        if let Err(e) = write.write_all(&out).await {
            tracing::warn!(error = %e, "answering the CNI plugin");
        }
    }

    /// One call of the plugin.
    pub async fn handle(&self, r: &Request) -> Response {
        let pod = format!("{}/{}", r.namespace, r.name);
        let response = match r.command {
            Command::Add => self.add(r).await,
            Command::Del => self.del(r).await,
            Command::Check => self.check(r).await,
            Command::Status => Response::new(Outcome::Ok, "ready"),
        };
        match response.outcome {
            Outcome::Failed => {
                tracing::warn!(command = ?r.command, pod = %pod, netns = %r.netns.display(), reason = %response.reason, "CNI call refused")
            }
            _ => {
                tracing::info!(command = ?r.command, pod = %pod, netns = %r.netns.display(), outcome = ?response.outcome, reason = %response.reason, "CNI call")
            }
        }
        response
    }

    /// The pod, checked to be the one on this node the runtime means.
    async fn pod(&self, r: &Request) -> Result<(Pod, k8s_openapi::api::core::v1::Namespace), WrongPod> {
        if r.namespace.is_empty() || r.name.is_empty() {
            return Err(WrongPod::NoPodArgs);
        }
        let (pod, ns) =
            tokio::time::timeout(LOOKUP_TIMEOUT, lookup::fetch(&self.client, &r.namespace, &r.name))
                .await
                .map_err(|_| WrongPod::Timeout(LOOKUP_TIMEOUT))??;
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or_default();
        if node != self.node {
            return Err(WrongPod::OtherNode { scheduled: node.to_string(), this: self.node.clone() });
        }
        let uid = pod.uid().unwrap_or_default();
        if !r.uid.is_empty() && r.uid != uid {
            return Err(WrongPod::Replaced { sandbox: r.uid.clone(), api: uid });
        }
        Ok((pod, ns))
    }

    async fn add(&self, r: &Request) -> Response {
        let key = format!("{}/{}", r.namespace, r.name);
        let (pod, ns) = match self.pod(r).await {
            Ok(p) => p,
            Err(why) => return Response::new(Outcome::Failed, why.to_string()),
        };
        if let Err(why) = lookup::decide(&pod, &ns, &self.rules) {
            return Response::new(Outcome::Skipped, why.to_string());
        }
        if let Err(why) = check_netns(&r.netns) {
            return Response::new(Outcome::Failed, why.to_string());
        }
        if r.ips.is_empty() {
            return Response::new(Outcome::Failed, "the plugins before ambit-cni gave the pod no address");
        }
        let uid = pod.uid().unwrap_or_default();
        let mut report = self.report.clone();
        self.sandboxes.add(
            &uid,
            Sandbox {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                container_id: r.container_id.clone(),
                netns: r.netns.clone(),
                ips: r.ips.clone(),
                pod: Some(pod),
                seen: 0,
            },
        );
        let deadline = Instant::now() + self.timeout;
        let outcome = loop {
            if let Some(rep) = &*report.borrow_and_update() {
                if rep.pods.get(&key) == Some(&r.netns) {
                    break Ok(());
                }
                // Only a failure in this sandbox's netns: an earlier sandbox's may still be
                // reported until the next reconcile.
                if let Some((_, why)) = rep.failed.get(&key).filter(|(netns, _)| *netns == r.netns) {
                    break Err(format!("enrolment failed: {why}"));
                }
            }
            match tokio::time::timeout_at(deadline, report.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break Err("the node proxy is shutting down".into()),
                Err(_) => break Err(format!("capture was not attached within {:?}", self.timeout)),
            }
        };
        match outcome {
            Ok(()) => Response::new(Outcome::Enrolled, "captured"),
            Err(why) => {
                self.sandboxes.forget(&uid, &r.netns);
                Response::new(Outcome::Failed, why)
            }
        }
    }

    async fn del(&self, r: &Request) -> Response {
        let key = format!("{}/{}", r.namespace, r.name);
        if r.namespace.is_empty() || r.name.is_empty() {
            return Response::new(Outcome::Ok, "not a Kubernetes pod");
        }
        self.sandboxes.delete(&r.uid, &key);
        let mut report = self.report.clone();
        let deadline = Instant::now() + DEL_WAIT;
        loop {
            let still = report.borrow_and_update().as_ref().is_some_and(|rep| match rep.pods.get(&key) {
                Some(netns) => r.netns.as_os_str().is_empty() || *netns == r.netns,
                None => false,
            });
            if !still {
                return Response::new(Outcome::Ok, "not captured");
            }
            match tokio::time::timeout_at(deadline, report.changed()).await {
                Ok(Ok(())) => {}
                _ => return Response::new(Outcome::Ok, "unenrolment still in progress"),
            }
        }
    }

    async fn check(&self, r: &Request) -> Response {
        let key = format!("{}/{}", r.namespace, r.name);
        if self.report.borrow().as_ref().is_some_and(|rep| rep.pods.get(&key) == Some(&r.netns)) {
            return Response::new(Outcome::Ok, "captured");
        }
        match self.pod(r).await {
            Ok((pod, ns)) => match lookup::decide(&pod, &ns, &self.rules) {
                Err(why) => Response::new(Outcome::Ok, why.to_string()),
                Ok(()) => Response::new(
                    Outcome::Failed,
                    format!("pod {key} should be captured in {} and is not", r.netns.display()),
                ),
            },
            Err(why) => Response::new(Outcome::Failed, why.to_string()),
        }
    }
}

/// Why an ADD or CHECK cannot go on with the pod the runtime names.
#[derive(Debug, thiserror::Error)]
enum WrongPod {
    #[error("no K8S_POD_NAMESPACE or K8S_POD_NAME in CNI_ARGS")]
    NoPodArgs,
    #[error("the API did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Lookup(#[from] lookup::LookupError),
    #[error("pod is scheduled on node {scheduled:?}, not this one ({this})")]
    OtherNode { scheduled: String, this: String },
    #[error("the sandbox is for pod UID {sandbox}, the API's pod is {api} (replaced)")]
    Replaced { sandbox: String, api: String },
}

/// Why the sandbox's `CNI_NETNS` cannot be captured.
#[derive(Debug, thiserror::Error)]
enum BadNetns {
    #[error("CNI_NETNS {}: not an absolute path", .0.display())]
    Relative(PathBuf),
    #[error("CNI_NETNS {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the node's network namespace: {0}")]
    Host(#[source] std::io::Error),
    /// Capturing the node's own namespace would capture everything on the node.
    #[error("CNI_NETNS {} is the node's own network namespace", .0.display())]
    NodeOwn(PathBuf),
}

/// The sandbox's namespace: a network namespace, and not the node's own.
fn check_netns(path: &Path) -> Result<(), BadNetns> {
    if !path.is_absolute() {
        return Err(BadNetns::Relative(path.to_path_buf()));
    }
    let ns = Netns::open(path).map_err(|source| BadNetns::Open { path: path.to_path_buf(), source })?;
    let host = Netns::host().map_err(BadNetns::Host)?;
    if ns.cookie() == host.cookie() {
        return Err(BadNetns::NodeOwn(path.to_path_buf()));
    }
    Ok(())
}
