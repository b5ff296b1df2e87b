//! The mesh file: any text is parsed and validated, or refused with an error naming the file;
//! a version that is accepted translates into xDS resources the proxy's own state accepts
//! whole, with every index consistent (what a node does with the control plane's file).
#![no_main]

use std::path::Path;

use ambit::{
    meshfile::{self, Checks},
    state::StateStore,
    xds::translate::translate,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.yaml");
    let mesh = match meshfile::parse(path, text, &Checks { node: None }) {
        Ok(mesh) => mesh,
        Err(e) => {
            assert!(e.to_string().starts_with("fuzz.yaml"), "an error that does not name the file: {e}");
            return;
        }
    };
    // Addresses are one pod's or one service's, in canonical form.
    let mut seen = std::collections::HashSet::new();
    for ip in mesh.pods.iter().flat_map(|p| &p.ips).chain(mesh.services.iter().flat_map(|s| &s.addresses)) {
        assert_eq!(*ip, ambit::capture::addr::canonical(*ip), "{ip} kept in mapped form");
        assert!(seen.insert(*ip), "{ip} accepted twice");
    }
    let state = StateStore::default();
    let refused = state.replace_all(&translate(&mesh, "cluster.local"));
    assert!(refused.is_empty(), "a valid mesh file translated into refused resources: {refused:?}");
    state.read().check_invariants().expect("consistent state");
});
