//! Certificates for tests that play a peer: signed by the mesh root (the CA's state
//! directory holds its key) or by a root of their own.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Writes `<dir>/<name>.pem` and `<dir>/<name>-key.pem`: a client/server certificate for
/// `spiffe_id` signed by the root in `root_cert`/`root_key`. Returns (cert, key) paths.
pub fn workload(
    dir: &Path,
    name: &str,
    spiffe_id: &str,
    root_cert: &Path,
    root_key: &Path,
) -> (PathBuf, PathBuf) {
    let root_key =
        KeyPair::from_pem(&std::fs::read_to_string(root_key).expect("root key")).expect("root key PEM");
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(root_cert).expect("root cert"), root_key)
        .expect("root cert PEM");
    write_leaf(dir, name, spiffe_id, &issuer)
}

/// Like [`workload`], but under a fresh root nobody in the mesh trusts.
pub fn foreign(dir: &Path, name: &str, spiffe_id: &str) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let issuer = Issuer::new(p, key);
    write_leaf(dir, name, spiffe_id, &issuer)
}

fn write_leaf(dir: &Path, name: &str, spiffe_id: &str, issuer: &Issuer<'_, KeyPair>) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = p.signed_by(&key, issuer).expect("signed");
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    (c, k)
}
