//! Typed handles on the shared maps, and the checks that pinned maps (from an earlier proxy
//! run) have the shape this binary expects.

use std::{
    io,
    mem::{size_of, MaybeUninit},
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::{Arc, Mutex},
};

use ambit_common::{
    maps::{
        Config, ConnKey, FlowKey, ListenerKey, OrigDst, PendingConnect, PodEntry, MAP_CONFIG, MAP_ENROLLED,
        MAP_LISTENERS, MAP_ORIG_DST, MAP_PENDING, MAP_POD_IPS, MAP_PROBES, MAP_STATS,
    },
    stats,
    trace::{TracedSock, MAP_EVENTS, MAP_TRACED},
    IpKey,
};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    Ebpf,
};

use super::{addr, CaptureError};
use crate::os::cookie::NetnsCookie;

/// The programs' settings, shared: the node writes them at start, the admin endpoint changes
/// the kernel log level and tracing at run time.
#[derive(Clone)]
pub struct ConfigHandle(Arc<Mutex<Array<MapData, Config>>>);

impl ConfigHandle {
    pub fn get(&self) -> Result<Config, CaptureError> {
        op(MAP_CONFIG, self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&0, 0))
    }

    pub fn set(&self, cfg: &Config) -> Result<(), CaptureError> {
        op(MAP_CONFIG, self.0.lock().unwrap_or_else(|p| p.into_inner()).set(0, cfg, 0))
    }

    /// Read, change, write, under one lock.
    pub fn update(&self, f: impl FnOnce(&mut Config)) -> Result<Config, CaptureError> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut cfg = op(MAP_CONFIG, map.get(&0, 0))?;
        f(&mut cfg);
        op(MAP_CONFIG, map.set(0, cfg, 0))?;
        Ok(cfg)
    }
}

/// The maps the node proxy manages.
pub struct Maps {
    config: ConfigHandle,
    enrolled: HashMap<MapData, u64, PodEntry>,
    pod_ips: HashMap<MapData, IpKey, u64>,
    probes: HashMap<MapData, FlowKey, u64>,
    listeners: SockHash<MapData, ListenerKey>,
    pending: HashMap<MapData, u64, PendingConnect>,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, CaptureError> {
    ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))
}

fn typed<T>(name: &'static str, map: Map) -> Result<T, CaptureError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(map).map_err(|source| CaptureError::Map { name, source: Box::new(source) })
}

/// The map underneath, for the kinds of map ambit uses.
fn map_data<'m>(name: &'static str, map: &'m Map) -> Result<&'m MapData, CaptureError> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::SockHash(m)
        | Map::RingBuf(m) => Ok(m),
        _ => Err(CaptureError::MapShape { name, detail: "unexpected map type".into() }),
    }
}

/// Refuses a pinned map left by a different ambit whose layout differs from ours: reusing it
/// would make the programs and the proxy read each other's bytes wrongly.
fn check_shape(name: &'static str, map: &Map, key: usize, value: usize) -> Result<(), CaptureError> {
    let data = map_data(name, map)?;
    let info = data.info().map_err(|source| CaptureError::Map { name, source: Box::new(source) })?;
    if info.key_size() as usize != key || info.value_size() as usize != value {
        return Err(CaptureError::MapShape {
            name,
            detail: format!(
                "key/value sizes {}/{} where this ambit expects {key}/{value}",
                info.key_size(),
                info.value_size()
            ),
        });
    }
    Ok(())
}

/// What [`split`] takes out of the object.
pub struct Split {
    pub maps: Maps,
    pub orig: OrigDstTable,
    pub stats: KernelStats,
    /// The trace events ring buffer, for `crate::trace`.
    pub events: RingBuf<MapData>,
}

/// Takes the maps out of a loaded object, checking each one's shape.
pub fn split(ebpf: &mut Ebpf) -> Result<Split, CaptureError> {
    let shapes: [(&'static str, usize, usize); 10] = [
        (MAP_CONFIG, 4, size_of::<Config>()),
        (MAP_ENROLLED, 8, size_of::<PodEntry>()),
        (MAP_POD_IPS, size_of::<IpKey>(), 8),
        (MAP_PROBES, size_of::<FlowKey>(), 8),
        (MAP_LISTENERS, size_of::<ListenerKey>(), 4),
        (MAP_PENDING, 8, size_of::<PendingConnect>()),
        (MAP_ORIG_DST, size_of::<ConnKey>(), size_of::<OrigDst>()),
        (MAP_STATS, 4, 8),
        (MAP_EVENTS, 0, 0),
        (MAP_TRACED, 8, size_of::<TracedSock>()),
    ];
    for (name, key, value) in shapes {
        let map = ebpf.map(name).ok_or(CaptureError::MissingMap(name))?;
        check_shape(name, map, key, value)?;
    }
    let maps = Maps {
        config: ConfigHandle(Arc::new(Mutex::new(typed(MAP_CONFIG, take(ebpf, MAP_CONFIG)?)?))),
        enrolled: typed(MAP_ENROLLED, take(ebpf, MAP_ENROLLED)?)?,
        pod_ips: typed(MAP_POD_IPS, take(ebpf, MAP_POD_IPS)?)?,
        probes: typed(MAP_PROBES, take(ebpf, MAP_PROBES)?)?,
        listeners: typed(MAP_LISTENERS, take(ebpf, MAP_LISTENERS)?)?,
        pending: typed(MAP_PENDING, take(ebpf, MAP_PENDING)?)?,
    };
    let orig = OrigDstTable::new(take(ebpf, MAP_ORIG_DST)?)?;
    let stats = KernelStats(typed(MAP_STATS, take(ebpf, MAP_STATS)?)?);
    let events = typed(MAP_EVENTS, take(ebpf, MAP_EVENTS)?)?;
    Ok(Split { maps, orig, stats, events })
}

fn op<T>(name: &'static str, r: Result<T, MapError>) -> Result<T, CaptureError> {
    r.map_err(|source| CaptureError::Map { name, source: Box::new(source) })
}

/// Removal of a key that may be gone already.
fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    name: &'static str,
    map: &mut HashMap<MapData, K, V>,
    key: &K,
) -> Result<(), CaptureError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(CaptureError::Map { name, source: Box::new(source) }),
    }
}

impl Maps {
    pub fn config(&self) -> Result<Config, CaptureError> {
        self.config.get()
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<(), CaptureError> {
        self.config.set(cfg)
    }

    /// A shared handle on the settings, for changes while running.
    pub fn config_handle(&self) -> ConfigHandle {
        self.config.clone()
    }

    pub fn enroll(&mut self, netns_cookie: NetnsCookie, entry: PodEntry) -> Result<(), CaptureError> {
        op(MAP_ENROLLED, self.enrolled.insert(netns_cookie.0, entry, 0))
    }

    pub fn unenroll(&mut self, netns_cookie: NetnsCookie) -> Result<(), CaptureError> {
        remove_if_present(MAP_ENROLLED, &mut self.enrolled, &netns_cookie.0)
    }

    pub fn enrolled(&self) -> Result<Vec<(u64, PodEntry)>, CaptureError> {
        self.enrolled.iter().map(|r| op(MAP_ENROLLED, r)).collect()
    }

    pub fn set_pod_ip(&mut self, ip: IpAddr, netns_cookie: NetnsCookie) -> Result<(), CaptureError> {
        op(MAP_POD_IPS, self.pod_ips.insert(addr::ip_key(ip), netns_cookie.0, 0))
    }

    pub fn remove_pod_ip(&mut self, key: &IpKey) -> Result<(), CaptureError> {
        remove_if_present(MAP_POD_IPS, &mut self.pod_ips, key)
    }

    pub fn pod_ips(&self) -> Result<Vec<(IpKey, u64)>, CaptureError> {
        self.pod_ips.iter().map(|r| op(MAP_POD_IPS, r)).collect()
    }

    /// Kubelet probe connections recorded and not yet closed (diagnostics).
    pub fn probes_count(&self) -> usize {
        self.probes.keys().count()
    }

    /// Registers an in-pod listener. The entry leaves the map by itself when the socket closes.
    pub fn register_listener(&mut self, key: ListenerKey, sock: &impl AsRawFd) -> Result<(), CaptureError> {
        op(MAP_LISTENERS, self.listeners.insert(key, sock.as_raw_fd(), 0))
    }

    pub fn listeners(&self) -> Result<Vec<ListenerKey>, CaptureError> {
        self.listeners.keys().map(|r| op(MAP_LISTENERS, r)).collect()
    }

    /// Captured connects not yet closed (diagnostics).
    pub fn pending_count(&self) -> usize {
        self.pending.keys().count()
    }
}

/// The original destinations of captured connections, shared by every accept path.
pub struct OrigDstTable {
    map: HashMap<MapData, ConnKey, OrigDst>,
    /// The same map's descriptor, for the one call aya keeps private.
    fd: OwnedFd,
}

impl OrigDstTable {
    fn new(map: Map) -> Result<OrigDstTable, CaptureError> {
        let fd = map_data(MAP_ORIG_DST, &map)?.fd().as_fd().try_clone_to_owned().map_err(|e| {
            CaptureError::Map { name: MAP_ORIG_DST, source: Box::new(syscall_error("dup", e)) }
        })?;
        Ok(OrigDstTable { map: typed(MAP_ORIG_DST, map)?, fd })
    }

    /// Looks up and removes the record for an accepted connection: one syscall
    /// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, for hash maps since 5.14, ambit's floor) where a
    /// lookup and a delete were two, on every outbound connection.
    pub fn take(&self, key: &ConnKey) -> Result<Option<OrigDst>, CaptureError> {
        lookup_and_delete(self.fd.as_fd(), key).map_err(|e| CaptureError::Map {
            name: MAP_ORIG_DST,
            source: Box::new(syscall_error("bpf_map_lookup_and_delete_elem", e)),
        })
    }

    pub fn len(&self) -> usize {
        self.map.keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn syscall_error(call: &'static str, io_error: io::Error) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError { call, io_error })
}

/// `bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM)` on the original-destination map; `Ok(None)` when
/// the key is not there.
fn lookup_and_delete(fd: BorrowedFd<'_>, key: &ConnKey) -> io::Result<Option<OrigDst>> {
    /// The `BPF_MAP_*_ELEM` member of the kernel's `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = MaybeUninit::<OrigDst>::uninit();
    let attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is the kernel's attribute layout for this command and its size is the
    // one passed. The kernel reads a key of the map's key size from `key` and writes a value
    // of the map's value size into `value`: `split` checked both sizes against `ConnKey` and
    // `OrigDst`, and the map is not per-CPU (one value). Both outlive the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &raw const attr, size_of::<ElemAttr>())
    };
    if rc == 0 {
        // SAFETY: on success the kernel wrote the whole value; `OrigDst` is plain data for
        // which any bytes are valid.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The kernel-side counters.
pub struct KernelStats(PerCpuArray<MapData, u64>);

impl KernelStats {
    /// Each counter summed over CPUs, indexed like `ambit_common::stats`.
    pub fn read(&self) -> Result<[u64; stats::COUNT as usize], CaptureError> {
        let mut out = [0u64; stats::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            match self.0.get(&(i as u32), 0) {
                Ok(per_cpu) => *slot = per_cpu.iter().sum(),
                // A map pinned by an older ambit with fewer counters: the new ones read 0.
                Err(MapError::OutOfBounds { .. }) => break,
                Err(source) => return Err(CaptureError::Map { name: MAP_STATS, source: Box::new(source) }),
            }
        }
        Ok(out)
    }
}
