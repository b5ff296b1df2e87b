//! DNS for the mesh, the answering side: `wire`, the messages; `resolve`, which names are the
//! mesh's (services and ServiceEntry hostnames); `handle`, one message decided (answered,
//! forwarded or dropped); `forward`, names the mesh does not have sent to the pod's
//! resolvers, which `upstream` reads from the pod's resolv.conf; `server`, a pod's UDP and
//! TCP listener; `metrics`, ztunnel's DNS families; `lookup`, endpoint hostnames the proxy
//! resolves with a pod's resolvers. The kernel side (steering a pod's port 53
//! to the listener) is the capture programs'; `inpod` starts a listener with each pod.

pub mod forward;
pub mod handle;
pub mod lookup;
pub mod metrics;
pub mod resolve;
pub mod server;
pub mod upstream;
pub mod wire;

use std::{path::PathBuf, time::Duration};

/// How the node answers its pods' DNS, and resolves endpoints known by name.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DnsSettings {
    /// Enrolled pods' DNS is captured and answered in the pod (`--dns-capture`).
    pub capture: bool,
    /// The listener's port on each enrolled pod's loopback, UDP and TCP.
    pub port: u16,
    pub answering: handle::Answering,
    /// How long each upstream resolver is given to answer a forwarded query.
    #[serde(with = "crate::units::humantime_ms")]
    pub upstream_timeout: Duration,
    /// Where the pods' processes are found (for their resolv.conf).
    pub proc_dir: PathBuf,
}
