//! Thin wrappers around the raw helpers aya-ebpf 0.2 has no safe API for.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release},
    maps::SockHash,
    EbpfContext,
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

/// The socket's cookie: the key of every per-socket record, as it stays the same for the
/// socket's whole life. Which program types may ask is the verifier's to enforce.
#[inline(always)]
pub fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper takes the program context and only reads it.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The cookie of the socket's network namespace: enrolment is keyed by it.
#[inline(always)]
pub fn netns_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper takes the program context and only reads it.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}
