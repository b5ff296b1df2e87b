//! Where workload certificates come from: the seam between the identity manager and the
//! mesh CA, so that issuing and renewal run against a CA in the same process in tests.

use std::{future::Future, pin::Pin, time::Duration};

use super::{caclient::CaClient, caclient::CaError, Identity, WorkloadCert};

/// A certificate being signed.
pub type Signing<'a> = Pin<Box<dyn Future<Output = Result<WorkloadCert, CaError>> + Send + 'a>>;

/// Signs a fresh key for an identity, for `validity` (the CA may shorten it).
pub trait CertSource: Send + Sync + 'static {
    fn sign<'a>(&'a self, identity: &'a Identity, validity: Duration) -> Signing<'a>;
}

impl CertSource for CaClient {
    fn sign<'a>(&'a self, identity: &'a Identity, validity: Duration) -> Signing<'a> {
        Box::pin(CaClient::sign(self, identity, validity))
    }
}
