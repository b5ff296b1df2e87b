//! The local mesh file as a pod source: loaded at start (an invalid file stops the start with
//! the error), then watched; a valid change is published within a second or two, an invalid
//! one is logged with its line and field and the previous version stays in force.
//!
//! A file is read on every change, also while someone is still writing it: truncated at the
//! right line, a half-written file is valid YAML with fewer pods and no PeerAuthentication.
//! So a version is only applied once it is complete:
//! - a file replaced by a rename (how editors, `kubectl`'s ConfigMap volumes and careful
//!   writers update) is complete at once;
//! - a file written in place must have stayed unchanged for [`SETTLE`] first;
//! - a version that removes most of the pods, or a STRICT PeerAuthentication, must stay
//!   unchanged for [`SHRINK_HOLD`], is logged as a warning while held and as an error when
//!   applied.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::meshfile::{self, policy::MtlsMode, Checks, Mesh, MeshFileError};

/// How often the file's metadata is checked by default. Polling (rather than inotify) also
/// catches edits that replace the file by rename, bind-mounted ConfigMaps and the like.
pub const POLL: Duration = Duration::from_millis(250);
/// How long a file written in place must stay unchanged before it is read.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How long a version that removes most of the mesh (or STRICT mTLS) must stay unchanged.
pub const SHRINK_HOLD: Duration = Duration::from_secs(5);

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

/// What a new version removes that makes it suspect: most of the pods, or STRICT mTLS.
#[derive(Debug, PartialEq, Eq)]
pub struct Shrink {
    pub pods_before: usize,
    pub pods_removed: usize,
    /// `namespace/name` of the STRICT PeerAuthentications that are gone or weakened.
    pub strict_removed: Vec<String>,
}

impl std::fmt::Display for Shrink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "removes {} of {} pods", self.pods_removed, self.pods_before)?;
        if !self.strict_removed.is_empty() {
            write!(f, " and STRICT mTLS of {}", self.strict_removed.join(", "))?;
        }
        Ok(())
    }
}

/// `Some` when `new` removes more than half of `old`'s pods (two at least), or a STRICT
/// PeerAuthentication.
pub fn shrink(old: &Mesh, new: &Mesh) -> Option<Shrink> {
    let kept: BTreeSet<String> = new.pods.iter().map(|p| p.key()).collect();
    let pods_removed = old.pods.iter().filter(|p| !kept.contains(&p.key())).count();
    let strict = |m: &Mesh| -> BTreeSet<String> {
        m.peer_authentications
            .iter()
            .filter(|p| p.mode == MtlsMode::Strict)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    };
    let still = strict(new);
    let strict_removed: Vec<String> = strict(old).into_iter().filter(|k| !still.contains(k)).collect();
    let most = pods_removed >= 2 && pods_removed * 2 > old.pods.len();
    (most || !strict_removed.is_empty()).then_some(Shrink {
        pods_before: old.pods.len(),
        pods_removed,
        strict_removed,
    })
}

/// When the file on disk may be read: the rules of the module documentation, as a state
/// machine the poll loop feeds (and the unit tests drive).
#[derive(Debug)]
struct Settle {
    /// The version last read (applied or refused).
    read: Option<Stamp>,
    /// The version on disk, and since when it has been unchanged.
    seen: Option<Stamp>,
    since: Instant,
}

impl Settle {
    fn new(read: Option<Stamp>, now: Instant) -> Settle {
        Settle { read, seen: read, since: now }
    }

    /// Records what is on disk now; whether it is a new version complete enough to read.
    fn observe(&mut self, disk: Option<Stamp>, now: Instant) -> bool {
        if disk != self.seen {
            self.seen = disk;
            self.since = now;
        }
        let Some(d) = disk else { return false };
        if Some(d) == self.read {
            return false;
        }
        let replaced = self.read.is_none_or(|r| r.ino != d.ino);
        replaced || now.duration_since(self.since) >= SETTLE
    }

    /// How long the version on disk has been unchanged.
    fn stable_for(&self, now: Instant) -> Duration {
        now.duration_since(self.since)
    }

    fn mark_read(&mut self) {
        self.read = self.seen;
    }
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
        let mut settle = Settle::new(first_stamp, Instant::now());
        let mut last_error: Option<String> = None;
        // A shrinking version being held: what it removes, logged once.
        let mut held: Option<String> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(poll) => {}
            }
            let now = Instant::now();
            let ready = settle.observe(stamp(&path), now);
            // A refused version is re-checked even unchanged: what it refers to (a pod's
            // netns) may appear later. So is a held one, until its hold is over.
            if !ready && last_error.is_none() && held.is_none() {
                continue;
            }
            let mesh = match meshfile::load(&path, &Checks { node: node.as_deref() }) {
                Ok(mesh) => mesh,
                Err(e) => {
                    settle.mark_read();
                    held = None;
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(&msg) {
                        tracing::error!(error = %msg, "mesh file change refused; the previous version stays in force");
                        last_error = Some(msg);
                    }
                    continue;
                }
            };
            last_error = None;
            if **tx.borrow() == mesh {
                settle.mark_read();
                held = None;
                continue;
            }
            if let Some(s) = shrink(&tx.borrow(), &mesh) {
                let what = s.to_string();
                if settle.stable_for(now) < SHRINK_HOLD {
                    if held.as_deref() != Some(&what) {
                        tracing::warn!(
                            file = %path.display(),
                            change = %what,
                            hold_s = SHRINK_HOLD.as_secs(),
                            "mesh file change held: it must stay unchanged this long before it applies \
                             (a file still being written looks like this)"
                        );
                        held = Some(what);
                    }
                    continue;
                }
                tracing::error!(
                    file = %path.display(),
                    change = %what,
                    pods = mesh.pods.len(),
                    "mesh file change applied after its hold: it {what}"
                );
            }
            held = None;
            settle.mark_read();
            tracing::info!(file = %path.display(), pods = mesh.pods.len(), "mesh file reloaded");
            tx.send_replace(Arc::new(mesh));
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ino: u64, len: u64, mtime_ns: i128) -> Option<Stamp> {
        Some(Stamp { ino, len, mtime_ns })
    }

    #[test]
    fn a_replaced_file_is_read_at_once_and_one_written_in_place_once_settled() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut st = Settle::new(s(1, 100, 1), t0);
        assert!(!st.observe(s(1, 100, 1), at(250)), "unchanged");
        // Renamed over: a new inode is a complete file.
        assert!(st.observe(s(2, 120, 2), at(500)));
        st.mark_read();
        assert!(!st.observe(s(2, 120, 2), at(750)));
        // Written in place: growing, then still.
        assert!(!st.observe(s(2, 40, 3), at(1000)));
        assert!(!st.observe(s(2, 80, 4), at(1250)));
        assert!(!st.observe(s(2, 80, 4), at(2000)), "still for 0.75 s");
        assert!(st.observe(s(2, 80, 4), at(2250)), "still for 1 s");
        st.mark_read();
        assert!(!st.observe(s(2, 80, 4), at(2500)));
        // Gone: nothing to read; back by rename: read.
        assert!(!st.observe(None, at(2750)));
        assert!(st.observe(s(3, 80, 5), at(3000)));
        assert!(st.stable_for(at(3500)) >= Duration::from_millis(500));
    }

    fn mesh(yaml: &str) -> Mesh {
        let dir = std::env::temp_dir().join(format!("ambit-shrink-{}-{}", std::process::id(), yaml.len()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let f = dir.join("mesh.yaml");
        std::fs::write(&f, yaml).expect("write");
        let m = meshfile::load(&f, &Checks { node: None }).expect("valid");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        m
    }

    fn pods(n: usize) -> String {
        let mut y = String::from("namespaces:\n  - name: demo\npods:\n");
        for i in 0..n {
            y.push_str(&format!(
                "  - name: p{i}\n    namespace: demo\n    node: n1\n    ips: [10.1.0.{}]\n    netns: /proc/self/ns/net\n",
                i + 2
            ));
        }
        y
    }

    const STRICT: &str = "policies:\n  - apiVersion: security.istio.io/v1\n    kind: PeerAuthentication\n    metadata: {name: default, namespace: demo}\n    spec:\n      mtls:\n        mode: STRICT\n";

    #[test]
    fn removing_most_pods_or_strict_mtls_is_a_shrink_and_the_rest_is_not() {
        let four = mesh(&pods(4));
        assert_eq!(shrink(&four, &mesh(&pods(2))), None, "half is not most");
        let s = shrink(&four, &mesh(&pods(1))).expect("three of four");
        assert_eq!((s.pods_before, s.pods_removed), (4, 3));
        assert_eq!(s.to_string(), "removes 3 of 4 pods");
        assert_eq!(shrink(&mesh(&pods(1)), &mesh(&pods(0))), None, "one pod is no trend");
        assert_eq!(shrink(&four, &mesh(&pods(8))), None);
        let strict = mesh(&format!("{}{STRICT}", pods(4)));
        let s = shrink(&strict, &four).expect("STRICT gone");
        assert_eq!(s.strict_removed, vec!["demo/default".to_string()]);
        let permissive = mesh(&format!("{}{}", pods(4), STRICT.replace("STRICT", "PERMISSIVE")));
        assert!(shrink(&strict, &permissive).is_some(), "STRICT weakened");
        assert_eq!(shrink(&four, &strict), None, "adding STRICT");
    }
}
