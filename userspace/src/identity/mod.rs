//! Workload identity: SPIFFE IDs, certificates and keys (in memory only), and the manager that
//! obtains one certificate per identity present on the node from the CA and renews it.

pub mod caclient;
pub mod cert;
pub mod manager;
mod source;

pub use cert::{CertSummary, WorkloadCert};
pub use manager::{CertState, IdentityManager, IdentitySettings};
pub use source::{CertSource, Signing};
// The identity type is pod vocabulary (`pod`); the certificates for it are made here.
pub use crate::pod::{Identity, NotAnIdentity};
