//! Pod sandboxes the CNI plugin announced: a pod's network namespace and addresses straight
//! from the runtime's ADD, before its first process runs and before the kubelet writes its
//! IPs to the API. The pod watch enrols a registered pod from these (without waiting for
//! `/proc` or the status), and leaves out a pod whose sandbox the runtime deleted.
//!
//! Registrations are kept in a file next to the plugin's socket, so a restarted proxy still
//! knows the pods it was handed whose status has not caught up yet. An entry goes with its
//! pod: once the pod has been gone from the complete view for [`GRACE`] (so that a pod
//! registered before the watch saw it is not dropped).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// How long an entry outlives its pod's absence from the watch.
pub const GRACE: Duration = Duration::from_secs(60);

/// One sandbox the runtime set up (ADD).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// The pod as fetched at ADD: it stands in until the watch has it.
    #[serde(skip)]
    pub pod: Option<Pod>,
    /// Seconds since the epoch, when registered or last seen in the watch.
    pub seen: u64,
}

impl Sandbox {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A sandbox the runtime deleted (DEL): its pod is left out until a new ADD.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Deleted {
    pub key: String,
    pub seen: u64,
}

/// The registrations, by pod UID.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Registered {
    pub added: BTreeMap<String, Sandbox>,
    /// By pod UID, or by `namespace/name` when the runtime gave no UID.
    pub deleted: BTreeMap<String, Deleted>,
}

impl Registered {
    /// The registration of a pod (by UID), unless its sandbox was deleted since.
    pub fn sandbox(&self, uid: &str) -> Option<&Sandbox> {
        self.added.get(uid)
    }

    /// Whether the runtime deleted the pod's sandbox.
    pub fn is_deleted(&self, uid: &str, key: &str) -> bool {
        self.deleted.contains_key(uid) || self.deleted.contains_key(key)
    }
}

pub struct Sandboxes {
    state: Mutex<Registered>,
    /// Bumped on every change: the pod watch rebuilds its view.
    changed: watch::Sender<u64>,
    file: Option<PathBuf>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Sandboxes {
    /// Registrations kept in `file` (loaded now if it exists; `None`: in memory only).
    pub fn new(file: Option<PathBuf>) -> Sandboxes {
        let state = file
            .as_deref()
            .and_then(|f| match std::fs::read(f) {
                Ok(bytes) => match serde_json::from_slice::<Registered>(&bytes) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(file = %f.display(), error = %e, "unreadable sandbox registrations ignored; pods are found under /proc");
                        None
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "cannot read sandbox registrations; pods are found under /proc");
                    None
                }
            })
            .unwrap_or_default();
        Sandboxes { state: Mutex::new(state), changed: watch::channel(0).0, file }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registered> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn snapshot(&self) -> Registered {
        self.lock().clone()
    }

    /// ADD: the pod is enrolled from this sandbox.
    pub fn add(&self, uid: &str, mut sandbox: Sandbox) {
        sandbox.seen = now();
        self.change(|r| {
            r.deleted.remove(uid);
            r.deleted.remove(&sandbox.key());
            r.added.insert(uid.to_string(), sandbox);
        });
    }

    /// An ADD that failed: forget the registration (the runtime tears the sandbox down).
    pub fn forget(&self, uid: &str, netns: &Path) {
        self.change(|r| {
            if r.added.get(uid).is_some_and(|s| s.netns == netns) {
                r.added.remove(uid);
            }
        });
    }

    /// DEL: the pod is left out until its next ADD. `uid` may be empty (then by name).
    pub fn delete(&self, uid: &str, key: &str) {
        self.change(|r| {
            let by = if uid.is_empty() { key } else { uid };
            r.added.retain(|u, s| u != uid && !(uid.is_empty() && s.key() == key));
            r.deleted.insert(by.to_string(), Deleted { key: key.to_string(), seen: now() });
        });
    }

    /// Drops entries whose pod the complete view (`present`: UIDs and `namespace/name`s) has
    /// not held for [`GRACE`]; refreshes the others.
    pub fn expire(&self, present: impl Fn(&str, &str) -> bool) {
        let t = now();
        let fresh = |seen: u64| t.saturating_sub(seen) < GRACE.as_secs();
        self.change_if(|r| {
            let before = (r.added.len(), r.deleted.len());
            for (uid, s) in r.added.iter_mut() {
                if present(uid, &s.key()) {
                    s.seen = t;
                }
            }
            for (by, d) in r.deleted.iter_mut() {
                if present(by, &d.key) {
                    d.seen = t;
                }
            }
            r.added.retain(|_, s| fresh(s.seen));
            r.deleted.retain(|_, d| fresh(d.seen));
            before != (r.added.len(), r.deleted.len())
        });
    }

    fn change(&self, f: impl FnOnce(&mut Registered)) {
        self.change_if(|r| {
            f(r);
            true
        });
    }

    fn change_if(&self, f: impl FnOnce(&mut Registered) -> bool) {
        let snapshot = {
            let mut r = self.lock();
            if !f(&mut r) {
                return;
            }
            r.clone()
        };
        if let Some(file) = &self.file {
            if let Err(e) = save(file, &snapshot) {
                tracing::warn!(file = %file.display(), error = %e, "cannot save sandbox registrations; a restart finds these pods under /proc");
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Written whole or not at all: a temporary file renamed over the old one.
fn save(file: &Path, r: &Registered) -> std::io::Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(r).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(name: &str) -> Sandbox {
        Sandbox {
            namespace: "demo".into(),
            name: name.into(),
            container_id: "c".into(),
            netns: PathBuf::from(format!("/var/run/netns/{name}")),
            ips: vec!["10.1.0.2".parse().expect("ip")],
            pod: None,
            seen: 0,
        }
    }

    #[test]
    fn add_delete_and_add_again_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("ambit-sandboxes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("sandboxes.json");
        let s = Sandboxes::new(Some(file.clone()));
        let mut rx = s.subscribe();
        s.add("u1", sandbox("a"));
        assert!(rx.has_changed().expect("open"));
        rx.mark_unchanged();
        let r = s.snapshot();
        assert!(r.sandbox("u1").is_some() && !r.is_deleted("u1", "demo/a"));
        // A failed ADD of another namespace path leaves this one.
        s.forget("u1", Path::new("/elsewhere"));
        assert!(s.snapshot().sandbox("u1").is_some());
        s.delete("u1", "demo/a");
        let r = s.snapshot();
        assert!(r.sandbox("u1").is_none() && r.is_deleted("u1", "demo/a"));
        // A restarted proxy reads what was registered.
        let again = Sandboxes::new(Some(file.clone()));
        assert!(again.snapshot().is_deleted("u1", "demo/a"));
        again.add("u1", sandbox("a"));
        assert!(!again.snapshot().is_deleted("u1", "demo/a"));
        // Present in the view: kept; absent past the grace: dropped.
        again.expire(|uid, _| uid == "u1");
        assert!(again.snapshot().sandbox("u1").is_some());
        again.change(|r| r.added.values_mut().for_each(|s| s.seen = 0));
        again.expire(|_, _| false);
        assert!(again.snapshot().added.is_empty());
        // Without a UID, by name.
        again.add("u2", sandbox("b"));
        again.delete("", "demo/b");
        let r = again.snapshot();
        assert!(r.sandbox("u2").is_none() && r.is_deleted("other-uid", "demo/b"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
