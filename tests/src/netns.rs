//! Talking to services inside the bed's namespaces from the test process itself: a thread
//! enters the namespace, creates the socket (which stays in that namespace), and returns.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context};

/// Connects to `addr` from inside the network namespace at `netns`.
pub fn connect_in(netns: &Path, addr: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> anyhow::Result<TcpStream> {
        let f = std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        // This thread ends right after: it never needs to go back.
        Ok(TcpStream::connect_timeout(&addr, timeout)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
}

/// A plain HTTP/1.0 request inside a netns; returns (status, body).
pub fn http(netns: &Path, method: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = connect_in(netns, addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    if !head.starts_with("HTTP/1.") {
        bail!("not an HTTP response: {head:?}");
    }
    Ok((status, body.to_string()))
}
