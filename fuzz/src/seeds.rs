//! The seed corpus in `fuzz/corpus/<target>/`: where each seed comes from, and a check that
//! every committed seed still means what it meant (a seed the target now refuses at its first
//! step would only steer the fuzzer nowhere).
//!
//! Seeds derived from the project's own inputs are written by this test when
//! `AMBIT_WRITE_SEEDS=1`: the xDS resources and policies of the mesh-file corpus, encoded as
//! the control plane serves them; the HBONE heads of the head table; a certificate the CA
//! issues. Regression inputs (`regression-*`) are the fuzzer's findings, kept as found.

use std::path::{Path, PathBuf};

use ambit::{
    meshfile::{self, Checks},
    pb::istio::{
        security::Authorization,
        workload::{address, Address},
    },
    xds::translate::translate,
};
use prost::Message;

use crate::{record, Records};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target)
}

fn files(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus(target))
        .unwrap_or_else(|e| panic!("corpus/{target}: {e}"))
        .map(|e| e.expect("entry").path())
        .map(|p| {
            (p.file_name().expect("name").to_string_lossy().into_owned(), std::fs::read(&p).expect("read"))
        })
        .collect();
    out.sort();
    out
}

fn writing() -> bool {
    std::env::var_os("AMBIT_WRITE_SEEDS").is_some()
}

/// Writes `bytes` as seed `name` of `target` when asked to; otherwise checks it is there and
/// unchanged.
fn seed(target: &str, name: &str, bytes: &[u8]) {
    let path = corpus(target).join(name);
    if writing() {
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    } else {
        let held = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (AMBIT_WRITE_SEEDS=1 writes it)", path.display()));
        assert!(held == bytes, "{} is stale: AMBIT_WRITE_SEEDS=1 rewrites it", path.display());
    }
}

/// The mesh-file corpus, parsed (each must be valid: they are what the derived seeds start
/// from).
fn meshes() -> Vec<(String, meshfile::Mesh)> {
    files("meshfile")
        .into_iter()
        .filter(|(n, _)| !n.starts_with("regression-"))
        .map(|(n, b)| {
            let text = String::from_utf8(b).expect("UTF-8");
            let mesh = meshfile::parse(Path::new(&n), &text, &Checks { node: None })
                .unwrap_or_else(|e| panic!("corpus/meshfile/{n}: {e}"));
            (n.trim_end_matches(".yaml").to_string(), mesh)
        })
        .collect()
}

#[test]
fn the_xds_and_policy_seeds_are_the_mesh_corpus_as_served() {
    for (name, mesh) in meshes() {
        let r = translate(&mesh, "cluster.local");
        let mut xds = Vec::new();
        let mut policy = Vec::new();
        let mut addresses = Vec::new();
        for a in r.addresses.values() {
            record(&mut xds, 0, &a.encode_to_vec());
            if let Some(address::Type::Workload(w)) = &a.r#type {
                addresses.extend(w.addresses.iter().cloned());
            }
        }
        for a in r.authorizations.values() {
            record(&mut xds, 1, &a.encode_to_vec());
            record(&mut policy, 0, &a.encode_to_vec());
        }
        // Routes to each workload address, then every name removed.
        for ip in &addresses {
            let mut dst = ip.clone();
            dst.extend_from_slice(&8080u16.to_be_bytes());
            record(&mut xds, 3, &dst);
        }
        for i in 0..(r.addresses.len() + r.authorizations.len()) {
            record(&mut xds, 2, &[i as u8]);
        }
        // Connections: with and without an identity, from inside and outside 10/8.
        for conn in [[1, 1, 2, 10, 1, 0, 2, 10, 2, 0, 2, 31], [0, 0, 0, 192, 168, 0, 9, 10, 2, 0, 2, 31]] {
            record(&mut policy, 1, &conn);
        }
        seed("xds_state", &format!("{name}.bin"), &xds);
        seed("policy", &format!("{name}.bin"), &policy);
    }
}

#[test]
fn the_head_seeds_are_the_head_table() {
    let table = include_str!("../../userspace/src/proxy/hbone/heads.tsv");
    for (i, line) in table.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let mut bytes = Vec::new();
        for (j, field) in [f[0], f[1], f[2], "demo", "client-5f7", "shop"].iter().enumerate() {
            if j > 0 {
                bytes.push(0xff);
            }
            bytes.extend_from_slice(field.as_bytes());
        }
        seed("hbone_head", &format!("head-{i:02}"), &bytes);
    }
}

#[test]
fn committed_seeds_still_reach_past_their_target_s_first_step() {
    for (name, bytes) in files("meshfile") {
        let text = String::from_utf8(bytes).expect("UTF-8");
        let parsed = meshfile::parse(Path::new(&name), &text, &Checks { node: None });
        // A regression input is refused (that was the fix); every other seed is a valid file.
        assert_eq!(parsed.is_ok(), !name.starts_with("regression-"), "{name}: {parsed:?}");
    }
    for (name, bytes) in files("xds_state") {
        let decoded = Records::new(&bytes)
            .filter(|(op, c)| match op % 4 {
                0 => Address::decode(*c).is_ok(),
                1 => Authorization::decode(*c).is_ok(),
                _ => false,
            })
            .count();
        assert!(decoded > 0, "xds_state/{name}: no resource decodes");
    }
    for (name, bytes) in files("csr") {
        assert!(bytes.starts_with(b"-----BEGIN CERTIFICATE REQUEST-----"), "csr/{name}");
    }
    for (name, bytes) in files("peer_identity") {
        ambit::identity::cert::identity_of(&bytes).unwrap_or_else(|e| panic!("peer_identity/{name}: {e}"));
    }
    assert!(!files("policy").is_empty() && !files("hbone_head").is_empty());
}

/// A certificate as the CA issues it, for `peer_identity` (keys are random: written only when
/// missing or asked for).
#[test]
fn the_identity_seed_is_a_certificate_the_ca_issued() {
    let path = corpus("peer_identity").join("issued.der");
    if path.exists() && !writing() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ambit-seed-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ca = ambit::controlplane::authority::Authority::load(
        &ambit::controlplane::authority::Source::StateDir(dir.clone()),
        "cluster.local",
    )
    .expect("a CA");
    let csr_pem = std::fs::read_to_string(corpus("csr").join("good.pem")).expect("the CSR seed");
    let (identity, csr) = ca.check_csr(&csr_pem).expect("a good CSR");
    let chain = ca.issue(&identity, &csr, std::time::Duration::from_secs(3600)).expect("issued");
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(chain[0].as_bytes()).expect("PEM");
    std::fs::write(&path, der.as_ref()).expect("write");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
