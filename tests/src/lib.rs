//! ambit's test bed: nodes and pods as network namespaces on this machine, real programs in
//! them, the real `ambit` binary, and a teardown that runs on success, on failure and on
//! Ctrl-C. See tests/README.md.
//!
//! Every test that uses the bed needs root and fails (never skips) without it.

pub mod ambit;
pub mod apps;
pub mod attack;
pub mod bed;
pub mod bpf;
pub mod certs;
pub mod cleanup;
pub mod cni;
pub mod controlplane;
pub mod exec;
pub mod frames;
pub mod istio;
pub mod istiod;
#[cfg(feature = "peers")]
pub mod kubeapi;
pub mod mesh;
pub mod netns;
pub mod pods;
pub mod realkube;
pub mod tools;
#[cfg(feature = "peers")]
pub mod xdsfake;
#[cfg(feature = "peers")]
pub mod xdsload;

pub use ambit::{eventually, Ambit};
pub use bed::{Bed, Node, Pod};
pub use exec::{pod_command, run_with_timeout, Chat, Proc};
