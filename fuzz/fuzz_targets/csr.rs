//! Certificate signing requests as a node sends them to the CA: any PEM text, or any DER in a
//! PEM envelope, is refused, or yields exactly one SPIFFE identity of the CA's trust domain, and the
//! certificate issued for it names that identity and nothing else.
#![no_main]

use std::sync::OnceLock;

use ambit::controlplane::authority::{Authority, Source};
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{pem::PemObject, CertificateDer};

fn authority() -> &'static Authority {
    static CA: OnceLock<Authority> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ambit-fuzz-ca-{}", std::process::id()));
        let _fresh_or_reused = std::fs::create_dir_all(&dir);
        Authority::load(&Source::StateDir(dir), "cluster.local").expect("a CA")
    })
}

fuzz_target!(|data: &[u8]| {
    let ca = authority();
    // PEM text as a node sends it, or DER bytes (put in a PEM envelope here).
    let text = if data.starts_with(b"-----BEGIN") {
        String::from_utf8_lossy(data).into_owned()
    } else {
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
    };
    let Ok((identity, csr)) = ca.check_csr(&text) else { return };
    assert_eq!(identity.trust_domain, "cluster.local", "{identity} outside the trust domain");
    let chain =
        ca.issue(&identity, &csr, std::time::Duration::from_secs(3600)).expect("a checked CSR is issued");
    let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).expect("the CA writes PEM");
    let issued = ambit::identity::cert::identity_of(&leaf).expect("the issued certificate names an identity");
    assert_eq!(issued, identity, "issued for another identity than checked");
});
