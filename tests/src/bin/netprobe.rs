//! A small TCP tool for the test bed:
//!
//! - `netprobe sink <listen addr>`: for each connection, read to end of stream, hashing, then
//!   answer `<bytes> <sha256>` and close;
//! - `netprobe echo <listen addr>`: echo every connection's bytes back;
//! - `netprobe send <addr> <bytes> [seed]`: send that many pseudo-random bytes, half-close,
//!   read the sink's answer; print both sides and exit 1 if they differ;
//! - `netprobe chat <addr>`: one long-lived connection driven by stdin lines; prints each
//!   echoed line, exits on stdin EOF or a connection error (message on stderr);
//! - `netprobe hold <addr> <n> <seconds>`: opens `n` connections to an echo server at once,
//!   checks each with one echoed line, prints `held <n>`, keeps them open for `seconds`;
//! - `netprobe connect-each <file>`: for each `tcp|udp <ip:port>` line of the file, a
//!   non-blocking connect; prints `<line> -> <peer address or error>` per line, then `done`,
//!   and keeps every socket open until stdin closes (what the connect hooks decided is
//!   then in the peer each socket shows).
//!
//! Servers print `listening <addr>` once they accept connections.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

use sha2::{Digest, Sha256};

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn listen(addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().expect("listen address");
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    println!("listening {addr}");
    std::io::stdout().flush().expect("stdout");
    l
}

fn sink(mut s: TcpStream) -> std::io::Result<()> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    writeln!(s, "{total} {}", hex(&h.finalize()))?;
    s.shutdown(Shutdown::Write)
}

fn echo(mut s: TcpStream) -> std::io::Result<()> {
    let mut r = s.try_clone()?;
    std::io::copy(&mut r, &mut s)?;
    s.shutdown(Shutdown::Write)
}

fn serve(addr: &str, handler: fn(TcpStream) -> std::io::Result<()>) -> ExitCode {
    for conn in listen(addr).incoming() {
        match conn {
            Ok(s) => {
                thread::spawn(move || {
                    if let Err(e) = handler(s) {
                        eprintln!("connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
    ExitCode::SUCCESS
}

/// xorshift64*: fast, deterministic filler.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn send(addr: &str, bytes: u64, seed: u64) -> ExitCode {
    let addr: SocketAddr = addr.parse().expect("address");
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect {addr}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut h = Sha256::new();
    let mut state = seed | 1;
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut state, &mut buf[..n]);
        h.update(&buf[..n]);
        if let Err(e) = s.write_all(&buf[..n]) {
            eprintln!("send: {e} after {} bytes", bytes - left);
            return ExitCode::from(2);
        }
        left -= n as u64;
    }
    let sent = format!("{bytes} {}", hex(&h.finalize()));
    if let Err(e) = s.shutdown(Shutdown::Write) {
        eprintln!("shutdown: {e}");
        return ExitCode::from(2);
    }
    let mut reply = String::new();
    if let Err(e) = s.read_to_string(&mut reply) {
        eprintln!("reading the sink's answer: {e}");
        return ExitCode::from(2);
    }
    let reply = reply.trim();
    println!("sent {sent}");
    println!("received {reply}");
    if reply == sent {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn chat(addr: &str) -> ExitCode {
    let addr: SocketAddr = addr.parse().expect("address");
    let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect {addr}: {e}");
            return ExitCode::from(2);
        }
    };
    println!("connected");
    std::io::stdout().flush().expect("stdout");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut back = String::new();
        let ok = writeln!(w, "{line}").and_then(|()| r.read_line(&mut back));
        match ok {
            Ok(0) => {
                eprintln!("connection closed by peer");
                return ExitCode::from(3);
            }
            Ok(_) => {
                print!("{back}");
                std::io::stdout().flush().expect("stdout");
            }
            Err(e) => {
                eprintln!("connection error: {e}");
                return ExitCode::from(3);
            }
        }
    }
    ExitCode::SUCCESS
}

fn hold(addr: &str, n: usize, seconds: u64) -> ExitCode {
    let addr: SocketAddr = addr.parse().expect("address");
    let conns: Vec<_> = (0..n)
        .map(|i| {
            thread::spawn(move || -> std::io::Result<TcpStream> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                writeln!(s, "hello {i}")?;
                let mut line = String::new();
                BufReader::new(s.try_clone()?).read_line(&mut line)?;
                if line.trim() != format!("hello {i}") {
                    return Err(std::io::Error::other(format!("bad echo {line:?}")));
                }
                Ok(s)
            })
        })
        .collect();
    let mut held = Vec::new();
    for c in conns {
        match c.join().expect("thread") {
            Ok(s) => held.push(s),
            Err(e) => {
                eprintln!("connection failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("held {}", held.len());
    std::io::stdout().flush().expect("stdout");
    thread::sleep(Duration::from_secs(seconds));
    ExitCode::SUCCESS
}

fn connect_each(file: &str) -> ExitCode {
    use socket2::{Domain, Protocol, Socket, Type};
    let text = std::fs::read_to_string(file).expect("address file");
    let mut held = Vec::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (kind, addr) = line.split_once(' ').expect("`tcp|udp ip:port`");
        let addr: SocketAddr = addr.parse().expect("ip:port");
        let (ty, proto) =
            if kind == "udp" { (Type::DGRAM, Protocol::UDP) } else { (Type::STREAM, Protocol::TCP) };
        // IPv6 sockets for IPv6 and IPv4-mapped addresses (dual-stack), IPv4 ones otherwise.
        let sock = Socket::new(Domain::for_address(addr), ty.nonblocking(), Some(proto)).expect("socket");
        let result = match sock.connect(&addr.into()) {
            Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => {
                format!("error {}", e.raw_os_error().unwrap_or(0))
            }
            _ => {
                // A socket shows its peer once connected: wait for that (or the failure).
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&sock),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the call's duration.
                unsafe { libc::poll(&mut p, 1, 3000) };
                match (sock.take_error(), sock.peer_addr().ok().and_then(|p| p.as_socket())) {
                    (Ok(Some(e)), _) => format!("error {}", e.raw_os_error().unwrap_or(0)),
                    (_, Some(p)) => p.to_string(),
                    _ => "no peer".into(),
                }
            }
        };
        writeln!(out, "{line} -> {result}").expect("stdout");
        held.push(sock);
    }
    writeln!(out, "done").expect("stdout");
    out.flush().expect("stdout");
    drop(out);
    let mut rest = Vec::new();
    let _eof_or_error_either_ends_it = std::io::stdin().read_to_end(&mut rest);
    drop(held);
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["sink", addr] => serve(addr, sink),
        ["echo", addr] => serve(addr, echo),
        ["send", addr, bytes] => send(addr, bytes.parse().expect("byte count"), 0x5eed),
        ["send", addr, bytes, seed] => {
            send(addr, bytes.parse().expect("byte count"), seed.parse().expect("seed"))
        }
        ["chat", addr] => chat(addr),
        ["hold", addr, n, secs] => hold(addr, n.parse().expect("count"), secs.parse().expect("seconds")),
        ["connect-each", file] => connect_each(file),
        _ => {
            eprintln!("usage: netprobe sink|echo <listen addr> | send <addr> <bytes> [seed] | chat <addr>");
            ExitCode::from(64)
        }
    }
}
