//! eBPF capture: loading the embedded programs, attaching them, pinning everything under
//! bpffs, and re-adopting what an earlier run pinned.
//!
//! Pin layout, under `<bpffs>/ambit/<instance>/`:
//!
//! ```text
//! AMBIT_*            the maps (ambit_common::maps)
//! prog_<program>     the programs
//! link_<program>     the cgroup links (connect4, connect6, sock_ops) on the configured cgroup
//! link_ambit_kubelet_ops_<cgroup id>
//!                    the kubelet's probe recorder, on the kubelet's cgroup only
//! tc/<netns cookie>  the tcx link of each enrolled pod's interface
//! ```
//!
//! Because links and maps are pinned, capture keeps working (and keeps failing closed) while no
//! proxy runs; a restarted proxy with the same eBPF object re-adopts the pinned programs and
//! links instead of attaching a second copy. A proxy with a different object replaces them.

pub mod addr;
pub mod handover;
pub mod klog;
pub mod maps;
mod origdst;
mod pins;
mod tc;

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ambit_common::maps::{Config, ListenerKey, PodEntry, CONFIG_FAIL_OPEN, CONFIG_TRACE};
use aya::{
    programs::{CgroupSockAddr, SchedClassifier, SockOps},
    EbpfLoader,
};

pub use maps::{KernelStats, OrigDstTable};
pub use origdst::{MockOrigDst, OrigDstSource};
pub use pins::{Adoption, PinDir};
pub use tc::TcState;

use crate::os::cookie::NetnsCookie;
use crate::os::netns::Netns;

/// The eBPF object built from `ebpf/programs` by build.rs; empty when the eBPF toolchain was
/// missing (a check-only build), which [`object`] refuses.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit-ebpf.o"));

/// The embedded eBPF object, or why this binary has none.
pub(crate) fn object() -> Result<&'static [u8], CaptureError> {
    if OBJECT.is_empty() {
        return Err(CaptureError::NoObject);
    }
    Ok(OBJECT)
}

/// aya-log's ring buffer map, pinned like ours.
pub(crate) const AYA_LOGS: &str = "AYA_LOGS";

/// Names of the programs in the object.
pub const PROG_CONNECT4: &str = "ambit_connect4";
pub const PROG_CONNECT6: &str = "ambit_connect6";
pub const PROG_SENDMSG4: &str = "ambit_sendmsg4";
pub const PROG_SENDMSG6: &str = "ambit_sendmsg6";
pub const PROG_RECVMSG4: &str = "ambit_recvmsg4";
pub const PROG_RECVMSG6: &str = "ambit_recvmsg6";
pub const PROG_GETPEERNAME4: &str = "ambit_getpeername4";
pub const PROG_GETPEERNAME6: &str = "ambit_getpeername6";
/// The cgroup sock_addr programs, all attached to the configured cgroup.
pub const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
];
pub const PROG_SOCK_OPS: &str = "ambit_sock_ops";
pub const PROG_TC_INGRESS: &str = "ambit_tc_ingress";
pub const PROG_KUBELET_OPS: &str = "ambit_kubelet_ops";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{path} is not a bpf filesystem; mount one with `mount -t bpf bpf {path}`")]
    NotBpffs { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "another ambit node is running with the pinned state in {path}; stop it first, or give \
         this one its own --instance"
    )]
    InstanceBusy { path: PathBuf },
    #[error(
        "this ambit binary has no eBPF programs: the eBPF toolchain was missing when it was built; \
         run `cargo xtask setup` (as root) and build again"
    )]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "pinned eBPF map {name} was left by an incompatible ambit ({detail}); \
         remove the pinned state with `ambit uninstall` and start again"
    )]
    MapShape { name: &'static str, detail: String },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("eBPF link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("forwarding kernel logs: {0}")]
    Logs(String),
    #[error("attaching to {interface} in {netns}: {source}")]
    Tc {
        interface: String,
        netns: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

/// What the capture layer needs to know from the node proxy's settings.
#[derive(Clone, Debug)]
pub struct CaptureSettings {
    /// A mounted bpffs; pins go to `<bpffs>/ambit/<instance>`.
    pub bpffs: PathBuf,
    pub instance: String,
    /// cgroup v2 directory whose processes (and descendants') connects are captured.
    pub cgroup: PathBuf,
    /// The kubelet's cgroup v2 directory: connections its processes open to enrolled pods
    /// (health probes) reach the application uncaptured. `None`: no exemption at all.
    pub kubelet_cgroup: Option<PathBuf>,
    pub proxy_mark: u32,
    /// `SO_MARK` of the sockets that deliver inbound connections from the client's address.
    pub delivery_mark: u32,
    pub fail_open: bool,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub hbone_port: u16,
    /// The DNS listener's port when enrolled pods' DNS is captured.
    pub dns_port: Option<u16>,
    pub kernel_log_level: klog::KernelLogLevel,
    /// Kernel-level tracing of enrolled pods' sockets (`CONFIG_TRACE`).
    pub trace: bool,
    /// Start alongside a running proxy of the same instance and take over from it.
    pub takeover: bool,
}

/// What [`Capture::open`] hands out besides the capture itself.
pub struct Opened {
    pub capture: Capture,
    pub orig: OrigDstTable,
    pub stats: KernelStats,
    pub events: aya::maps::RingBuf<aya::maps::MapData>,
    pub config: maps::ConfigHandle,
}

/// The loaded, attached capture programs and the maps the proxy drives them with.
pub struct Capture {
    pins: PinDir,
    maps: maps::Maps,
    tc: SchedClassifier,
    tc_prog_id: u32,
    adoption: Adoption,
    /// Keeps the object's remaining state (programs not yet taken) alive.
    _ebpf: aya::Ebpf,
}

/// FNV-1a: a stable fingerprint of the embedded object, stored in the pinned config so the
/// next run can tell whether the pinned programs are its own.
pub fn object_hash() -> u32 {
    OBJECT.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

impl Capture {
    /// Loads (or re-adopts) the programs and maps, attaches the cgroup programs, and writes
    /// the settings the programs read.
    pub fn open(settings: &CaptureSettings) -> Result<Opened, CaptureError> {
        let object = object()?;
        let pins = PinDir::create(&settings.bpffs, &settings.instance, settings.takeover)?;
        let logs_pin = pins.root().join(AYA_LOGS);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.root())
            .map_pin_path(AYA_LOGS, logs_pin.as_path())
            .load(object)
            .map_err(|e| CaptureError::Load(Box::new(e)))?;
        let maps::Split { mut maps, orig, stats, events } = maps::split(&mut ebpf)?;

        let hash = object_hash();
        let previous = maps.config()?;
        let same_object = previous.object_hash == hash;

        let mut adoption = Adoption::default();
        let mut sock_addr = Vec::with_capacity(SOCK_ADDR_PROGRAMS.len());
        for name in SOCK_ADDR_PROGRAMS {
            let prog: CgroupSockAddr = pins::program(&mut ebpf, &pins, name, same_object, &mut adoption)?;
            sock_addr.push((name, pins::CgroupProgram::SockAddr(prog)));
        }
        let sock_ops: SockOps = pins::program(&mut ebpf, &pins, PROG_SOCK_OPS, same_object, &mut adoption)?;
        let tc: SchedClassifier =
            pins::program(&mut ebpf, &pins, PROG_TC_INGRESS, same_object, &mut adoption)?;
        let kubelet_ops: SockOps =
            pins::program(&mut ebpf, &pins, PROG_KUBELET_OPS, same_object, &mut adoption)?;

        let cgroup = std::fs::File::open(&settings.cgroup)
            .map_err(|source| CaptureError::Io { path: settings.cgroup.clone(), source })?;
        sock_addr.push((PROG_SOCK_OPS, pins::CgroupProgram::SockOps(sock_ops)));
        for (name, prog) in &mut sock_addr {
            pins::cgroup_link(&pins, name, prog, &cgroup, &mut adoption)?;
        }
        let kubelet = match &settings.kubelet_cgroup {
            Some(dir) => {
                let io = |source| CaptureError::Io { path: dir.clone(), source };
                let file = std::fs::File::open(dir).map_err(io)?;
                // A cgroup v2 directory's inode number is its cgroup id.
                let id = std::os::unix::fs::MetadataExt::ino(&file.metadata().map_err(io)?);
                Some((file, id))
            }
            None => None,
        };
        let mut kubelet_ops = pins::CgroupProgram::SockOps(kubelet_ops);
        pins::cgroup_link_scoped(
            &pins,
            PROG_KUBELET_OPS,
            &mut kubelet_ops,
            kubelet.as_ref().map(|(f, id)| (f, *id)),
            &mut adoption,
        )?;

        let tc_prog_id = pins::program_id(&tc, PROG_TC_INGRESS)?;
        // The settings go in last: until they are there the programs capture nothing.
        maps.set_config(&Config {
            proxy_mark: settings.proxy_mark,
            flags: Config::flags_with_dns_port(
                if settings.fail_open { CONFIG_FAIL_OPEN } else { 0 }
                    | if settings.trace { CONFIG_TRACE } else { 0 },
                settings.dns_port.unwrap_or(0),
            ),
            outbound_port: settings.outbound_port,
            inbound_port: settings.inbound_port,
            hbone_port: settings.hbone_port,
            log_level: settings.kernel_log_level as u8,
            _pad: 0,
            object_hash: hash,
            delivery_mark: settings.delivery_mark,
        })?;
        adoption.previous_object = (previous.object_hash != 0).then_some(previous.object_hash);
        // Always forwarded: the level can be raised at run time (admin `/logging`), and the
        // programs send nothing while it is off.
        klog::spawn(&mut ebpf).map_err(|e| CaptureError::Logs(e.to_string()))?;
        let config = maps.config_handle();
        let capture = Capture { pins, maps, tc, tc_prog_id, adoption, _ebpf: ebpf };
        Ok(Opened { capture, orig, stats, events, config })
    }

    /// What was re-adopted and what was attached anew at start.
    pub fn adoption(&self) -> &Adoption {
        &self.adoption
    }

    pub fn pin_dir(&self) -> &Path {
        self.pins.root()
    }

    /// The running proxy this one is taking over from (`--takeover`), if any.
    pub fn predecessor(&self) -> Option<i32> {
        self.pins.predecessor()
    }

    pub fn maps(&self) -> &maps::Maps {
        &self.maps
    }

    /// Attaches inbound capture to a pod's interface (or re-adopts the pinned attachment).
    pub fn attach_pod(&mut self, netns: &Netns, interface: &str) -> Result<TcState, CaptureError> {
        tc::attach(&mut self.tc, self.tc_prog_id, &self.pins, netns, interface)
    }

    /// Removes a pod's inbound capture. The netns may be gone already.
    pub fn detach_pod(
        &mut self,
        netns_cookie: NetnsCookie,
        netns: Option<&Netns>,
        interface: &str,
    ) -> Result<(), CaptureError> {
        tc::detach(&self.pins, netns_cookie, netns, interface)
    }

    /// Netns cookies of pods with a pinned inbound attachment.
    pub fn attached_pods(&self) -> Result<Vec<u64>, CaptureError> {
        self.pins.tc_cookies()
    }

    pub fn register_listener(
        &mut self,
        key: ListenerKey,
        sock: &impl std::os::fd::AsRawFd,
    ) -> Result<(), CaptureError> {
        self.maps.register_listener(key, sock)
    }

    /// Tells the inbound program a pod's mesh addresses: do it before attaching to the pod,
    /// which drops SYNs to any address of the pod it does not know.
    pub fn add_pod_ips(&mut self, netns_cookie: NetnsCookie, ips: &[IpAddr]) -> Result<(), CaptureError> {
        for ip in ips {
            self.maps.set_pod_ip(*ip, netns_cookie)?;
        }
        Ok(())
    }

    /// Turns outbound capture on for a pod (its listeners must be registered first).
    pub fn enroll(&mut self, netns_cookie: NetnsCookie, pod_id: u32) -> Result<(), CaptureError> {
        self.maps.enroll(netns_cookie, PodEntry { pod_id, flags: 0 })
    }

    /// Turns outbound capture off for a pod: no new connect is rewritten.
    pub fn unenroll(&mut self, netns_cookie: NetnsCookie) -> Result<(), CaptureError> {
        self.maps.unenroll(netns_cookie)
    }

    /// Removes a pod's addresses from the inbound program's view (after detaching it).
    pub fn remove_pod_ips(&mut self, netns_cookie: NetnsCookie) -> Result<(), CaptureError> {
        for (ip, cookie) in self.maps.pod_ips()? {
            if cookie == netns_cookie.0 {
                self.maps.remove_pod_ip(&ip)?;
            }
        }
        Ok(())
    }
}

/// Removes everything an instance pinned: links (which detaches the programs), programs and
/// maps. Capture stops for every pod the instance had enrolled.
pub fn uninstall(bpffs: &Path, instance: &str) -> Result<Vec<PathBuf>, CaptureError> {
    pins::remove_all(bpffs, instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unit tests link ambit, which a placeholder object stops (build.rs): what they embed
    /// is the real object, an eBPF ELF file.
    #[test]
    fn the_embedded_object_is_an_ebpf_elf_file() {
        let object = object().expect("built with the eBPF toolchain");
        assert_eq!(&object[..4], b"\x7fELF");
        // e_machine (little-endian, at 18): EM_BPF.
        assert_eq!(u16::from_le_bytes([object[18], object[19]]), 247);
    }
}
