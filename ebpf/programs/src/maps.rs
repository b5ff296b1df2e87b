//! The maps shared with the proxy. Names must match `ambit_common::maps::MAP_*`: the proxy pins
//! them by name so that a restarted proxy finds the same maps.

use ambit_common::{
    maps::{
        Config, ConnKey, FlowKey, ListenerKey, OrigDst, PendingConnect, PodEntry, MAX_DNS_SOCKETS,
        MAX_LISTENERS, MAX_PENDING, MAX_PODS, MAX_POD_IPS, MAX_PROBES,
    },
    stats,
    trace::{TracedSock, EVENTS_BYTES, MAX_TRACED},
    IpKey,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};

#[map(name = "AMBIT_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "AMBIT_ENROLLED")]
pub static ENROLLED: HashMap<u64, PodEntry> = HashMap::pinned(MAX_PODS, 0);

#[map(name = "AMBIT_POD_IPS")]
pub static POD_IPS: HashMap<IpKey, u64> = HashMap::pinned(MAX_POD_IPS, 0);

#[map(name = "AMBIT_PROBES")]
pub static PROBES: LruHashMap<FlowKey, u64> = LruHashMap::pinned(MAX_PROBES, 0);

#[map(name = "AMBIT_LISTENERS")]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_LISTENERS, 0);

#[map(name = "AMBIT_PENDING")]
pub static PENDING: LruHashMap<u64, PendingConnect> = LruHashMap::pinned(MAX_PENDING, 0);

#[map(name = "AMBIT_ORIG_DST")]
pub static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(MAX_PENDING, 0);

#[map(name = "AMBIT_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

#[map(name = "AMBIT_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map(name = "AMBIT_DNS_ORIG")]
pub static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_DNS_SOCKETS, 0);

#[map(name = "AMBIT_TRACED")]
pub static TRACED: LruHashMap<u64, TracedSock> = LruHashMap::pinned(MAX_TRACED, 0);

/// The proxy's settings, or `None` while it has not written them: then nothing is captured.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    let cfg = CONFIG.get(0)?;
    if cfg.outbound_port == 0 || cfg.inbound_port == 0 {
        return None;
    }
    Some(cfg)
}

/// Logs through aya-log when the proxy's configured kernel log level (`Config::log_level`,
/// aya-log numbering) admits `$level`; nothing is formatted or sent otherwise. The level is
/// read at run time from the config map, so the proxy can change it without reloading.
#[macro_export]
macro_rules! klog {
    ($cfg:expr, $ctx:expr, $level:ident, $($arg:tt)+) => {
        if $cfg.log_level >= $crate::maps::level::$level {
            aya_log_ebpf::$level!($ctx, $($arg)+);
        }
    };
}

/// aya-log's level numbers (the whole table, whichever levels are in use).
#[allow(non_upper_case_globals, dead_code)]
pub mod level {
    pub const error: u8 = 1;
    pub const warn: u8 = 2;
    pub const info: u8 = 3;
    pub const debug: u8 = 4;
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so it points at
        // this CPU's u64 slot, which nothing else touches while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Whether a listener the proxy registered for this pod, port and family is alive.
/// A closed socket leaves the SOCKHASH by itself, so "absent" means "no proxy".
#[inline(always)]
pub fn listener_alive(key: &ListenerKey) -> bool {
    let sk = crate::ctx::sockhash_lookup(&LISTENERS, key);
    if sk.is_null() {
        return false;
    }
    crate::ctx::sk_release(sk);
    true
}
