//! The identity in a peer's certificate (what authorization trusts once the chain is
//! verified): any DER is refused, or names exactly one SPIFFE identity, which is the
//! certificate's single URI SAN and prints back to it.
#![no_main]

use ambit::identity::{cert::identity_of, Identity};
use libfuzzer_sys::fuzz_target;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

fuzz_target!(|data: &[u8]| {
    let Ok(identity) = identity_of(data) else { return };
    let printed = identity.to_string();
    assert_eq!(printed.parse::<Identity>().ok().as_ref(), Some(&identity), "does not print back");
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(data).expect("it was parsed");
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(uris, vec![printed], "the identity is not the certificate's one URI SAN");
});
