//! `ambit node`: wires capture, the pod source, the proxy and the admin endpoints together
//! (`build`), then runs until SIGTERM/SIGINT or `/quitquitquit`, following the pod source and
//! retrying failed enrolments, and drains (`Node::run`). `view`: what the admin endpoints
//! show of it.

mod build;
mod view;

use std::{sync::Arc, time::Duration};

use tokio::{signal::unix::Signal, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    config::NodeSettings,
    enroll::{self, EnrolledReport},
    inpod::PodManager,
    state::StateStore,
};

/// How often enrolment of pods that failed is retried.
const RETRY: Duration = Duration::from_secs(2);

pub async fn run(settings: NodeSettings) -> anyhow::Result<()> {
    match build::build(settings).await? {
        Some(node) => node.run().await,
        None => Ok(()),
    }
}

/// A built node: everything started, the first pod set enrolled.
struct Node {
    /// The settings, the admin state and what the dump and readiness are made from.
    shown: view::Shown,
    shutdown: CancellationToken,
    sigterm: Signal,
    sigint: Signal,
    state: Arc<StateStore>,
    pods: PodManager,
    source: enroll::Source,
    report_enrolled: Option<Arc<watch::Sender<Option<EnrolledReport>>>>,
    cni_stop: CancellationToken,
}

impl Node {
    /// Follows the pod source until asked to stop, then drains.
    async fn run(self) -> anyhow::Result<()> {
        let Node {
            shown,
            shutdown,
            mut sigterm,
            mut sigint,
            state,
            mut pods,
            mut source,
            report_enrolled,
            cni_stop,
        } = self;
        let settings = &shown.settings;
        let rules = &settings.enrolment;
        // --takeover: the previous proxy drains once this one is ready.
        let mut predecessor = pods.capture().predecessor();
        let mut retry = tokio::time::interval(RETRY);
        // Certificates arrive and rotate on their own: refresh the dump and readiness.
        let mut refresh = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                changed = source.meshes().changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let mesh = source.meshes().borrow_and_update().clone();
                    if settings.xds.is_none() {
                        build::apply_mesh(&state, &mesh, &settings.origin());
                    }
                    pods.reconcile(&enroll::enrolled_pods(&mesh, &settings.node_name, rules)).await;
                    report(report_enrolled.as_deref(), &pods);
                }
                _ = refresh.tick() => pods.tidy(),
                _ = retry.tick(), if pods.has_failures() => {
                    let desired = enroll::enrolled_pods(&source.meshes().borrow(), &settings.node_name, rules);
                    pods.reconcile(&desired).await;
                    report(report_enrolled.as_deref(), &pods);
                }
                _ = sigterm.recv() => { tracing::info!("SIGTERM: draining"); break; }
                _ = sigint.recv() => { tracing::info!("SIGINT: draining"); break; }
                () = shutdown.cancelled() => break,
            }
            if shown.publish(&pods) {
                if let Some(pid) = predecessor.take() {
                    let root = pods.capture().pin_dir().to_path_buf();
                    tokio::task::spawn_blocking(move || {
                        match crate::capture::handover::succeed(&root, pid) {
                            // Held until this process exits, as the lock of a proxy that started alone.
                            Ok(lock) => std::mem::forget(lock),
                            Err(e) => {
                                tracing::error!(predecessor = pid, error = %e, "taking over from the previous proxy")
                            }
                        }
                    });
                }
            }
        }

        shown.admin.set_ready(Some("draining".into()));
        // New pods' ADDs fail (closed) until the next proxy answers; the plugin stays chained.
        cni_stop.cancel();
        // Listeners close now: new connects of enrolled pods are refused (fail closed) or let
        // through (fail open) by the still-attached programs until the next proxy starts.
        pods.stop_accepting().await;
        let open = shown.proxy.active_connections();
        let left = shown.proxy.drain(settings.drain_timeout).await;
        tracing::info!(
            open_at_start = open,
            left_after_deadline = left,
            "drained; exiting (capture state stays pinned)"
        );
        shutdown.cancel();
        Ok(())
    }
}

/// Tells the pod source (for the CNI server and the annotations) what is enrolled now.
fn report(reporter: Option<&watch::Sender<Option<EnrolledReport>>>, pods: &PodManager) {
    let Some(r) = reporter else { return };
    let failed =
        pods.failures().iter().map(|(k, f)| (k.clone(), (f.netns.clone(), f.reason.clone()))).collect();
    let now = EnrolledReport { pods: pods.enrolled_netns(), failed };
    r.send_if_modified(|held| {
        let differs = held.as_ref() != Some(&now);
        if differs {
            *held = Some(now);
        }
        differs
    });
}
