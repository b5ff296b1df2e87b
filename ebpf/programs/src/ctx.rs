//! Thin wrappers around the raw helpers aya-ebpf 0.2 has no safe API for.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_map_lookup_elem, bpf_sk_release},
    maps::SockHash,
};

/// Looks a socket up in a SOCKHASH. A non-null result holds a reference that must be given
/// back with [`sk_release`] (the verifier enforces it).
#[inline(always)]
pub fn sockhash_lookup<K>(map: &SockHash<K>, key: &K) -> *mut c_void {
    // SAFETY: `map` is a map definition the loader relocates to the map's fd (taking the
    // address of the static is how BPF code names a map) and `key` points at a key of the
    // map's key size; the helper only reads both.
    unsafe { bpf_map_lookup_elem((map as *const SockHash<K>).cast_mut().cast(), (key as *const K).cast()) }
}

#[inline(always)]
pub fn sk_release(sk: *mut c_void) {
    // SAFETY: callers pass only non-null sockets obtained from a lookup helper, once each.
    // The return value is always 0 for such sockets, so there is nothing to act on.
    unsafe {
        bpf_sk_release(sk);
    }
}
