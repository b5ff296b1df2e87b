//! Workload identity: SPIFFE IDs, certificates and keys (in memory only), and the manager that
//! obtains one certificate per identity present on the node from the CA and renews it.

pub mod caclient;
pub mod cert;
pub mod manager;
mod spiffe;

pub use cert::{CertSummary, WorkloadCert};
pub use manager::{CertState, IdentityManager, IdentitySettings};
pub use spiffe::{Identity, NotAnIdentity};
