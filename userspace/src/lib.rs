//! ambit: an eBPF-accelerated, sidecarless service-mesh node proxy.
//!
//! Module map (see ARCHITECTURE.md for the data flow):
//! - [`capture`]: the eBPF programs, maps and pins;
//! - [`inpod`]: enrolled pods — netns handles, in-pod listeners, enrol/unenrol/reconcile;
//! - [`enroll`]: pod sources (the local mesh file, the Kubernetes API);
//! - [`cni`]: the `ambit-cni` plugin, its install, and the node's socket it calls;
//! - [`meshfile`]: the mesh file format and its validation;
//! - [`proxy`]: accept loops, outbound and inbound handling, the relay;
//! - [`metrics`], [`admin`], [`telemetry`]: what operators see;
//! - [`probe`]: what the kernel offers, checked before anything is attached;
//! - [`config`], [`node`]: `ambit node` settings and wiring.

pub mod admin;
pub mod authz;
pub mod capture;
pub mod cni;
pub mod config;
pub mod controlplane;
pub mod crypto;
pub mod dns;
pub mod enroll;
pub mod errors;
pub mod heap;
pub mod identity;
pub mod inpod;
pub mod meshfile;
pub mod metrics;
pub mod node;
pub mod os;
pub mod pb;
pub mod pod;
pub mod probe;
pub mod profiling;
pub mod proxy;
pub mod sparse;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod units;
pub mod xds;
