//! A complete set of the workload API's resources, and the version a resource is known by.

use std::collections::BTreeMap;

use crate::pb::istio::{security::Authorization, workload::Address};

/// Every resource, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub addresses: BTreeMap<String, Address>,
    pub authorizations: BTreeMap<String, Authorization>,
}

/// A resource's version: a hash of its encoding, so equal content means equal version.
pub fn version_of(bytes: &[u8]) -> String {
    let h = bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{h:016x}")
}
