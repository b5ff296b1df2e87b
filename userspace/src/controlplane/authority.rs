//! The embedded CA's signing side: the root (created on first start and kept in the state
//! directory, or the user's own root, or an intermediate chained to it), CSR checks, and
//! issuing workload certificates.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: {source}")]
    Cert { what: String, source: rcgen::Error },
    #[error("{0}")]
    Config(String),
}

/// Why a CSR was refused; each maps to a gRPC status in the service.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrRefusal {
    #[error("malformed CSR: {0}")]
    Malformed(String),
    #[error("the CSR must carry exactly one URI SAN (the SPIFFE identity), it has {0}")]
    UriSanCount(usize),
    #[error("the CSR carries other SANs besides the SPIFFE identity ({0})")]
    OtherSans(String),
    #[error("the CSR's URI SAN is not a SPIFFE workload identity: {0}")]
    NotSpiffe(String),
    #[error("identity {identity} is outside this mesh's trust domain {trust_domain}")]
    TrustDomain { identity: String, trust_domain: String },
    #[error("unsupported key in the CSR ({0}); use ECDSA P-256 or P-384")]
    Key(String),
}

/// The signing certificate and key, with the PEM chain from it up to the root.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Issuer first, root last (just the root when the root signs).
    chain: Vec<String>,
    trust_domain: String,
}

/// Where a CA's material comes from.
pub enum Source {
    /// Created on first start in (and loaded afterwards from) the state directory.
    StateDir(PathBuf),
    /// The user's root signs directly.
    Root { cert: PathBuf, key: PathBuf },
    /// An intermediate signs; the chain file holds its issuers up to the user's root.
    Intermediate { cert: PathBuf, key: PathBuf, chain: PathBuf },
}

const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";
/// A generated root lives ten years.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn read(path: &Path) -> Result<String, AuthorityError> {
    fs::read_to_string(path).map_err(|source| AuthorityError::Io { path: path.to_path_buf(), source })
}

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> AuthorityError {
    let what = what.into();
    move |source| AuthorityError::Cert { what, source }
}

/// Writes `data` to a new file readable by its owner only.
fn write_private(path: &Path, data: &str) -> Result<(), AuthorityError> {
    let io = |source| AuthorityError::Io { path: path.to_path_buf(), source };
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

impl Authority {
    pub fn load(source: &Source, trust_domain: &str) -> Result<Authority, AuthorityError> {
        match source {
            Source::StateDir(dir) => Self::load_or_create(dir, trust_domain),
            Source::Root { cert, key } => {
                let cert_pem = read(cert)?;
                let key = KeyPair::from_pem(&read(key)?).map_err(cert_err(format!("{}", key.display())))?;
                Self::from_issuer(&cert_pem, key, vec![cert_pem.clone()], trust_domain)
            }
            Source::Intermediate { cert, key, chain } => {
                let cert_pem = read(cert)?;
                let key = KeyPair::from_pem(&read(key)?).map_err(cert_err(format!("{}", key.display())))?;
                let mut pems = vec![cert_pem.clone()];
                pems.extend(split_pem(&read(chain)?));
                if pems.len() < 2 {
                    return Err(AuthorityError::Config(format!(
                        "{}: no certificate in the chain file (it must end with the root)",
                        chain.display()
                    )));
                }
                Self::from_issuer(&cert_pem, key, pems, trust_domain)
            }
        }
    }

    fn from_issuer(
        cert_pem: &str,
        key: KeyPair,
        chain: Vec<String>,
        trust_domain: &str,
    ) -> Result<Authority, AuthorityError> {
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(cert_err("the signing certificate"))?;
        Ok(Authority { issuer, chain, trust_domain: trust_domain.to_string() })
    }

    /// The state directory's root, created (owner-only) when absent.
    fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Authority, AuthorityError> {
        let io = |source| AuthorityError::Io { path: dir.to_path_buf(), source };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
        if !cert_path.exists() {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(cert_err("generating the root key"))?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, trust_domain);
            dn.push(DnType::CommonName, format!("ambit root CA ({trust_domain})"));
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::minutes(5);
            params.not_after = now + ROOT_VALIDITY;
            params.serial_number = Some(random_serial());
            let cert = params.self_signed(&key).map_err(cert_err("self-signing the root"))?;
            // Key first: a certificate without its key would be a root nobody can sign with.
            write_private(&key_path, &key.serialize_pem())?;
            write_private(&cert_path, &cert.pem())?;
            tracing::info!(path = %cert_path.display(), "created a new mesh root CA");
        }
        let cert_pem = read(&cert_path)?;
        let key =
            KeyPair::from_pem(&read(&key_path)?).map_err(cert_err(format!("{}", key_path.display())))?;
        Self::from_issuer(&cert_pem, key, vec![cert_pem.clone()], trust_domain)
    }

    /// The root certificate (PEM): what proxies trust.
    pub fn root_pem(&self) -> &str {
        self.chain.last().expect("the chain ends with the root")
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Checks a CSR and returns the identity it asks for.
    pub fn check_csr(
        &self,
        csr_pem: &str,
    ) -> Result<(Identity, CertificateSigningRequestParams), CsrRefusal> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CsrRefusal::Malformed(e.to_string()))?;
        let mut uris = Vec::new();
        let mut others = Vec::new();
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::URI(u) => uris.push(u.as_str().to_string()),
                other => others.push(format!("{other:?}")),
            }
        }
        if uris.len() != 1 {
            return Err(CsrRefusal::UriSanCount(uris.len()));
        }
        if !others.is_empty() {
            return Err(CsrRefusal::OtherSans(others.join(", ")));
        }
        let identity: Identity = uris[0].parse().map_err(|_| CsrRefusal::NotSpiffe(uris[0].clone()))?;
        if identity.trust_domain != self.trust_domain {
            return Err(CsrRefusal::TrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let alg = csr.public_key.algorithm();
        if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ECDSA_P384_SHA384 {
            return Err(CsrRefusal::Key(format!("{alg:?}")));
        }
        Ok((identity, csr))
    }

    /// Issues a workload certificate for a checked CSR: only the identity and the public key
    /// are taken from the request; everything else is the CA's choice.
    pub fn issue(
        &self,
        identity: &Identity,
        csr: &CertificateSigningRequestParams,
        validity: Duration,
    ) -> Result<Vec<String>, AuthorityError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(identity.to_string().try_into().map_err(cert_err("the identity URI"))?)];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        // A little slack for clocks slightly behind ours.
        params.not_before = now - time::Duration::seconds(60);
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&csr.public_key, &self.issuer).map_err(cert_err("signing"))?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }

    /// A serving certificate for the CA's own TLS endpoint (DNS name and IPs as SANs), with
    /// its key: `(chain PEM, key PEM)`.
    pub fn serving_cert(
        &self,
        dns: &str,
        ips: &[std::net::IpAddr],
    ) -> Result<(String, String), AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err("serving key"))?;
        let mut params = CertificateParams::new(vec![dns.to_string()]).map_err(cert_err("serving name"))?;
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        params.serial_number = Some(random_serial());
        let cert =
            params.signed_by(&key, &self.issuer).map_err(cert_err("signing the serving certificate"))?;
        let mut chain = cert.pem();
        // Intermediates, not the root.
        for pem in &self.chain[..self.chain.len() - 1] {
            chain.push_str(pem);
        }
        Ok((chain, key.serialize_pem()))
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, as DER integers for serials must be.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Splits a PEM bundle into one string per certificate.
fn split_pem(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in bundle.lines() {
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END ") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

#[cfg(test)]
mod tests;
