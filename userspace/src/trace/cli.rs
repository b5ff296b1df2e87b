//! `ambit trace`: the node proxy's kernel events, live, in the spirit of `hubble observe` —
//! read from the admin endpoint (`GET /trace`, one JSON event per line), filtered there, and
//! printed as text or JSON.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use super::{Event, Filter};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// The node proxy's admin endpoint.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Events of this namespace (the socket's pod's, or the peer's).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Events of this workload (`name` or `namespace/name`; the socket's or the peer's).
    #[arg(long)]
    pub workload: Option<String>,
    /// Events whose peer is this workload (`namespace/name`), identity or service.
    #[arg(long)]
    pub peer: Option<String>,
    /// Only these kinds: connect, established, state, rtt, retransmit, close, reset.
    #[arg(long = "kind", value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// Only these legs: app, tunnel, upstream, delivery, inbound.
    #[arg(long = "leg", value_delimiter = ',')]
    pub legs: Vec<String>,
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this long (e.g. 30s); default: until interrupted.
    #[arg(long, value_parser = crate::units::parse_duration)]
    pub timeout: Option<Duration>,
}

const KINDS: [&str; 7] = ["connect", "established", "state", "rtt", "retransmit", "close", "reset"];

/// UTC now as RFC 3339 with microseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

impl TraceArgs {
    fn filter(&self) -> anyhow::Result<Filter> {
        for k in &self.kinds {
            if !KINDS.contains(&k.as_str()) {
                bail!("--kind {k}: one of {}", KINDS.join(", "));
            }
        }
        for l in &self.legs {
            if let Err(e) = l.parse::<crate::pod::Leg>() {
                bail!("--leg {e}");
            }
        }
        Ok(Filter {
            namespace: self.namespace.clone(),
            workload: self.workload.clone(),
            peer: self.peer.clone(),
            kinds: self.kinds.clone(),
            legs: self.legs.clone(),
        })
    }
}

/// Streams events to stdout until `--count`, `--timeout`, or the proxy closes the stream.
pub fn run(args: &TraceArgs) -> anyhow::Result<()> {
    let filter = args.filter()?;
    let mut conn = TcpStream::connect_timeout(&args.admin, Duration::from_secs(5)).with_context(|| {
        format!("connecting to the node proxy's admin endpoint {} (is ambit node running here?)", args.admin)
    })?;
    let deadline = args.timeout.map(|t| Instant::now() + t);
    // Wake up now and then to honour the deadline even when no event comes.
    conn.set_read_timeout(Some(Duration::from_millis(250)))?;
    write!(conn, "GET /trace?{} HTTP/1.0\r\nHost: {}\r\n\r\n", filter.to_query(), args.admin)?;
    let mut reader = BufReader::new(conn);
    let mut status = String::new();
    read_line(&mut reader, &mut status, deadline)?;
    if !status.starts_with("HTTP/1.") || !status.contains(" 200 ") {
        let mut body = String::new();
        while read_line(&mut reader, &mut body, deadline)? {}
        bail!("the node proxy refused the trace: {} {}", status.trim(), body.trim());
    }
    // Headers end with an empty line.
    loop {
        let mut h = String::new();
        if !read_line(&mut reader, &mut h, deadline)? || h.trim().is_empty() {
            break;
        }
    }
    eprintln!("ambit trace: streaming kernel events from {} (filter: {:?})", args.admin, filter.to_query());
    let stdout = std::io::stdout();
    let mut seen = 0u64;
    loop {
        if args.count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
        let mut line = String::new();
        if !read_line(&mut reader, &mut line, deadline)? {
            return Ok(());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut out = stdout.lock();
        match args.output {
            Output::Json => writeln!(out, "{line}")?,
            Output::Text => {
                let e: Event =
                    serde_json::from_str(line).with_context(|| format!("an event the proxy sent: {line}"))?;
                writeln!(out, "{}", e.text())?;
            }
        }
        out.flush()?;
        seen += 1;
    }
}

/// Reads one line, retrying through read timeouts until `deadline`; `false` at the end of the
/// stream or when the deadline passed.
fn read_line(
    r: &mut BufReader<TcpStream>,
    buf: &mut String,
    deadline: Option<Instant>,
) -> anyhow::Result<bool> {
    loop {
        match r.read_line(buf) {
            Ok(0) => return Ok(false),
            Ok(_) if buf.ends_with('\n') => return Ok(true),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e).context("reading the trace stream"),
        }
    }
}
