//! The local mesh file as a pod source: loaded at start (an invalid file stops the start with
//! the error), then watched; a valid change is published within a second, an invalid one is
//! logged with its line and field and the previous version stays in force.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::meshfile::{self, Checks, Mesh, MeshFileError};

/// How often the file's metadata is checked by default. Polling (rather than inotify) also
/// catches edits that replace the file by rename, bind-mounted ConfigMaps and the like.
pub const POLL: Duration = Duration::from_millis(250);

/// Identity of a version of the file, without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// Loads the file now and starts watching it; returns a receiver holding the first version
/// and seeing every later valid one. `node`: the reading node, whose pods' network
/// namespaces must exist (`None` for the control plane).
pub fn watch(
    path: PathBuf,
    node: Option<String>,
    poll: Duration,
    stop: CancellationToken,
) -> Result<watch::Receiver<Arc<Mesh>>, MeshFileError> {
    let first_stamp = stamp(&path);
    let mesh = meshfile::load(&path, &Checks { node: node.as_deref() })?;
    let (tx, rx) = watch::channel(Arc::new(mesh));
    tokio::spawn(async move {
        let mut last = first_stamp;
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(poll) => {}
            }
            let now = stamp(&path);
            // A refused version is re-checked even unchanged: what it refers to (a pod's
            // netns) may appear later.
            if now == last && last_error.is_none() {
                continue;
            }
            last = now;
            match meshfile::load(&path, &Checks { node: node.as_deref() }) {
                Ok(mesh) => {
                    last_error = None;
                    if **tx.borrow() != mesh {
                        tracing::info!(file = %path.display(), pods = mesh.pods.len(), "mesh file reloaded");
                        tx.send_replace(Arc::new(mesh));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(&msg) {
                        tracing::error!(error = %msg, "mesh file change refused; the previous version stays in force");
                        last_error = Some(msg);
                    }
                }
            }
        }
    });
    Ok(rx)
}
