//! The Istio workload API over Delta ADS (`envoy.service.discovery.v3`): the node proxy's
//! client, the control plane's server, and the translation of a mesh file into the two
//! resource types (`istio.workload.Address`, `istio.security.Authorization`).

pub mod authorization;
pub mod client;
pub mod server;
pub mod translate;

use prost::Message;

use crate::pb::istio::{security::Authorization, workload::Address};

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// Both types, in the order they are subscribed.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

/// The cluster id workloads carry (Istio's default).
pub const CLUSTER_ID: &str = "Kubernetes";

pub use envoy_types::pb::google::protobuf::Any;

pub fn encode_address(a: &Address) -> Any {
    Any { type_url: ADDRESS_TYPE.into(), value: a.encode_to_vec() }
}

pub fn encode_authorization(a: &Authorization) -> Any {
    Any { type_url: AUTHORIZATION_TYPE.into(), value: a.encode_to_vec() }
}

/// A resource's version: a hash of its encoding, so equal content means equal version.
pub fn version_of(bytes: &[u8]) -> String {
    let h = bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{h:016x}")
}

#[cfg(test)]
mod authorization_tests;
