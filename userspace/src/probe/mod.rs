//! What the kernel offers, checked before anything is attached.
//!
//! `ambit node` runs these probes at start and refuses, with one message naming every missing
//! feature and the kernel version that brought it, when the kernel cannot run ambit — it never
//! starts capturing with part of the programs missing. `ambit probe` prints the same findings.
//!
//! The floor is Linux 5.14: `SO_NETNS_COOKIE`, with which the proxy learns the cookie of a
//! pod's network namespace (the key of every capture map), is the newest facility ambit needs.
//! Everything else arrived earlier (see [`REQUIREMENTS`]). tcx (6.6) is optional: older
//! kernels get a clsact qdisc and a cls_bpf filter instead.

mod functional;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapError, MapType},
    programs::{links::LinkError, tc::TcError, ProgramError, ProgramType},
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use serde::Serialize;

/// The oldest kernel ambit runs on.
pub const MIN_KERNEL: &str = "5.14";

/// One thing ambit needs (or can use) from the kernel.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Requirement {
    pub name: &'static str,
    /// The upstream Linux version that introduced it.
    pub since: &'static str,
    /// Optional features degrade (with the fallback named in `used_for`) instead of refusing.
    pub required: bool,
    pub used_for: &'static str,
}

const fn req(name: &'static str, since: &'static str, used_for: &'static str) -> Requirement {
    Requirement { name, since, required: true, used_for }
}

/// Everything probed, in the order reported.
pub const REQUIREMENTS: &[Requirement] = &[
    req("bpf filesystem", "4.4", "pinning programs, maps and links across proxy restarts"),
    req("cgroup v2", "4.5", "attaching the connect and sock_ops programs"),
    req("program type cgroup_sock_addr", "4.17", "outbound capture (connect4/connect6)"),
    req("program type sock_ops", "4.13", "handing original destinations to the proxy"),
    req("program type sched_cls", "4.1", "inbound capture on the pod's interface"),
    req("map type hash", "3.19", "enrolled pods, pod addresses, node addresses"),
    req("map type lru_hash", "4.10", "captured connections"),
    req("map type array", "3.19", "settings"),
    req("map type percpu_array", "4.6", "counters"),
    req("map type sockhash", "4.18", "the proxy's in-pod listeners"),
    req("map type ringbuf", "5.8", "kernel-side logs"),
    req("helper bpf_get_netns_cookie in cgroup_sock_addr", "5.7", "scoping capture to enrolled pods"),
    req("helper bpf_get_socket_cookie in cgroup_sock_addr", "4.19", "remembering original destinations"),
    req("helper bpf_sk_release in cgroup_sock_addr", "5.2", "checking that the proxy is there"),
    req("helper bpf_get_socket_cookie in sock_ops", "4.19", "finding the connect's record"),
    req("helper bpf_sock_ops_cb_flags_set in sock_ops", "4.16", "cleaning records up at close"),
    req("helper bpf_sk_assign in sched_cls", "5.7", "steering inbound SYNs to the proxy"),
    req("helper bpf_sk_release in sched_cls", "4.20", "steering inbound SYNs to the proxy"),
    req("socket option SO_NETNS_COOKIE", "5.14", "keying capture by the pod's network namespace"),
    req("ambit's programs pass the verifier", "5.14", "all of capture"),
    req("listening sockets in a sockhash", "5.7", "registering the in-pod listeners"),
    req("cgroup bpf links", "5.7", "attaching the cgroup programs so they can be pinned"),
    req("TC classifier on an interface (tcx or clsact)", "4.5", "inbound capture"),
    Requirement {
        name: "tcx",
        since: "6.6",
        required: false,
        used_for: "pinnable inbound attachments; without it: clsact qdisc + cls_bpf filter",
    },
    Requirement {
        name: "kernel BTF",
        since: "5.4",
        required: false,
        used_for: "not needed by ambit's programs (reported for diagnosis)",
    },
];

fn requirement(name: &str) -> Requirement {
    *REQUIREMENTS.iter().find(|r| r.name == name).expect("every probe names a listed requirement")
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", content = "detail", rename_all = "snake_case")]
pub enum Status {
    Ok(String),
    Missing(String),
    /// The probe itself failed (typically: not permitted).
    Error(String),
}

/// A probe that could not answer, or the step of a functional probe that failed; its text is
/// the finding's detail.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A feature test's syscall failed (rather than said no). Its causes are written into
    /// the text, so it has no source.
    #[error("{}", syscall_detail(.0.as_ref()))]
    Syscall(Box<dyn std::error::Error + Send + Sync>),
    #[error("{}: {source}", .path.display())]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{0} is not in the object")]
    NoProgram(&'static str),
    #[error("{name} refused by the verifier: {reason}")]
    Verifier { name: &'static str, reason: String },
    #[error("{name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{name}: not attached through a bpf link: {source}")]
    NotALink {
        name: &'static str,
        #[source]
        source: Box<LinkError>,
    },
    #[error("{what}: {source}")]
    Map {
        what: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("creating a scratch network namespace: {0}")]
    ScratchNetns(#[source] nix::Error),
    #[error("adding a clsact qdisc: {0}")]
    Clsact(#[source] Box<TcError>),
    #[error("probe thread panicked")]
    Panicked,
    /// Not tried: the kernel predates the feature.
    #[error("kernel older than {0}")]
    KernelOlderThan(&'static str),
}

/// A syscall's error with its causes; `not permitted` first when that is why, as the
/// refusal's headline counts those.
fn syscall_detail(e: &(dyn std::error::Error + 'static)) -> String {
    let msg = crate::errors::chain(e);
    if msg.contains("Operation not permitted") {
        format!("not permitted ({msg})")
    } else {
        msg
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    #[serde(flatten)]
    pub requirement: Requirement,
    #[serde(flatten)]
    pub status: Status,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, name: &str, status: Status) {
        self.findings.push(Finding { requirement: requirement(name), status });
    }

    fn add_bool(&mut self, name: &str, r: Result<bool, ProbeError>) {
        self.add(
            name,
            match r {
                Ok(true) => Status::Ok(String::new()),
                Ok(false) => Status::Missing("not supported by this kernel".into()),
                Err(e) => Status::Error(e.to_string()),
            },
        );
    }

    /// Required findings that are not OK.
    pub fn blockers(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.requirement.required && !matches!(f.status, Status::Ok(_)))
    }

    pub fn supported(&self) -> bool {
        self.blockers().next().is_none()
    }

    /// The refusal message: every blocker, with the version that brought it.
    pub fn refusal(&self) -> Option<String> {
        let blockers: Vec<&Finding> = self.blockers().collect();
        if blockers.is_empty() {
            return None;
        }
        let not_permitted = self
            .findings
            .iter()
            .filter(|f| matches!(&f.status, Status::Error(e) if e.contains("not permitted")))
            .count();
        let blocked = |name: &str| blockers.iter().any(|f| f.requirement.name == name);
        // The cause first, and what to do about it; the kernel is blamed only when nothing
        // else explains the missing features.
        let headline = if not_permitted > 0 {
            format!(
                "ambit needs root, or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_PTRACE: the kernel \
                 refused {not_permitted} of its checks as not permitted"
            )
        } else if blocked("bpf filesystem") {
            "no bpf filesystem where ambit pins its programs: mount one (`mount -t bpf bpf /sys/fs/bpf`) \
             or point --bpffs at one"
                .to_string()
        } else if blocked("cgroup v2") {
            "no cgroup v2 hierarchy: ambit attaches its programs to cgroup v2 (point --cgroup at its mount)"
                .to_string()
        } else {
            format!(
                "this kernel ({}) cannot run ambit, which needs Linux {MIN_KERNEL} or newer with BPF, cgroup v2 and a \
                 bpf filesystem",
                self.kernel
            )
        };
        const LISTED: usize = 6;
        let mut out = format!("{headline}. Missing:");
        for f in blockers.iter().take(LISTED) {
            let detail = match &f.status {
                Status::Missing(d) | Status::Error(d) => d.as_str(),
                Status::Ok(_) => "",
            };
            out.push_str(&format!(
                "\n  - {} (Linux {}+, for {}): {detail}",
                f.requirement.name, f.requirement.since, f.requirement.used_for
            ));
        }
        if blockers.len() > LISTED {
            out.push_str(&format!(
                "\n  - and {} more (`ambit probe` lists every check)",
                blockers.len() - LISTED
            ));
        }
        Some(out)
    }

    /// Whether inbound capture will use tcx (else clsact).
    pub fn has_tcx(&self) -> bool {
        self.findings.iter().any(|f| f.requirement.name == "tcx" && matches!(f.status, Status::Ok(_)))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {} (ambit needs {MIN_KERNEL}+)", self.kernel)?;
        for x in &self.findings {
            let (mark, detail) = match &x.status {
                Status::Ok(d) => ("ok", d.as_str()),
                Status::Missing(d) if !x.requirement.required => ("absent (optional)", d.as_str()),
                Status::Missing(d) => ("MISSING", d.as_str()),
                Status::Error(d) => ("ERROR", d.as_str()),
            };
            let detail = if detail.is_empty() { String::new() } else { format!(" — {detail}") };
            writeln!(f, "  {mark:<18} {:<50} {:>5}+{detail}", x.requirement.name, x.requirement.since)?;
        }
        Ok(())
    }
}

fn syscall_result<E: std::error::Error + Send + Sync + 'static>(
    r: Result<bool, E>,
) -> Result<bool, ProbeError> {
    r.map_err(|e| ProbeError::Syscall(Box::new(e)))
}

/// Probes everything in [`REQUIREMENTS`]. `bpffs` and `cgroup` are the ones `ambit node` will
/// use; the functional probes work in a scratch pin directory, a scratch child cgroup and a
/// scratch network namespace, and remove them again.
pub fn run(bpffs: &Path, cgroup: &Path) -> Report {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mut r = Report { kernel, findings: Vec::new() };

    r.add_bool("bpf filesystem", fs_magic(bpffs, 0xcafe_4a11));
    r.add_bool("cgroup v2", fs_magic(cgroup, 0x6367_7270));
    for (name, t) in [
        ("program type cgroup_sock_addr", ProgramType::CgroupSockAddr),
        ("program type sock_ops", ProgramType::SockOps),
        ("program type sched_cls", ProgramType::SchedClassifier),
    ] {
        r.add_bool(name, syscall_result(is_program_supported(t)));
    }
    for (name, t) in [
        ("map type hash", MapType::Hash),
        ("map type lru_hash", MapType::LruHash),
        ("map type array", MapType::Array),
        ("map type percpu_array", MapType::PerCpuArray),
        ("map type sockhash", MapType::SockHash),
        ("map type ringbuf", MapType::RingBuf),
    ] {
        r.add_bool(name, syscall_result(is_map_supported(t)));
    }
    for (name, t, h) in [
        (
            "helper bpf_get_netns_cookie in cgroup_sock_addr",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
        (
            "helper bpf_get_socket_cookie in cgroup_sock_addr",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
        (
            "helper bpf_sk_release in cgroup_sock_addr",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_sk_release,
        ),
        (
            "helper bpf_get_socket_cookie in sock_ops",
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
        (
            "helper bpf_sock_ops_cb_flags_set in sock_ops",
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_sock_ops_cb_flags_set,
        ),
        ("helper bpf_sk_assign in sched_cls", ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_sk_assign),
        ("helper bpf_sk_release in sched_cls", ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_sk_release),
    ] {
        r.add_bool(name, syscall_result(is_helper_supported(t, h)));
    }
    r.add("socket option SO_NETNS_COOKIE", netns_cookie_option());
    // Loading and attaching the real programs only makes sense when the basics are there.
    if r.supported() {
        functional::run(&mut r, bpffs, cgroup);
    }
    r.add(
        "kernel BTF",
        if Path::new("/sys/kernel/btf/vmlinux").exists() {
            Status::Ok("/sys/kernel/btf/vmlinux".into())
        } else {
            Status::Missing("no /sys/kernel/btf/vmlinux".into())
        },
    );
    r
}

fn fs_magic(path: &Path, magic: i64) -> Result<bool, ProbeError> {
    let st = nix::sys::statfs::statfs(path)
        .map_err(|source| ProbeError::Statfs { path: path.to_path_buf(), source })?;
    Ok(st.filesystem_type().0 as i64 == magic)
}

fn netns_cookie_option() -> Status {
    let probe = match socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None) {
        Ok(s) => s,
        Err(e) => return Status::Error(format!("socket: {e}")),
    };
    match crate::os::netns::netns_cookie(&probe) {
        Ok(c) if c.0 != 0 => Status::Ok(String::new()),
        Ok(_) => Status::Missing("the kernel returned cookie 0".into()),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
            Status::Missing(format!("getsockopt(SO_NETNS_COOKIE): {e}"))
        }
        Err(e) => Status::Error(format!("getsockopt(SO_NETNS_COOKIE): {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_every_missing_required_feature_with_its_version() {
        let mut r = Report { kernel: "5.10.0-test".into(), findings: Vec::new() };
        r.add("bpf filesystem", Status::Ok(String::new()));
        r.add("socket option SO_NETNS_COOKIE", Status::Missing("getsockopt: Protocol not available".into()));
        r.add("helper bpf_sk_assign in sched_cls", Status::Missing("not supported by this kernel".into()));
        r.add("tcx", Status::Missing("kernel older than 6.6".into()));
        let msg = r.refusal().expect("refused");
        assert!(
            msg.starts_with("this kernel (5.10.0-test) cannot run ambit, which needs Linux 5.14 or newer"),
            "{msg}"
        );
        assert!(msg.contains("socket option SO_NETNS_COOKIE (Linux 5.14+, for keying capture"), "{msg}");
        assert!(msg.contains("helper bpf_sk_assign in sched_cls (Linux 5.7+"), "{msg}");
        assert!(!msg.contains("tcx"), "optional features do not refuse: {msg}");
        assert!(!r.supported());
    }

    #[test]
    fn optional_features_do_not_refuse() {
        let mut r = Report { kernel: "6.1.0-test".into(), findings: Vec::new() };
        r.add("bpf filesystem", Status::Ok(String::new()));
        r.add("tcx", Status::Missing("kernel older than 6.6".into()));
        r.add("kernel BTF", Status::Missing("no /sys/kernel/btf/vmlinux".into()));
        assert!(r.supported());
        assert_eq!(r.refusal(), None);
        assert!(!r.has_tcx());
        assert!(r.to_string().contains("absent (optional)"));
    }

    #[test]
    fn a_refused_probe_points_at_privileges() {
        let mut r = Report { kernel: "6.18".into(), findings: Vec::new() };
        r.add(
            "program type sock_ops",
            Status::Error("not permitted (bpf_prog_load: Operation not permitted)".into()),
        );
        let msg = r.refusal().expect("refused");
        assert!(msg.starts_with("ambit needs root, or CAP_BPF"), "the cause comes first: {msg}");
        assert!(!msg.contains("this kernel"), "the kernel is not to blame: {msg}");
    }

    #[test]
    fn a_missing_bpffs_is_named_as_such_with_the_fix() {
        let mut r = Report { kernel: "6.18".into(), findings: Vec::new() };
        r.add("bpf filesystem", Status::Missing("/sys/fs/bpf: not a bpf filesystem".into()));
        r.add("map type sockhash", Status::Ok(String::new()));
        let msg = r.refusal().expect("refused");
        assert!(
            msg.starts_with("no bpf filesystem") && msg.contains("mount -t bpf bpf /sys/fs/bpf"),
            "{msg}"
        );
        assert!(!msg.contains("this kernel"), "{msg}");
    }

    #[test]
    fn a_long_refusal_lists_a_few_per_line_and_points_at_probe() {
        let mut r = Report { kernel: "4.19".into(), findings: Vec::new() };
        for req in REQUIREMENTS.iter().filter(|q| q.required) {
            r.add(req.name, Status::Missing("not supported by this kernel".into()));
        }
        let msg = r.refusal().expect("refused");
        let lines: Vec<&str> = msg.lines().collect();
        assert!(lines.len() <= 8, "{msg}");
        assert!(lines.iter().all(|l| l.len() < 300), "{msg}");
        assert!(msg.contains("`ambit probe` lists every check"), "{msg}");
    }

    #[test]
    fn a_syscall_refused_as_not_permitted_says_so_first() {
        let e = syscall_result::<std::io::Error>(Err(std::io::Error::from_raw_os_error(libc::EPERM)))
            .expect_err("refused");
        let mut r = Report { kernel: "6.18".into(), findings: Vec::new() };
        r.add_bool("program type sock_ops", Err(e));
        let msg = r.refusal().expect("refused");
        assert!(msg.contains("not permitted (Operation not permitted"), "{msg}");
        assert!(msg.starts_with("ambit needs root"), "{msg}");
    }

    #[test]
    fn every_requirement_is_named_once() {
        for (i, a) in REQUIREMENTS.iter().enumerate() {
            assert!(REQUIREMENTS[i + 1..].iter().all(|b| b.name != a.name), "{} twice", a.name);
        }
    }
}
