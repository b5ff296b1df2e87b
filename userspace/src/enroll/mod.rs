//! Pod sources: where the node proxy learns which pods exist on its node and which of them
//! are enrolled — the local mesh file (`local`) or the Kubernetes API (`kube`). Both publish
//! the same shape: a [`Mesh`] of namespaces (with labels) and pods, whose enrolled pods on
//! this node the proxy captures.

pub mod kube;
pub mod local;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use serde::Serialize;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::kube::KubeSettings;

use crate::meshfile::{Enrolment, Mesh, PodSpec};

/// Where `ambit node` learns its pods.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodSource {
    File {
        mesh_file: PathBuf,
        #[serde(with = "crate::units::humantime_ms")]
        poll: Duration,
    },
    Kubernetes(KubeSettings),
}

/// The pods of `node` that are enrolled in `mesh` under `rules`.
pub fn enrolled_pods(mesh: &Mesh, node: &str, rules: &Enrolment) -> Vec<PodSpec> {
    mesh.pods_on(node).filter(|p| rules.is_enrolled(mesh, p)).cloned().collect()
}

/// What the node has enrolled, reported after every reconcile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrolledReport {
    /// `namespace/name` → the network namespace it is captured in.
    pub pods: BTreeMap<String, PathBuf>,
    /// `namespace/name` → the network namespace tried, and why it could not be enrolled
    /// there (retried).
    pub failed: BTreeMap<String, (PathBuf, String)>,
}

/// The node's running pod source.
pub enum Source {
    File(watch::Receiver<Arc<Mesh>>),
    Kubernetes(kube::KubeSource),
}

impl Source {
    /// Starts the source. A mesh file is loaded now (an invalid one is an error); the
    /// Kubernetes API is only configured here and synced in [`Source::first_sync`].
    pub async fn start(
        settings: &PodSource,
        node: &str,
        rules: &Enrolment,
        stop: CancellationToken,
    ) -> anyhow::Result<Source> {
        match settings {
            PodSource::File { mesh_file, poll } => {
                { local::watch(mesh_file.clone(), Some(node.to_string()), *poll, stop) }
                    .map(Source::File)
                    .map_err(|e| anyhow::anyhow!("loading the mesh file: {e}"))
            }
            PodSource::Kubernetes(k) => {
                kube::start(k.clone(), rules.clone(), stop).await.map(Source::Kubernetes)
            }
        }
    }

    /// Every version of the pods (and namespaces) the source publishes.
    pub fn meshes(&mut self) -> &mut watch::Receiver<Arc<Mesh>> {
        match self {
            Source::File(rx) => rx,
            Source::Kubernetes(k) => &mut k.meshes,
        }
    }

    /// Returns once the source holds a complete view (a mesh file: at once), so that the
    /// first reconcile does not mistake "not listed yet" for "gone".
    pub async fn first_sync(&mut self) {
        if let Source::Kubernetes(k) = self {
            // An error means the source task ended (shutdown): nothing to wait for.
            let _stopped = k.synced.wait_for(|s| *s).await;
        }
    }

    /// Where the node reports the pods it has enrolled after every reconcile: the Kubernetes
    /// source annotates them for istiod, and the CNI plugin's ADD waits on it. `None` for a
    /// mesh file.
    pub fn enrolled_reporter(&self) -> Option<Arc<watch::Sender<Option<EnrolledReport>>>> {
        match self {
            Source::File(_) => None,
            Source::Kubernetes(k) => Some(k.enrolled.clone()),
        }
    }

    /// What the Kubernetes source has seen (config dump); `None` for a mesh file.
    pub fn kube_status(&self) -> Option<Arc<std::sync::Mutex<kube::KubeStatus>>> {
        match self {
            Source::File(_) => None,
            Source::Kubernetes(k) => Some(k.status.clone()),
        }
    }
}
