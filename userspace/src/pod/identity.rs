//! Workload identities: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

use std::{fmt, str::FromStr};

use serde::Serialize;

/// A workload's SPIFFE identity, as Istio forms it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The form authorization policies use: without `spiffe://`.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a SPIFFE workload identity (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)"
)]
pub struct NotAnIdentity(pub String);

impl FromStr for Identity {
    type Err = NotAnIdentity;

    fn from_str(s: &str) -> Result<Identity, NotAnIdentity> {
        let bad = || NotAnIdentity(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse().expect("valid");
        assert_eq!(id, Identity::new("cluster.local", "demo", "client"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/client");
        assert_eq!(id.principal(), "cluster.local/ns/demo/sa/client");
        for bad in [
            "cluster.local/ns/demo/sa/client",
            "spiffe://cluster.local/ns/demo",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
