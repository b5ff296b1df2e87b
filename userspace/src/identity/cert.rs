//! Workload certificates: key generation, CSRs, and parsing what the CA returns.
//!
//! Keys are generated in memory (ECDSA P-256) and never written anywhere.

use std::{sync::Arc, time::SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::{crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a key or CSR: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA returned no certificate")]
    EmptyChain,
    #[error("certificate {index} of the chain is not PEM: {detail}")]
    Pem { index: usize, detail: String },
    #[error("certificate {index} of the chain does not parse: {detail}")]
    Parse { index: usize, detail: String },
    #[error("the certificate is for {got}, not {wanted}")]
    WrongIdentity { wanted: String, got: String },
    #[error("{0}")]
    NoIdentity(String),
    #[error("the key does not fit the certificate: {0}")]
    Key(String),
}

/// A fresh key pair and a CSR for `identity`: empty subject, exactly one URI SAN.
pub fn csr(identity: &Identity) -> Result<(KeyPair, String), CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// The SPIFFE identity of a certificate: its only URI SAN.
pub fn identity_of(der: &[u8]) -> Result<Identity, CertError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CertError::NoIdentity(format!("certificate does not parse: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::NoIdentity(format!("bad SAN extension: {e}")))?
        .ok_or_else(|| CertError::NoIdentity("certificate has no SAN".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one.parse().map_err(|e: super::NotAnIdentity| CertError::NoIdentity(e.to_string())),
        other => Err(CertError::NoIdentity(format!("certificate has {} URI SANs, not one", other.len()))),
    }
}

/// A workload's certificate with its key, ready for rustls.
pub struct WorkloadCert {
    pub identity: Identity,
    /// What is presented in handshakes: the leaf and any intermediates (not the root).
    pub certified: Arc<CertifiedKey>,
    /// Trust anchors: the last certificate of the chain the CA returned.
    pub roots: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// What the config dump shows of a certificate: never the key.
#[derive(Clone, Debug, Serialize)]
pub struct CertSummary {
    pub identity: Identity,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// `not_after` in seconds since the epoch (metrics).
    #[serde(skip)]
    pub expires_unix: u64,
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// One certificate as ztunnel's dump lists it (`istioctl ztunnel-config certificates` reads
/// it): the PEM base64-encoded, the serial in decimal, validity in RFC 3339.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainEntry {
    pub pem: String,
    pub serial_number: String,
    pub valid_from: String,
    pub expiration_time: String,
}

fn chain_entry(der: &CertificateDer<'_>) -> Option<ChainEntry> {
    use base64::Engine as _;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::engine::general_purpose::STANDARD.encode(der.as_ref())
    );
    Some(ChainEntry {
        pem: base64::engine::general_purpose::STANDARD.encode(pem),
        serial_number: c.tbs_certificate.serial.to_string(),
        valid_from: rfc3339(to_system_time(c.validity().not_before)),
        expiration_time: rfc3339(to_system_time(c.validity().not_after)),
    })
}

pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

impl WorkloadCert {
    /// Assembles a certificate from the key generated for the CSR and the CA's PEM chain
    /// (leaf first, root last), checking that the leaf is for `wanted` and fits the key.
    pub fn from_chain(
        wanted: &Identity,
        key: &KeyPair,
        chain_pem: &[String],
        provider: &CryptoProvider,
    ) -> Result<WorkloadCert, CertError> {
        if chain_pem.is_empty() {
            return Err(CertError::EmptyChain);
        }
        let mut ders = Vec::with_capacity(chain_pem.len());
        for (index, pem) in chain_pem.iter().enumerate() {
            // The CA may put several certificates in one entry.
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
            let certs = certs.map_err(|e| CertError::Pem { index, detail: e.to_string() })?;
            if certs.is_empty() {
                return Err(CertError::Pem { index, detail: "no certificate in it".into() });
            }
            ders.extend(certs);
        }
        let leaf = &ders[0];
        let identity = identity_of(leaf)?;
        if identity != *wanted {
            return Err(CertError::WrongIdentity { wanted: wanted.to_string(), got: identity.to_string() });
        }
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(leaf)
            .map_err(|e| CertError::Parse { index: 0, detail: e.to_string() })?;
        let serial = parsed.raw_serial_as_string();
        let not_before = to_system_time(parsed.validity().not_before);
        let not_after = to_system_time(parsed.validity().not_after);
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key =
            provider.key_provider.load_private_key(key_der).map_err(|e| CertError::Key(e.to_string()))?;
        let roots = if ders.len() > 1 { vec![ders[ders.len() - 1].clone()] } else { Vec::new() };
        let presented: Vec<CertificateDer<'static>> =
            if ders.len() > 1 { ders[..ders.len() - 1].to_vec() } else { ders.clone() };
        let certified = CertifiedKey::new(presented, signing_key);
        certified.keys_match().map_err(|e| CertError::Key(e.to_string()))?;
        Ok(WorkloadCert { identity, certified: Arc::new(certified), roots, serial, not_before, not_after })
    }

    /// The presented chain (leaf first) and the roots, as ztunnel's dump lists them.
    pub fn chain_dump(&self) -> (Vec<ChainEntry>, Vec<ChainEntry>) {
        (
            self.certified.cert.iter().filter_map(chain_entry).collect(),
            self.roots.iter().filter_map(chain_entry).collect(),
        )
    }

    pub fn summary(&self) -> CertSummary {
        CertSummary {
            identity: self.identity.clone(),
            serial: self.serial.clone(),
            not_before: rfc3339(self.not_before),
            not_after: rfc3339(self.not_after),
            expires_unix: self.not_after.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        }
    }

    /// Whether the certificate can still be presented at `now`.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }

    /// The moment to renew: half-way through the validity.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life / 2
    }
}
