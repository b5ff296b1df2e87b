//! The pod vocabulary every layer above shares: the enrolled pod ([`PodCtx`]) and where it
//! is found by netns cookie ([`PodRegistry`]), a workload's SPIFFE [`Identity`], the
//! proxy's listeners in a pod's netns ([`PodListener`]) and the [`Direction`] they serve,
//! and the baggage that describes a pod on the wire.

pub mod baggage;
mod ctx;
mod identity;
mod leg;
pub mod listeners;
mod refusal;
mod registry;

pub use ctx::PodCtx;
pub use identity::{Identity, NotAnIdentity};
pub use leg::{Leg, UnknownLeg};
pub use listeners::PodListener;
pub use refusal::{flags, Refusal};
pub use registry::PodRegistry;

/// Which traffic a listener receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
    /// The HBONE listener on the pod's IP (mTLS tunnels from other proxies).
    Hbone,
}

impl Direction {
    /// As Istio's metrics and ztunnel's access log say it: a tunnel a peer opened to this
    /// pod is inbound.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound | Direction::Hbone => "inbound",
        }
    }
}
