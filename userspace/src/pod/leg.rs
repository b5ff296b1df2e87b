//! Which socket of a proxied connection a kernel event is about.

use serde::{Deserialize, Serialize};

/// A socket's role in the mesh, as `ambit trace` and `/trace` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Leg {
    /// The pod's own socket.
    App,
    /// HBONE between node proxies.
    Tunnel,
    /// The proxy's plaintext connection out of the pod.
    Upstream,
    /// The proxy handing an inbound connection to the pod.
    Delivery,
    /// Accepted from the network (plaintext, from outside the mesh).
    Inbound,
}

impl Leg {
    pub const ALL: [Leg; 5] = [Leg::App, Leg::Tunnel, Leg::Upstream, Leg::Delivery, Leg::Inbound];

    pub fn as_str(self) -> &'static str {
        match self {
            Leg::App => "app",
            Leg::Tunnel => "tunnel",
            Leg::Upstream => "upstream",
            Leg::Delivery => "delivery",
            Leg::Inbound => "inbound",
        }
    }

    /// Whether the socket crosses the network (its RTT and retransmits are the path's),
    /// rather than staying inside the node.
    pub fn crosses_network(self) -> bool {
        matches!(self, Leg::Tunnel | Leg::Upstream | Leg::Inbound)
    }
}

/// A name that is none of [`Leg::ALL`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}: one of {legs}", legs = Leg::ALL.map(Leg::as_str).join(", "))]
pub struct UnknownLeg(pub String);

impl std::str::FromStr for Leg {
    type Err = UnknownLeg;

    fn from_str(s: &str) -> Result<Leg, UnknownLeg> {
        Leg::ALL.into_iter().find(|l| l.as_str() == s).ok_or_else(|| UnknownLeg(s.to_string()))
    }
}

impl std::fmt::Display for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for l in Leg::ALL {
            assert_eq!(l.as_str().parse::<Leg>(), Ok(l));
            assert_eq!(serde_json::to_string(&l).expect("json"), format!("\"{l}\""));
        }
        assert!("sideways".parse::<Leg>().unwrap_err().to_string().contains("app, tunnel"));
    }
}
