//! `ambit node`: wires capture, the pod source, the proxy and the admin endpoints together
//! (`build`), then runs until SIGTERM/SIGINT or `/quitquitquit`, following the pod source and
//! retrying failed enrolments, and drains (`Node::run`). `view`: what the admin endpoints
//! show of it.

mod build;
mod view;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    signal::unix::Signal,
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{AdminState, Phase},
    config::NodeSettings,
    enroll::{self, EnrolledReport},
    inpod::PodManager,
    metrics::Metrics,
    state::StateStore,
};

/// How often enrolment of pods that failed is retried.
const RETRY: Duration = Duration::from_secs(2);
/// How often pods that left are checked for their last delivery to end, so their delivery
/// settings can be undone.
const SWEEP: Duration = Duration::from_secs(1);

pub async fn run(settings: NodeSettings) -> anyhow::Result<()> {
    match build::build(settings).await? {
        Some(node) => node.run().await,
        None => Ok(()),
    }
}

/// A built node: everything started, the first pod set enrolled.
struct Node {
    /// What the admin endpoints show; the settings.
    view: Arc<view::NodeView>,
    admin: Arc<AdminState>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    sigterm: Signal,
    sigint: Signal,
    state: Arc<StateStore>,
    pods: PodManager,
    source: enroll::Source,
    report_enrolled: Option<Arc<watch::Sender<Option<EnrolledReport>>>>,
    cni_stop: CancellationToken,
    /// `/config_dump` asking for the pods' part, which this loop owns.
    dump_requests: mpsc::Receiver<view::PodsRequest>,
}

impl Node {
    /// Follows the pod source until asked to stop, then drains.
    async fn run(self) -> anyhow::Result<()> {
        let Node {
            view,
            admin,
            metrics,
            shutdown,
            mut sigterm,
            mut sigint,
            state,
            mut pods,
            mut source,
            report_enrolled,
            cni_stop,
            mut dump_requests,
        } = self;
        let settings = &view.settings;
        let rules = &settings.enrolment;
        // --takeover: the previous proxy drains once this one is ready.
        if let Some(pid) = pods.capture().predecessor() {
            let root = pods.capture().pin_dir().to_path_buf();
            tokio::spawn(take_over(view.clone(), root, pid, shutdown.clone()));
        }
        let mut retry = tokio::time::interval(RETRY);
        let mut sweep = tokio::time::interval(SWEEP);
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
                    report(report_enrolled.as_deref(), &metrics, &pods);
                }
                _ = sweep.tick() => pods.tidy(),
                _ = retry.tick(), if pods.has_failures() => {
                    let desired = enroll::enrolled_pods(&source.meshes().borrow(), &settings.node_name, rules);
                    pods.reconcile(&desired).await;
                    report(report_enrolled.as_deref(), &metrics, &pods);
                }
                Some(reply) = dump_requests.recv() => {
                    // The asker may have given up waiting; nothing is lost.
                    let _asker_gone = reply.send(view::pods_part(&pods));
                }
                _ = sigterm.recv() => { tracing::info!("SIGTERM: draining"); break; }
                _ = sigint.recv() => { tracing::info!("SIGINT: draining"); break; }
                () = shutdown.cancelled() => break,
            }
        }

        admin.set_phase(Phase::Draining);
        // The pods' part of the dump is answered no more: say so at once, not after a wait.
        drop(dump_requests);
        // New pods' ADDs fail (closed) until the next proxy answers; the plugin stays chained.
        cni_stop.cancel();
        // Listeners close now: new connects of enrolled pods are refused (fail closed) or let
        // through (fail open) by the still-attached programs until the next proxy starts.
        pods.stop_accepting().await;
        let open = view.proxy.active_connections();
        let left = view.proxy.drain(settings.drain_timeout).await;
        tracing::info!(
            open_at_start = open,
            left_after_deadline = left,
            "drained; exiting (capture state stays pinned)"
        );
        shutdown.cancel();
        Ok(())
    }
}

/// `--takeover`: once this proxy is ready, tells the previous one to drain.
async fn take_over(view: Arc<view::NodeView>, root: PathBuf, predecessor: i32, stop: CancellationToken) {
    tokio::select! {
        ready = view.wait_ready() => if !ready { return },
        () = stop.cancelled() => return,
    }
    let handed =
        tokio::task::spawn_blocking(move || crate::capture::handover::succeed(&root, predecessor)).await;
    match handed {
        // Held until this process exits, as the lock of a proxy that started alone.
        Ok(Ok(lock)) => std::mem::forget(lock),
        Ok(Err(e)) => tracing::error!(predecessor, error = %e, "taking over from the previous proxy"),
        Err(e) => {
            tracing::error!(predecessor, error = %e, "taking over from the previous proxy: the task failed")
        }
    }
}

/// Tells the pod source (for the CNI server and the annotations) and the metrics what is
/// enrolled now.
fn report(reporter: Option<&watch::Sender<Option<EnrolledReport>>>, metrics: &Metrics, pods: &PodManager) {
    metrics.enrolled_pods.set(pods.enrolled_count() as i64);
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
