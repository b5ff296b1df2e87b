//! The Istio workload API over Delta ADS (`envoy.service.discovery.v3`): the node proxy's
//! client, the control plane's server, and the translation of a mesh file into the two
//! resource types (`istio.workload.Address`, `istio.security.Authorization`).

pub mod authorization;
pub mod client;
pub mod server;
pub mod translate;

use prost::Message;

use crate::pb::istio::{security::Authorization, workload::Address};

// The resource types are the protobuf vocabulary (`pb`); the state holds them by type too.
pub use crate::pb::{ADDRESS_TYPE, AUTHORIZATION_TYPE, TYPES};
pub use crate::state::version_of;

/// The cluster id workloads carry (Istio's default).
pub const CLUSTER_ID: &str = "Kubernetes";

pub use envoy_types::pb::google::protobuf::Any;

pub fn encode_address(a: &Address) -> Any {
    Any { type_url: ADDRESS_TYPE.into(), value: a.encode_to_vec() }
}

pub fn encode_authorization(a: &Authorization) -> Any {
    Any { type_url: AUTHORIZATION_TYPE.into(), value: a.encode_to_vec() }
}

#[cfg(test)]
mod authorization_tests;
