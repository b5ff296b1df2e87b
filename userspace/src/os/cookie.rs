//! The kernel's cookies, typed: a network namespace's and a socket's are both 64-bit numbers,
//! and mixing one up with the other would find the wrong pod or the wrong connection.

use std::{fmt, num::NonZeroU64};

use serde::Serialize;

/// A network namespace's cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`): how kernel
/// events and the capture maps name a pod's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NetnsCookie(pub u64);

/// A socket's cookie (`SO_COOKIE`, `bpf_get_socket_cookie`): how kernel trace events find
/// their connection. The kernel numbers sockets from 1, so an `Option` of one costs no more
/// than the cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SocketCookie(pub NonZeroU64);

impl SocketCookie {
    /// A cookie as the kernel's events carry it; `None` for 0 (no socket).
    pub fn new(raw: u64) -> Option<SocketCookie> {
        NonZeroU64::new(raw).map(SocketCookie)
    }

    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for NetnsCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for SocketCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
