//! TLS for HBONE, as ztunnel speaks it: TLS 1.3 only, AES-GCM suites only, ALPN `h2`, no SNI,
//! no session resumption, client certificates mandatory, identities checked on both sides
//! (`verify`).

mod verify;

use std::sync::Arc;

use rustls::{
    client::ResolvesClientCert,
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert},
    sign::CertifiedKey,
    ClientConfig, ServerConfig, SignatureScheme,
};

pub use verify::{peer_identity, MeshClientVerifier, MeshServerVerifier};

use crate::identity::{Identity, IdentityManager};

/// ALPN of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
#[error("building a TLS configuration: {0}")]
pub struct TlsConfigError(#[from] rustls::Error);

/// Presents the current certificate of one identity (certificates rotate underneath).
#[derive(Debug)]
struct IdentityCert {
    manager: IdentityManager,
    identity: Identity,
}

impl ResolvesServerCert for IdentityCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.manager.current(&self.identity).map(|c| c.certified.clone())
    }
}

impl ResolvesClientCert for IdentityCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.manager.current(&self.identity).map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The HBONE server side for a pod with `identity`: presents its certificate, requires a
/// client certificate from this trust domain.
pub fn server_config(
    manager: &IdentityManager,
    identity: &Identity,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = crate::crypto::provider();
    let verifier =
        Arc::new(MeshClientVerifier::new(manager.clone(), provider.clone(), identity.trust_domain.clone()));
    let mut c = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(IdentityCert { manager: manager.clone(), identity: identity.clone() }));
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    c.session_storage = Arc::new(NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

/// The HBONE client side for a source workload `identity` talking to a server that must be
/// one of `expected`.
pub fn client_config(
    manager: &IdentityManager,
    identity: &Identity,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = crate::crypto::provider();
    let verifier = Arc::new(MeshServerVerifier::new(manager.clone(), provider.clone(), expected));
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(IdentityCert {
            manager: manager.clone(),
            identity: identity.clone(),
        }));
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    c.enable_sni = false;
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}
