//! Certificate checks of HBONE peers: the chain must lead to the mesh root (webpki, with the
//! right extended key usage), and the leaf's single SPIFFE URI SAN decides the rest — the
//! server checks the client's trust domain, the client checks the server is who it wanted.

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{cert::identity_of, Identity, IdentityManager};

/// Why a peer's certificate was refused, in words (rustls shows it inside its error).
#[derive(Debug)]
struct PeerRefused(String);

impl std::fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerRefused {}

fn other(msg: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(PeerRefused(msg)))))
}

/// Chain check against the current trust anchors.
fn verify_chain(
    manager: &IdentityManager,
    provider: &CryptoProvider,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<Identity, Error> {
    let roots = manager.roots();
    let anchors: Vec<_> = roots.iter().filter_map(|r| webpki::anchor_from_trusted_cert(r).ok()).collect();
    if anchors.is_empty() {
        return Err(other("no mesh root is known yet".into()));
    }
    let cert =
        webpki::EndEntityCert::try_from(end_entity).map_err(|e| other(format!("peer certificate: {e}")))?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::UnknownIssuer => Error::InvalidCertificate(CertificateError::UnknownIssuer),
        webpki::Error::CertExpired { .. } => Error::InvalidCertificate(CertificateError::Expired),
        other_err => other(format!("peer certificate chain: {other_err}")),
    })?;
    identity_of(end_entity).map_err(|e| other(e.to_string()))
}

/// The verified peer identity of an established connection (its leaf's SPIFFE ID).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    conn.peer_certificates().and_then(|c| c.first()).and_then(|leaf| identity_of(leaf).ok())
}

/// Server side: any workload of our trust domain may connect; which ones may reach which
/// workload is authorization's business.
#[derive(Debug)]
pub struct MeshClientVerifier {
    manager: IdentityManager,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl MeshClientVerifier {
    pub fn new(manager: IdentityManager, provider: Arc<CryptoProvider>, trust_domain: String) -> Self {
        MeshClientVerifier { manager, provider, trust_domain }
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id = verify_chain(
            &self.manager,
            &self.provider,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if id.trust_domain != self.trust_domain {
            return Err(other(format!("client {id} is not in trust domain {}", self.trust_domain)));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Client side: the server must chain to the mesh root and be one of the expected identities
/// (the destination workload's). There is no SNI and no DNS name to check.
#[derive(Debug)]
pub struct MeshServerVerifier {
    manager: IdentityManager,
    provider: Arc<CryptoProvider>,
    expected: Vec<Identity>,
}

impl MeshServerVerifier {
    pub fn new(manager: IdentityManager, provider: Arc<CryptoProvider>, expected: Vec<Identity>) -> Self {
        MeshServerVerifier { manager, provider, expected }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = verify_chain(
            &self.manager,
            &self.provider,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if !self.expected.contains(&id) {
            let wanted: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
            return Err(other(format!("server is {id}, expected {}", wanted.join(" or "))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
