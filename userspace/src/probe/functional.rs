//! Functional probes: ambit's own programs through the verifier, a listener in a sockhash, the
//! cgroup links and the TC attachment — each in scratch places that are removed afterwards, so
//! probing never touches a pod.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, SockHash},
    programs::{
        tc::{self, NlOptions, TcAttachOptions},
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, SockOps, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};

use super::{ProbeError, Report, Status};
use crate::capture::{self, PROG_CONNECT4, PROG_CONNECT6, PROG_SOCK_OPS, PROG_TC_INGRESS};

pub fn run(r: &mut Report, bpffs: &Path, cgroup: &Path) {
    let parent = bpffs.join("ambit");
    let made_parent = !parent.exists();
    let scratch = parent.join(format!("probe-{}", std::process::id()));
    if let Err(e) = fs::create_dir_all(&scratch) {
        r.add("ambit's programs pass the verifier", Status::Error(format!("{}: {e}", scratch.display())));
        return;
    }
    probe_with(r, &scratch, cgroup);
    remove_scratch_pins(&scratch);
    if made_parent {
        // Only if still empty: a proxy may have started meanwhile.
        let _not_empty_is_fine = fs::remove_dir(&parent);
    }
}

fn probe_with(r: &mut Report, scratch: &Path, cgroup: &Path) {
    let object = match capture::object() {
        Ok(o) => o,
        Err(e) => {
            r.add("ambit's programs pass the verifier", Status::Error(e.to_string()));
            return;
        }
    };
    let mut ebpf = match EbpfLoader::new()
        .default_map_pin_directory(scratch)
        .map_pin_path(capture::AYA_LOGS, scratch.join(capture::AYA_LOGS))
        .load(object)
    {
        Ok(e) => e,
        Err(e) => {
            r.add("ambit's programs pass the verifier", Status::Missing(format!("loading the object: {e}")));
            return;
        }
    };
    if let Err(e) = load_all(&mut ebpf) {
        r.add("ambit's programs pass the verifier", Status::Missing(e.to_string()));
        return;
    }
    r.add("ambit's programs pass the verifier", Status::Ok(String::new()));
    r.add("listening sockets in a sockhash", listener_in_sockhash(&mut ebpf));
    r.add("cgroup bpf links", cgroup_links(&mut ebpf, cgroup));
    let (tcx, any) = tc_attach(&mut ebpf);
    r.add("TC classifier on an interface (tcx or clsact)", any);
    r.add("tcx", tcx);
}

/// Loads the four programs; on a verifier refusal, names the helper it did not know.
fn load_all(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    fn explain(name: &'static str, e: ProgramError) -> ProbeError {
        if let ProgramError::LoadError { verifier_log, .. } = &e {
            let log = verifier_log.to_string();
            let reason = log
                .lines()
                .find(|l| {
                    l.contains("unknown func")
                        || l.contains("cannot use helper")
                        || l.contains("invalid func")
                })
                .map(String::from)
                .unwrap_or_else(|| {
                    // The verdict is the last line before the statistics ("processed N insns").
                    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
                    let end = lines.iter().rposition(|l| l.starts_with("processed ")).unwrap_or(lines.len());
                    let start = end.saturating_sub(3);
                    if lines.is_empty() {
                        "(empty verifier log)".into()
                    } else {
                        lines[start..end.max(start + 1).min(lines.len())].join(" | ")
                    }
                });
            return ProbeError::Verifier { name, reason };
        }
        program(name)(e)
    }
    for name in [PROG_CONNECT4, PROG_CONNECT6] {
        let p: &mut CgroupSockAddr = prog(ebpf, name)?;
        p.load().map_err(|e| explain(name, e))?;
    }
    let p: &mut SockOps = prog(ebpf, PROG_SOCK_OPS)?;
    p.load().map_err(|e| explain(PROG_SOCK_OPS, e))?;
    let p: &mut SchedClassifier = prog(ebpf, PROG_TC_INGRESS)?;
    p.load().map_err(|e| explain(PROG_TC_INGRESS, e))?;
    Ok(())
}

/// What failed in program `name`, for `map_err`.
fn program(name: &'static str) -> impl Fn(ProgramError) -> ProbeError {
    move |e| ProbeError::Program { name, source: Box::new(e) }
}

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(ProbeError::NoProgram(name))?;
    p.try_into().map_err(program(name))
}

/// Runs `f` on a thread in a fresh, empty network namespace (gone when the thread ends).
fn in_scratch_netns<T: Send>(f: impl FnOnce() -> Result<T, ProbeError> + Send) -> Result<T, ProbeError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(ProbeError::ScratchNetns)?;
            f()
        })
        .join()
        .unwrap_or(Err(ProbeError::Panicked))
    })
}

fn listener_in_sockhash(ebpf: &mut Ebpf) -> Status {
    let Some(map) = ebpf.map_mut(ambit_common::maps::MAP_LISTENERS) else {
        return Status::Error("listener map missing from the object".into());
    };
    let mut map: SockHash<&mut MapData, ambit_common::maps::ListenerKey> = match SockHash::try_from(map) {
        Ok(m) => m,
        Err(e) => return Status::Error(e.to_string()),
    };
    let r = in_scratch_netns(|| {
        let l = std::net::TcpListener::bind("0.0.0.0:0")
            .map_err(|source| ProbeError::Io { what: "listening".into(), source })?;
        let key = ambit_common::maps::ListenerKey::default();
        let map_err = |what| move |e| ProbeError::Map { what, source: Box::new(e) };
        map.insert(key, std::os::fd::AsRawFd::as_raw_fd(&l), 0).map_err(map_err("inserting a listener"))?;
        map.remove(&key).map_err(map_err("removing the listener"))
    });
    match r {
        Ok(()) => Status::Ok(String::new()),
        Err(e) => Status::Missing(e.to_string()),
    }
}

/// Attaches the three cgroup programs to a scratch child of `cgroup`, then detaches them.
fn cgroup_links(ebpf: &mut Ebpf, cgroup: &Path) -> Status {
    let scratch: PathBuf = cgroup.join(format!("ambit-probe-{}", std::process::id()));
    if let Err(e) = fs::create_dir(&scratch) {
        return Status::Error(format!("creating {}: {e}", scratch.display()));
    }
    let result = (|| -> Result<(), ProbeError> {
        let dir = fs::File::open(&scratch)
            .map_err(|source| ProbeError::Io { what: format!("opening {}", scratch.display()), source })?;
        let not_a_link = |name| move |e| ProbeError::NotALink { name, source: Box::new(e) };
        for name in [PROG_CONNECT4, PROG_CONNECT6] {
            let p: &mut CgroupSockAddr = prog(ebpf, name)?;
            let id = p.attach(&dir, CgroupAttachMode::Single).map_err(program(name))?;
            let link = p.take_link(id).map_err(program(name))?;
            aya::programs::links::FdLink::try_from(link).map_err(not_a_link(name))?;
        }
        let p: &mut SockOps = prog(ebpf, PROG_SOCK_OPS)?;
        let id = p.attach(&dir, CgroupAttachMode::Single).map_err(program(PROG_SOCK_OPS))?;
        let link = p.take_link(id).map_err(program(PROG_SOCK_OPS))?;
        aya::programs::links::FdLink::try_from(link).map_err(not_a_link(PROG_SOCK_OPS))?;
        Ok(())
    })();
    // The links were dropped (detached) above; the cgroup is empty.
    if let Err(e) = fs::remove_dir(&scratch) {
        tracing::warn!(path = %scratch.display(), error = %e, "removing the probe's scratch cgroup");
    }
    match result {
        Ok(()) => Status::Ok(String::new()),
        Err(e) => Status::Missing(e.to_string()),
    }
}

/// Attaches the classifier to `lo` of a scratch netns: with tcx where the kernel has it, else
/// through a clsact qdisc. Returns the tcx finding and the overall one.
fn tc_attach(ebpf: &mut Ebpf) -> (Status, Status) {
    let p: &mut SchedClassifier = match prog(ebpf, PROG_TC_INGRESS) {
        Ok(p) => p,
        Err(e) => return (Status::Error(e.to_string()), Status::Error(e.to_string())),
    };
    let tcx_expected = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    let tcx = if tcx_expected {
        in_scratch_netns(|| {
            let id = p
                .attach_with_options(
                    "lo",
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(program(PROG_TC_INGRESS))?;
            drop(p.take_link(id).map_err(program(PROG_TC_INGRESS))?);
            Ok(())
        })
    } else {
        Err(ProbeError::KernelOlderThan("6.6"))
    };
    match tcx {
        Ok(()) => (Status::Ok(String::new()), Status::Ok("tcx".into())),
        Err(tcx_err) => {
            let clsact = in_scratch_netns(|| {
                tc::qdisc_add_clsact("lo").map_err(|e| ProbeError::Clsact(Box::new(e)))?;
                let opts = TcAttachOptions::Netlink(NlOptions::default());
                let id = p
                    .attach_with_options("lo", TcAttachType::Ingress, opts)
                    .map_err(program(PROG_TC_INGRESS))?;
                drop(p.take_link(id).map_err(program(PROG_TC_INGRESS))?);
                Ok(())
            });
            let any = match clsact {
                Ok(()) => Status::Ok("clsact + cls_bpf".into()),
                Err(e) => Status::Missing(e.to_string()),
            };
            (Status::Missing(tcx_err.to_string()), any)
        }
    }
}

fn remove_scratch_pins(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Err(err) = fs::remove_file(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "removing a probe pin");
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        tracing::warn!(path = %dir.display(), error = %e, "removing the probe's scratch pins");
    }
}
