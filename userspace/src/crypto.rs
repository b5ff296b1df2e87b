//! The process's one rustls crypto provider, below every TLS user: HBONE (`tls`), the CA
//! client (`identity`), the control plane.

use std::sync::Arc;

use rustls::crypto::{ring, CryptoProvider};

/// *ring* restricted to the two suites ztunnel accepts. *ring* rather than aws-lc-rs: its
/// AES-GCM has a VAES/VPCLMULQDQ (AVX2) path that aws-lc 0.47 lacks, 1.9× the bytes per
/// second on CPUs with those (AMD Zen 3 and later, Intel Ice Lake and later), and AES-GCM
/// is the largest single cost of a bulk transfer through the tunnel.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites =
        vec![ring::cipher_suite::TLS13_AES_256_GCM_SHA384, ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    Arc::new(p)
}

/// Makes *ring* the process-wide default, so every rustls user in the binary (tonic's
/// channels included) agrees on one provider.
pub fn install_default_provider() {
    // Err means one is installed already (a second call): nothing to do.
    let _already_installed = ring::default_provider().install_default();
}
