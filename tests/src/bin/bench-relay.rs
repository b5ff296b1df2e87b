//! The "proxy plus iptables" baseline of `cargo xtask bench`: a plain userspace TCP relay
//! with its listeners inside each pod's network namespace, fed by iptables REDIRECT there
//! (the bench installs the rules), as sidecar-less meshes did before eBPF.
//!
//! `bench-relay [--splice] <mark> <pod netns path>...`: for each pod, listeners on
//! 0.0.0.0:15001 (outbound, REDIRECTed from OUTPUT) and 0.0.0.0:15006 (inbound, REDIRECTed
//! from PREROUTING); each accepted connection goes to its original destination
//! (`SO_ORIGINAL_DST`) from the same namespace, with `mark` so the rules let it pass, and
//! bytes are copied both ways with 64 KiB buffers.
//!
//! `--splice` moves the bytes with `splice(2)` through a 64 KiB pipe instead: no copy
//! through userspace at all, the least CPU any proxy that terminates TCP can spend per byte
//! on this kernel. It is the bench's floor, not a model of a mesh: nothing a proxy has to
//! look at (TLS, HTTP/2 framing) can be spliced.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    process::ExitCode,
    sync::Arc,
};

use socket2::{Domain, Protocol, Socket, Type};

const OUTBOUND: u16 = 15001;
const INBOUND: u16 = 15006;
const BUF: usize = 64 * 1024;

/// The relay's own network namespace (the node's), to come back to.
static HOST: std::sync::OnceLock<File> = std::sync::OnceLock::new();

/// Runs `f` with the calling thread inside the network namespace `ns`, as the node proxy
/// does (two setns calls, no thread); sockets made there stay there.
fn in_netns<T>(ns: Arc<File>, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    let host = HOST.get().expect("set at start");
    nix::sched::setns(&*ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
    let out = f();
    if let Err(e) = nix::sched::setns(host, nix::sched::CloneFlags::CLONE_NEWNET) {
        eprintln!("bench-relay: cannot return to the node's network namespace: {e}");
        std::process::abort();
    }
    out
}

fn original_dst(s: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    let mut addr: libc::sockaddr_in = unsafe_zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes of the sizes given; the kernel writes at
    // most `len` bytes (a sockaddr_in) for SO_ORIGINAL_DST.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_IP, libc::SO_ORIGINAL_DST, (&raw mut addr).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port))))
}

fn unsafe_zeroed() -> libc::sockaddr_in {
    libc::sockaddr_in { sin_family: 0, sin_port: 0, sin_addr: libc::in_addr { s_addr: 0 }, sin_zero: [0; 8] }
}

async fn relay(ns: Arc<File>, mark: u32, mut client: tokio::net::TcpStream) -> std::io::Result<()> {
    let dst = original_dst(&client)?;
    let sock = in_netns(ns, move || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_mark(mark)?;
        s.set_tcp_nodelay(true)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })?;
    let mut upstream = tokio::net::TcpSocket::from_std_stream(sock.into()).connect(dst).await?;
    client.set_nodelay(true)?;
    if SPLICE.get().copied().unwrap_or(false) {
        let (a, b) = tokio::join!(splice_one_way(&client, &upstream), splice_one_way(&upstream, &client));
        a.and(b)
    } else {
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await?;
        Ok(())
    }
}

/// Whether to relay with `splice(2)` (`--splice`).
static SPLICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// A pipe's two ends, closed on drop.
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

fn pipe() -> std::io::Result<Pipe> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok(Pipe { read, write })
}

/// `splice(from, to, len)`, non-blocking on both ends.
fn splice(from: std::os::fd::RawFd, to: std::os::fd::RawFd, len: usize) -> std::io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: no offsets are passed (both ends are a socket or a pipe); the descriptors are
    // open for the call's duration (borrowed from live sockets and the pipe).
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves bytes from `src` to `dst` through a pipe until `src` ends, then shuts `dst`'s
/// sending side. The pipe is drained before reading again, so a read that would block
/// means the socket has nothing, never that the pipe is full.
async fn splice_one_way(src: &tokio::net::TcpStream, dst: &tokio::net::TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    use tokio::io::Interest;
    let p = pipe()?;
    loop {
        src.readable().await?;
        let n = match src.try_io(Interest::READABLE, || splice(src.as_raw_fd(), p.write.as_raw_fd(), BUF)) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            let sock = socket2::SockRef::from(dst);
            return sock.shutdown(std::net::Shutdown::Write);
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || splice(p.read.as_raw_fd(), dst.as_raw_fd(), left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let splice = args.get(1).is_some_and(|a| a == "--splice");
    if splice {
        args.remove(1);
    }
    SPLICE.set(splice).expect("once");
    if args.len() < 3 {
        eprintln!("usage: bench-relay [--splice] <mark> <pod netns>...");
        return ExitCode::from(2);
    }
    HOST.set(File::open("/proc/self/ns/net").expect("own netns")).expect("once");
    let mark: u32 = args[1]
        .strip_prefix("0x")
        .map_or_else(|| args[1].parse(), |h| u32::from_str_radix(h, 16))
        .expect("mark");
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        for path in &args[2..] {
            let ns = Arc::new(File::open(path).unwrap_or_else(|e| panic!("{path}: {e}")));
            for port in [OUTBOUND, INBOUND] {
                let l = in_netns(ns.clone(), move || {
                    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                    s.set_reuse_address(true)?;
                    s.set_nonblocking(true)?;
                    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
                    s.listen(4096)?;
                    Ok(s)
                })
                .unwrap_or_else(|e| panic!("listening in {path} on {port}: {e}"));
                let l = tokio::net::TcpListener::from_std(l.into()).expect("tokio listener");
                let ns = ns.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok((c, _)) = l.accept().await else { continue };
                        let ns = ns.clone();
                        tokio::spawn(async move {
                            if let Err(e) = relay(ns, mark, c).await {
                                eprintln!("relay: {e}");
                            }
                        });
                    }
                });
            }
        }
        println!("relaying");
        std::future::pending::<()>().await;
    });
    ExitCode::SUCCESS
}
