//! Network namespace handles: the node proxy works inside pods' namespaces by switching one
//! thread into the pod's netns just long enough to create a socket, then back. A socket stays
//! in the netns it was created in for its whole life, wherever it is used from.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{setns, CloneFlags};

use super::cookie::{NetnsCookie, SocketCookie};

/// The netns the proxy itself runs in, captured before any thread switches away from it.
static HOST_NETNS: OnceLock<OwnedFd> = OnceLock::new();

fn host_netns() -> io::Result<&'static OwnedFd> {
    if let Some(fd) = HOST_NETNS.get() {
        return Ok(fd);
    }
    // Only `Netns::run` moves threads, and it always moves them back before returning, so
    // whichever thread gets here first is in the host netns.
    let fd: OwnedFd = File::open("/proc/thread-self/ns/net")?.into();
    Ok(HOST_NETNS.get_or_init(|| fd))
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
    cookie: NetnsCookie,
}

impl Netns {
    /// Opens the netns at `path` (e.g. `/var/run/netns/x` or `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        if !is_netns_fd(&file)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a network namespace", path.display()),
            ));
        }
        let fd: OwnedFd = file.into();
        let mut ns = Netns { fd, path: path.to_path_buf(), cookie: NetnsCookie(0) };
        let probe = ns.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))??;
        ns.cookie = netns_cookie(&probe)?;
        Ok(ns)
    }

    /// The namespace the calling process runs in.
    pub fn host() -> io::Result<Netns> {
        let fd = host_netns()?.try_clone()?;
        let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        Ok(Netns { fd, path: PathBuf::from("/proc/self/ns/net"), cookie: netns_cookie(&probe)? })
    }

    /// The kernel's cookie for this netns: what the eBPF programs see via
    /// `bpf_get_netns_cookie` and what the maps are keyed by. Stable for the netns's lifetime.
    pub fn cookie(&self) -> NetnsCookie {
        self.cookie
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the calling thread while it is inside this netns. Sockets `f` creates
    /// belong to this netns. `f` must not block or await: the thread is back in the host
    /// netns when `run` returns.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> io::Result<R> {
        let host = host_netns()?;
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(e) = setns(host.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stuck in a pod's netns would create every later socket there:
            // there is no safe way to continue.
            eprintln!("ambit: fatal: cannot return a thread to the host network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }
}

/// Reads a u64 socket option of `SOL_SOCKET`.
fn u64_sockopt(sock: &impl AsRawFd, opt: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes passed; the kernel writes
    // at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, opt, (&raw mut value).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Reads `SO_NETNS_COOKIE` of a socket: the cookie of the netns the socket lives in.
pub fn netns_cookie(sock: &impl AsRawFd) -> io::Result<NetnsCookie> {
    u64_sockopt(sock, libc::SO_NETNS_COOKIE).map(NetnsCookie)
}

/// Reads `SO_COOKIE`: the socket's own cookie, as the eBPF programs see it
/// (`bpf_get_socket_cookie`), which is how kernel trace events find their connection. The
/// kernel numbers sockets from 1, so a cookie is never zero (and an `Option` of one costs
/// no more than the cookie).
pub fn socket_cookie(sock: &impl AsRawFd) -> io::Result<SocketCookie> {
    SocketCookie::new(u64_sockopt(sock, libc::SO_COOKIE)?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "SO_COOKIE returned 0"))
}

fn is_netns_fd(file: &File) -> io::Result<bool> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd; a non-namespace fd
    // makes it fail with ENOTTY, which is an answer, not an error.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTTY) | Some(libc::EINVAL) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(rc == libc::CLONE_NEWNET)
}

/// Whether `path` names a network namespace (the mesh file's check).
pub fn is_network_namespace(path: &Path) -> io::Result<bool> {
    is_netns_fd(&File::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_netns_is_a_netns_and_other_files_are_not() {
        assert!(is_network_namespace(Path::new("/proc/self/ns/net")).expect("opens"));
        assert!(!is_network_namespace(Path::new("/proc/self/ns/uts")).expect("opens"));
        assert!(!is_network_namespace(Path::new("/proc/self/status")).expect("opens"));
        assert!(is_network_namespace(Path::new("/nonexistent/netns")).is_err());
    }

    #[test]
    fn host_cookie_matches_a_socket_made_here() {
        let host = Netns::host().expect("host netns");
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
        assert_eq!(host.cookie(), netns_cookie(&s).expect("cookie"));
        assert_ne!(host.cookie().0, 0);
    }
}
