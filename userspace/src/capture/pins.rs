//! The bpffs pin directory: programs and cgroup links, adopted when an earlier run of the same
//! object left them, replaced when the object changed.

use std::{
    fs,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, Program, SchedClassifier, SockOps,
    },
    Ebpf,
};
use serde::Serialize;

use super::CaptureError;
use crate::os::cookie::NetnsCookie;

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `<bpffs>/ambit/<instance>`, locked for as long as this value lives: two proxies driving
/// the same pinned state would fight over the pods' listeners.
///
/// Taking over (`--takeover`), the lock is still the predecessor's: this value then names it,
/// and [`super::handover::succeed`] takes the lock once it has gone.
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    _lock: Option<nix::fcntl::Flock<fs::File>>,
    predecessor: Option<i32>,
}

/// What `Capture::open` found and did, for the log and the config dump.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Adoption {
    /// Programs taken over from pins, by name.
    pub adopted_programs: Vec<String>,
    /// Programs loaded from this binary's object.
    pub loaded_programs: Vec<String>,
    /// cgroup links taken over from pins (name, link id).
    pub adopted_links: Vec<(String, u32)>,
    /// cgroup links attached by this run (name, link id).
    pub attached_links: Vec<(String, u32)>,
    /// Hash of the object that created the pinned state, if there was any.
    pub previous_object: Option<u32>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Io { path: path.to_path_buf(), source }
}

impl PinDir {
    pub fn create(bpffs: &Path, instance: &str, takeover: bool) -> Result<PinDir, CaptureError> {
        let st = nix::sys::statfs::statfs(bpffs)
            .map_err(|e| CaptureError::Io { path: bpffs.to_path_buf(), source: e.into() })?;
        if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
            return Err(CaptureError::NotBpffs { path: bpffs.to_path_buf() });
        }
        let root = instance_dir(bpffs, instance);
        for dir in [root.clone(), root.join("tc")] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err(&dir))?;
        }
        match lock_dir(&root) {
            Ok(lock) => Ok(PinDir { root, _lock: Some(lock), predecessor: None }),
            Err(CaptureError::InstanceBusy { path }) if takeover => {
                match super::handover::lock_holder(&root).filter(|pid| *pid != std::process::id() as i32) {
                    Some(pid) => Ok(PinDir { root, _lock: None, predecessor: Some(pid) }),
                    None => Err(CaptureError::InstanceBusy { path }),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The proxy this one takes over from, while it still holds the instance.
    pub fn predecessor(&self) -> Option<i32> {
        self.predecessor
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.root.join(format!("prog_{name}"))
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.root.join(format!("link_{name}"))
    }

    pub fn tc(&self, netns_cookie: NetnsCookie) -> PathBuf {
        self.root.join("tc").join(netns_cookie.to_string())
    }

    pub fn tc_cookies(&self) -> Result<Vec<u64>, CaptureError> {
        let dir = self.root.join("tc");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Some(cookie) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(cookie);
            }
        }
        Ok(out)
    }
}

/// Takes the instance's lock (an flock on its pin directory), failing if a proxy holds it.
fn lock_dir(root: &Path) -> Result<nix::fcntl::Flock<fs::File>, CaptureError> {
    let dir = fs::File::open(root).map_err(io_err(root))?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            CaptureError::InstanceBusy { path: root.to_path_buf() }
        } else {
            CaptureError::Io { path: root.to_path_buf(), source: e.into() }
        }
    })
}

fn instance_dir(bpffs: &Path, instance: &str) -> PathBuf {
    bpffs.join("ambit").join(instance)
}

/// A program type we can load, pin and re-open from a pin.
pub trait Pinnable: Sized {
    fn from_program(p: &mut Program) -> Option<&mut Self>;
    fn from_pin(path: &Path, name: &str) -> Result<Self, aya::programs::ProgramError>;
    fn load(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn pin(&mut self, path: &Path) -> Result<(), aya::pin::PinError>;
    fn info(&self) -> Result<aya::programs::ProgramInfo, aya::programs::ProgramError>;
}

macro_rules! pinnable {
    ($ty:ty, $variant:ident, $from_pin:expr) => {
        impl Pinnable for $ty {
            fn from_program(p: &mut Program) -> Option<&mut Self> {
                match p {
                    Program::$variant(x) => Some(x),
                    _ => None,
                }
            }
            fn from_pin(path: &Path, name: &str) -> Result<Self, aya::programs::ProgramError> {
                $from_pin(path, name)
            }
            fn load(&mut self) -> Result<(), aya::programs::ProgramError> {
                <$ty>::load(self)
            }
            fn pin(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
                <$ty>::pin(self, path)
            }
            fn info(&self) -> Result<aya::programs::ProgramInfo, aya::programs::ProgramError> {
                <$ty>::info(self)
            }
        }
    };
}

pinnable!(SockOps, SockOps, |p: &Path, _| SockOps::from_pin(p));
pinnable!(SchedClassifier, SchedClassifier, |p: &Path, _| { SchedClassifier::from_pin(p) });
pinnable!(CgroupSockAddr, CgroupSockAddr, |p: &Path, name: &str| {
    use aya::programs::cgroup_sock_addr::CgroupSockAddrAttachType as Kind;
    let kind = match name {
        super::PROG_CONNECT6 => Kind::Connect6,
        super::PROG_SENDMSG4 => Kind::UDPSendMsg4,
        super::PROG_SENDMSG6 => Kind::UDPSendMsg6,
        super::PROG_RECVMSG4 => Kind::UDPRecvMsg4,
        super::PROG_RECVMSG6 => Kind::UDPRecvMsg6,
        super::PROG_GETPEERNAME4 => Kind::GetPeerName4,
        super::PROG_GETPEERNAME6 => Kind::GetPeerName6,
        _ => Kind::Connect4,
    };
    CgroupSockAddr::from_pin(p, kind)
});

/// Returns the program `name`: re-opened from its pin when the pinned state was made by this
/// same object, otherwise loaded from the object and pinned (replacing an older pin).
pub fn program<P: Pinnable>(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    name: &'static str,
    same_object: bool,
    adoption: &mut Adoption,
) -> Result<P, CaptureError> {
    let path = pins.program(name);
    if same_object && path.exists() {
        let prog = P::from_pin(&path, name)
            .map_err(|source| CaptureError::Program { name, source: Box::new(source) })?;
        adoption.adopted_programs.push(name.to_string());
        return Ok(prog);
    }
    let taken = ebpf.program_mut(name).and_then(P::from_program).ok_or(CaptureError::MissingProgram(name))?;
    taken.load().map_err(|source| CaptureError::Program { name, source: Box::new(source) })?;
    if path.exists() {
        fs::remove_file(&path).map_err(io_err(&path))?;
    }
    taken.pin(&path).map_err(|source| CaptureError::Pin { path: path.clone(), source: Box::new(source) })?;
    adoption.loaded_programs.push(name.to_string());
    // Hand back an owned handle on the same kernel program, so the caller can keep it without
    // borrowing the object.
    P::from_pin(&path, name).map_err(|source| CaptureError::Program { name, source: Box::new(source) })
}

pub fn program_id<P: Pinnable>(p: &P, name: &'static str) -> Result<u32, CaptureError> {
    p.info().map(|i| i.id()).map_err(|source| CaptureError::Program { name, source: Box::new(source) })
}

/// The cgroup programs, which attach the same way but are different types in aya.
pub enum CgroupProgram {
    SockAddr(CgroupSockAddr),
    SockOps(SockOps),
}

impl CgroupProgram {
    fn id(&self, name: &'static str) -> Result<u32, CaptureError> {
        match self {
            CgroupProgram::SockAddr(p) => program_id(p, name),
            CgroupProgram::SockOps(p) => program_id(p, name),
        }
    }

    /// Attaches through a bpf link and returns it as an fd we can pin. cgroup links always
    /// coexist with other programs on the same cgroup and its ancestors (a CNI's keep
    /// running); the kernel refuses the multi-attach flag on links, since it is implied, so
    /// the mode passed is aya's "no flags".
    fn attach(&mut self, name: &'static str, cgroup: &fs::File) -> Result<FdLink, CaptureError> {
        let err = |source| CaptureError::Program { name, source: Box::new(source) };
        match self {
            CgroupProgram::SockAddr(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
                let link = p.take_link(id).map_err(err)?;
                FdLink::try_from(link)
                    .map_err(|source| CaptureError::Link { path: name.into(), source: Box::new(source) })
            }
            CgroupProgram::SockOps(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
                let link = p.take_link(id).map_err(err)?;
                FdLink::try_from(link)
                    .map_err(|source| CaptureError::Link { path: name.into(), source: Box::new(source) })
            }
        }
    }
}

fn link_err(path: &Path) -> impl FnOnce(LinkError) -> CaptureError + '_ {
    move |source| CaptureError::Link { path: path.to_path_buf(), source: Box::new(source) }
}

/// Makes sure `prog` is attached to the cgroup through the pinned link `link_<name>`:
/// - a pinned link running this very program is adopted as is;
/// - a pinned link running another program (an older ambit) is replaced: the new link is
///   attached and pinned under a temporary name, then renamed over the old pin, which drops
///   the old link. Both run for an instant, which is harmless: the second rewrite sees a
///   loopback destination and leaves it alone.
pub fn cgroup_link(
    pins: &PinDir,
    name: &'static str,
    prog: &mut CgroupProgram,
    cgroup: &fs::File,
    adoption: &mut Adoption,
) -> Result<(), CaptureError> {
    cgroup_link_at(pins, name, &pins.link(name), prog, cgroup, adoption)
}

/// [`cgroup_link`] pinned at `path`.
fn cgroup_link_at(
    pins: &PinDir,
    name: &'static str,
    path: &Path,
    prog: &mut CgroupProgram,
    cgroup: &fs::File,
    adoption: &mut Adoption,
) -> Result<(), CaptureError> {
    let path = path.to_path_buf();
    let prog_id = prog.id(name)?;
    if path.exists() {
        let pinned = PinnedLink::from_pin(&path).map_err(link_err(&path))?;
        let info = FdLink::from(pinned).info().map_err(link_err(&path))?;
        if info.program_id() == prog_id {
            adoption.adopted_links.push((name.to_string(), info.id()));
            return Ok(());
        }
    }
    let link = prog.attach(name, cgroup)?;
    let id = link.info().map_err(link_err(&path))?.id();
    // bpffs reserves names containing dots.
    let tmp = pins.link(&format!("{name}_new"));
    if tmp.exists() {
        fs::remove_file(&tmp).map_err(io_err(&tmp))?;
    }
    link.pin(&tmp).map_err(|source| CaptureError::Pin { path: tmp.clone(), source: Box::new(source) })?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    adoption.attached_links.push((name.to_string(), id));
    Ok(())
}

/// Makes `prog` run on exactly one cgroup, `cgroup` (the kubelet's: a directory and its
/// cgroup id), or on none: its link is pinned as `link_<name>_<cgroup id>`, so a change of
/// cgroup between runs is seen (the old link is removed, which detaches it) rather than
/// adopted.
pub fn cgroup_link_scoped(
    pins: &PinDir,
    name: &'static str,
    prog: &mut CgroupProgram,
    cgroup: Option<(&fs::File, u64)>,
    adoption: &mut Adoption,
) -> Result<(), CaptureError> {
    let wanted = cgroup.map(|(_, id)| pins.link(&format!("{name}_{id}")));
    let prefix = format!("link_{name}_");
    for entry in fs::read_dir(pins.root()).map_err(io_err(pins.root()))? {
        let path = entry.map_err(io_err(pins.root()))?.path();
        let ours = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix));
        if ours && Some(&path) != wanted.as_ref() {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    match (cgroup, wanted) {
        (Some((file, _)), Some(path)) => cgroup_link_at(pins, name, &path, prog, file, adoption),
        _ => Ok(()),
    }
}

/// Removes an instance's pins: links first (detaching the programs), then programs and maps.
pub fn remove_all(bpffs: &Path, instance: &str) -> Result<Vec<PathBuf>, CaptureError> {
    let root = instance_dir(bpffs, instance);
    let mut removed = Vec::new();
    if !root.exists() {
        return Ok(removed);
    }
    // Refuse while a proxy runs on this state; hold the lock until everything is gone.
    let _lock = lock_dir(&root)?;
    let tc = root.join("tc");
    if tc.exists() {
        for entry in fs::read_dir(&tc).map_err(io_err(&tc))? {
            let path = entry.map_err(io_err(&tc))?.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed.push(path);
        }
        fs::remove_dir(&tc).map_err(io_err(&tc))?;
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(&root)
        .map_err(io_err(&root))?
        .map(|e| e.map(|e| e.path()).map_err(io_err(&root)))
        .collect::<Result<_, _>>()?;
    // Links before programs before maps, so nothing is left running on a half-removed state.
    entries.sort_by_key(|p| {
        let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (!n.starts_with("link_"), !n.starts_with("prog_"), n)
    });
    for path in entries {
        fs::remove_file(&path).map_err(io_err(&path))?;
        removed.push(path);
    }
    fs::remove_dir(&root).map_err(io_err(&root))?;
    let parent = bpffs.join("ambit");
    if fs::read_dir(&parent).map(|mut d| d.next().is_none()).unwrap_or(false) {
        fs::remove_dir(&parent).map_err(io_err(&parent))?;
    }
    Ok(removed)
}
