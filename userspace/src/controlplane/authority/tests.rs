use std::{os::unix::fs::PermissionsExt, time::Duration};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use super::*;
use crate::identity::{cert, WorkloadCert};

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ambit-authority-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    fs::create_dir_all(&d).expect("temp dir");
    d
}

fn csr_with_sans(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.serialize_request(&key).expect("csr").pem().expect("pem")
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

/// Verifies `chain` (leaf first, root last) with webpki for client and server use.
fn verifies(chain: &[String]) {
    use rustls_pki_types::{pem::PemObject, CertificateDer, UnixTime};
    let ders: Vec<CertificateDer<'static>> =
        chain.iter().map(|p| CertificateDer::from_pem_slice(p.as_bytes()).expect("pem")).collect();
    let root = ders.last().expect("root");
    let anchors = vec![webpki::anchor_from_trusted_cert(root).expect("anchor")];
    let leaf = webpki::EndEntityCert::try_from(&ders[0]).expect("leaf");
    let algs = crate::crypto::provider().signature_verification_algorithms.all;
    for usage in [webpki::KeyUsage::client_auth(), webpki::KeyUsage::server_auth()] {
        leaf.verify_for_usage(algs, &anchors, &ders[1..ders.len() - 1], UnixTime::now(), usage, None, None)
            .expect("chain verifies");
    }
}

#[test]
fn a_generated_root_is_kept_owner_only_and_reused() {
    let dir = tempdir("state").join("ca");
    let a = Authority::load(&Source::StateDir(dir.clone()), "cluster.local").expect("created");
    let mode = |p: &Path| fs::metadata(p).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(ROOT_KEY)), 0o600);
    assert_eq!(mode(&dir.join(ROOT_CERT)), 0o600);
    let b = Authority::load(&Source::StateDir(dir.clone()), "cluster.local").expect("loaded");
    assert_eq!(a.root_pem(), b.root_pem(), "the second start uses the same root");
    fs::remove_dir_all(dir.parent().expect("parent")).expect("cleanup");
}

#[test]
fn a_good_csr_yields_a_spiffe_certificate_for_both_uses() {
    let dir = tempdir("issue");
    let a = Authority::load(&Source::StateDir(dir.clone()), "cluster.local").expect("ca");
    let id = Identity::new("cluster.local", "demo", "client");
    let (key, csr) = cert::csr(&id).expect("csr");
    let (asked, params) = a.check_csr(&csr).expect("accepted");
    assert_eq!(asked, id);
    let chain = a.issue(&id, &params, Duration::from_secs(3600)).expect("issued");
    assert_eq!(chain.len(), 2, "leaf and root");
    verifies(&chain);
    let wc = WorkloadCert::from_chain(&id, &key, &chain, &crate::crypto::provider()).expect("usable");
    assert_eq!(wc.identity, id);
    let life = wc.not_after.duration_since(wc.not_before).expect("ordered");
    assert!(life >= Duration::from_secs(3600) && life <= Duration::from_secs(3600 + 120), "{life:?}");
    // The key the certificate was issued for is the one generated with the CSR, and no other.
    let (other_key, _) = cert::csr(&id).expect("csr");
    assert!(WorkloadCert::from_chain(&id, &other_key, &chain, &crate::crypto::provider()).is_err());
    fs::remove_dir_all(dir).expect("cleanup");
}

#[test]
fn bad_csrs_are_refused_with_the_reason() {
    let dir = tempdir("refuse");
    let a = Authority::load(&Source::StateDir(dir.clone()), "cluster.local").expect("ca");
    let two =
        csr_with_sans(vec![uri("spiffe://cluster.local/ns/a/sa/x"), uri("spiffe://cluster.local/ns/b/sa/y")]);
    assert_eq!(a.check_csr(&two).err(), Some(CsrRefusal::UriSanCount(2)));
    let none = csr_with_sans(vec![]);
    assert_eq!(a.check_csr(&none).err(), Some(CsrRefusal::UriSanCount(0)));
    let dns = csr_with_sans(vec![
        uri("spiffe://cluster.local/ns/a/sa/x"),
        SanType::DnsName("x.example".try_into().expect("dns")),
    ]);
    assert!(matches!(a.check_csr(&dns), Err(CsrRefusal::OtherSans(_))));
    let not_spiffe = csr_with_sans(vec![uri("https://example.com/x")]);
    assert!(matches!(a.check_csr(&not_spiffe), Err(CsrRefusal::NotSpiffe(_))));
    let foreign = csr_with_sans(vec![uri("spiffe://other.domain/ns/a/sa/x")]);
    assert!(matches!(a.check_csr(&foreign), Err(CsrRefusal::TrustDomain { .. })));
    assert!(matches!(
        a.check_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
        Err(CsrRefusal::Malformed(_))
    ));
    assert!(matches!(a.check_csr("not even PEM"), Err(CsrRefusal::Malformed(_))));
    fs::remove_dir_all(dir).expect("cleanup");
}

#[test]
fn an_intermediate_signs_and_the_chain_ends_at_the_users_root() {
    let dir = tempdir("intermediate");
    // The user's root, and an intermediate it signed.
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut rp = CertificateParams::new(Vec::<String>::new()).expect("params");
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).expect("root");
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut ip = CertificateParams::new(Vec::<String>::new()).expect("params");
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "intermediate");
    ip.distinguished_name = dn;
    let issuer = Issuer::from_params(&rp, &root_key);
    let int = ip.signed_by(&int_key, &issuer).expect("intermediate");
    fs::write(dir.join("int.pem"), int.pem()).expect("write");
    fs::write(dir.join("int-key.pem"), int_key.serialize_pem()).expect("write");
    fs::write(dir.join("chain.pem"), root.pem()).expect("write");
    let a = Authority::load(
        &Source::Intermediate {
            cert: dir.join("int.pem"),
            key: dir.join("int-key.pem"),
            chain: dir.join("chain.pem"),
        },
        "cluster.local",
    )
    .expect("loaded");
    assert_eq!(a.root_pem(), root.pem());
    let id = Identity::new("cluster.local", "demo", "server");
    let (_, csr) = cert::csr(&id).expect("csr");
    let (_, params) = a.check_csr(&csr).expect("ok");
    let chain = a.issue(&id, &params, Duration::from_secs(60)).expect("issued");
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    verifies(&chain);
    fs::remove_dir_all(dir).expect("cleanup");
}

/// CSRs from `fuzz/corpus/csr/`, mutated in their PEM text and in their DER bytes: checked
/// or refused with a reason, never a panic, and never an identity outside the trust domain.
mod hostile {
    use proptest::prelude::*;
    use rustls_pki_types::pem::PemObject;

    use super::*;

    const CORPUS: [&str; 2] = [
        include_str!("../../../../fuzz/corpus/csr/good.pem"),
        include_str!("../../../../fuzz/corpus/csr/two-sans.pem"),
    ];

    fn authority() -> &'static Authority {
        static A: std::sync::OnceLock<Authority> = std::sync::OnceLock::new();
        A.get_or_init(|| {
            let top = tempdir("fuzz");
            let a = Authority::load(&Source::StateDir(top.join("ca")), "cluster.local").expect("created");
            // Loaded into memory: the files are not needed any more.
            fs::remove_dir_all(&top).expect("cleanup");
            a
        })
    }

    fn der(pem: &str) -> Vec<u8> {
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .expect("csr pem")
            .to_vec()
    }

    fn pem(der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> =
            b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("ascii")).collect();
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            lines.join("\n")
        )
    }

    fn check(csr: &str) -> Result<(), TestCaseError> {
        if let Ok((identity, _)) = authority().check_csr(csr) {
            prop_assert_eq!(identity.trust_domain.as_str(), "cluster.local");
        }
        Ok(())
    }

    #[test]
    fn the_corpus_checks_as_expected() {
        let (id, _) = authority().check_csr(CORPUS[0]).expect("good.pem is accepted");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/client");
        assert!(matches!(authority().check_csr(CORPUS[1]), Err(CsrRefusal::OtherSans(_))));
        // The re-encoding used below is faithful.
        assert!(authority().check_csr(&pem(&der(CORPUS[0]))).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        #[test]
        fn mutated_der_is_checked_or_refused(
            file in 0usize..2,
            flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..6),
            cut in proptest::option::of(any::<usize>()),
        ) {
            let mut d = der(CORPUS[file]);
            for (at, x) in flips {
                let i = at % d.len();
                d[i] ^= x;
            }
            if let Some(c) = cut {
                d.truncate(c % (d.len() + 1));
            }
            check(&pem(&d))?;
        }

        #[test]
        fn random_bytes_and_text_are_refused(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            text in "\\PC{0,300}",
        ) {
            prop_assert!(authority().check_csr(&pem(&bytes)).is_err());
            prop_assert!(authority().check_csr(&text).is_err());
        }
    }
}
