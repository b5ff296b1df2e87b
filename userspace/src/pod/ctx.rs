//! A pod as the node proxy knows it once enrolled: names, identity, addresses, its netns.

use std::{net::IpAddr, sync::Arc};

use super::Identity;
use crate::os::netns::Netns;

/// A pod as the data path sees it.
#[derive(Debug)]
pub struct PodCtx {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// Its SPIFFE identity, when the mesh has a CA (mTLS); `None` without one.
    pub identity: Option<Identity>,
    /// `identity` as a URI, formatted once: every connection's record names it.
    pub identity_uri: Option<Arc<str>>,
    /// `app.kubernetes.io/name` or `app` label, else the pod name (telemetry).
    pub app: String,
    /// The W3C baggage its outbound tunnels carry ([`super::baggage`]), made once.
    pub baggage: Option<http::HeaderValue>,
    /// Canonical (IPv4-mapped addresses as IPv4).
    pub ips: Vec<IpAddr>,
    pub netns: Arc<Netns>,
    /// Inbound connections reach the application from the client's address (the pod's
    /// namespace is prepared for it, `inpod::delivery`); otherwise from the pod's own.
    pub deliver_from_client: bool,
    /// Connections delivered from the client's address and still open: their replies need
    /// the pod's delivery settings, which stay until this is zero.
    pub deliveries: std::sync::atomic::AtomicUsize,
}

impl PodCtx {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
