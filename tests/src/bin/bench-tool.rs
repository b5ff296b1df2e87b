//! Load tools for `cargo xtask bench` (docs/benchmark.md, "Method"):
//!
//! - `bench-tool echo <listen addr>`: echoes every connection (a task each: 10,000 idle
//!   connections cost little);
//! - `bench-tool rr <addr> <connections> <rate/s> <seconds> <bytes>`: request/response at a
//!   fixed total rate over that many connections, each request `bytes` long and echoed back;
//!   latency is measured from when each request was due (so a late reply delays nothing
//!   unnoticed); prints one JSON object with percentiles in microseconds;
//! - `bench-tool connrate <addr> <seconds> <parallel>`: new connections as fast as possible
//!   (connect, one byte each way, close); prints JSON with the rate;
//! - `bench-tool hold <addr> <n> <seconds>`: opens `n` connections (one byte echoed on each),
//!   prints `held <n>`, keeps them idle for `seconds`, then echoes one byte on each and
//!   prints `alive <k> of <n>` (exit 1 unless all are).
//!
//! Every run is bounded by its arguments.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _best_effort = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn echo(addr: &str) -> ExitCode {
    let addr: SocketAddr = addr.parse().expect("listen address");
    runtime().block_on(async move {
        let l = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        println!("listening {addr}");
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _peer_went_away = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rr(addr: &str, conns: usize, rate: f64, secs: f64, size: usize) -> ExitCode {
    let addr: SocketAddr = addr.parse().expect("address");
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let duration = Duration::from_secs_f64(secs);
    let start = Instant::now() + Duration::from_millis(200);
    let errors = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let errors = errors.clone();
            std::thread::spawn(move || -> Vec<u64> {
                let mut lat = Vec::new();
                let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return lat;
                };
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let req = vec![0x5au8; size];
                let mut resp = vec![0u8; size];
                // Connections are spread evenly over the interval.
                let mut due = start + interval.mul_f64(i as f64 / conns as f64);
                while due < start + duration {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if s.write_all(&req).and_then(|()| s.read_exact(&mut resp)).is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return lat;
                    }
                    lat.push(due.elapsed().as_micros() as u64);
                    due += interval;
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect();
    all.sort_unstable();
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "{{\"requests\":{},\"errors\":{errors},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        all.len(),
        percentile(&all, 0.50),
        percentile(&all, 0.90),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or(0)
    );
    if errors == 0 && !all.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn connrate(addr: &str, secs: f64, parallel: usize) -> ExitCode {
    let addr: SocketAddr = addr.parse().expect("address");
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..parallel)
        .map(|_| {
            let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    let ok = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(b"x")?;
                        s.read_exact(&mut b)
                    });
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    println!("{{\"connections\":{n},\"errors\":{errors},\"per_second\":{:.1}}}", n as f64 / elapsed);
    if n > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn hold(addr: &str, n: usize, secs: u64) -> ExitCode {
    let addr: SocketAddr = addr.parse().expect("address");
    let mut held = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..n {
        let r = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
            Ok(s)
        });
        match r {
            Ok(s) => held.push(s),
            Err(e) => {
                eprintln!("connection {i}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("held {n}");
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(secs));
    // Still there? One echo on each connection.
    let mut alive = 0;
    for s in &mut held {
        if s.write_all(b"y").is_ok() && s.read_exact(&mut b).is_ok() {
            alive += 1;
        }
    }
    println!("alive {alive} of {n}");
    let _ = std::io::stdout().flush();
    if alive == n {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    raise_fd_limit();
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_else(|| panic!("missing argument {i}"));
    match args.get(1).map(String::as_str) {
        Some("echo") => echo(arg(2)),
        Some("rr") => rr(
            arg(2),
            arg(3).parse().expect("connections"),
            arg(4).parse().expect("rate"),
            arg(5).parse().expect("seconds"),
            arg(6).parse().expect("bytes"),
        ),
        Some("connrate") => {
            connrate(arg(2), arg(3).parse().expect("seconds"), arg(4).parse().expect("parallel"))
        }
        Some("hold") => hold(arg(2), arg(3).parse().expect("n"), arg(4).parse().expect("seconds")),
        _ => {
            eprintln!("usage: bench-tool echo|rr|connrate|hold ...");
            ExitCode::from(2)
        }
    }
}
