//! Hostile clients for the mesh-boundary tests: what an attacker outside the mesh (or on the
//! node) sends, crafted with Python's raw socket options and scapy (Debian's
//! `python3-scapy`, run by Debian's `/usr/bin/python3`), from inside the bed's namespaces.

use std::{net::IpAddr, process::Command, time::Duration};

use crate::{
    bed::Pod,
    exec::{pod_command, run_with_timeout},
};

/// Debian's interpreter, which has scapy (a `python3` earlier on PATH may not).
pub const PYTHON: &str = "/usr/bin/python3";

/// An HTTP/1.0 GET whose every IPv6 packet, SYN included, carries an extension header the
/// client's own kernel adds (`hop`: hop-by-hop options, `dst`: destination options; `none`:
/// a plain request). Prints `answer <status line>` or `failed <error>`.
const EXT_HEADER_CLIENT: &str = r#"
import socket, sys
dst, port, ext = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
# One 8-byte header holding a PadN option; the kernel fills in the next-header byte.
opts = bytes([0, 0, 1, 4, 0, 0, 0, 0])
if ext == "hop":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, opts)
elif ext == "dst":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, opts)
s.settimeout(3)
try:
    s.connect((dst, port))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = s.recv(4096)
    print("answer", data.split(b"\r\n")[0].decode() if data else "(closed)")
except Exception as e:
    print("failed", type(e).__name__)
"#;

/// Sends one connection-opening SYN from `src` to `dst:port`, either whole (`whole`) or as
/// two IPv4 fragments whose first carries 40 bytes of IP options and only 8 bytes of TCP
/// (`fragments`: the flags are in the second), and counts the SYN-ACKs that come back
/// within two seconds: `synacks <n>`.
const SYN_SENDER: &str = r#"
import sys, time, random
from scapy.all import IP, TCP, Raw, IPOption_NOP, send, AsyncSniffer, conf
conf.verb = 0
src, dst, port, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sport = random.randint(20000, 60000)
syn = TCP(sport=sport, dport=port, flags="S", seq=1000)
tcp = bytes(IP(src=src, dst=dst) / syn)[20:]
sniffer = AsyncSniffer(iface="eth0", store=True,
    filter=f"tcp and src host {dst} and src port {port} and dst port {sport}")
sniffer.start()
time.sleep(0.5)
if mode == "fragments":
    send(IP(src=src, dst=dst, proto=6, flags="MF", frag=0, options=[IPOption_NOP()] * 40) / Raw(tcp[:8]))
    send(IP(src=src, dst=dst, proto=6, frag=1) / Raw(tcp[8:]))
else:
    send(IP(src=src, dst=dst) / syn)
time.sleep(2)
packets = sniffer.stop()
print("synacks", sum(1 for p in packets if p.haslayer(TCP) and int(p[TCP].flags) & 0x12 == 0x12))
"#;

fn run(cmd: Command) -> String {
    let out = run_with_timeout(cmd, Duration::from_secs(30)).expect("the attack script runs");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !text.is_empty(),
        "attack script failed ({}): {text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// [`EXT_HEADER_CLIENT`] from `from` to `dst:port`.
pub fn get_with_ipv6_ext_header(from: &Pod, dst: IpAddr, port: u16, ext: &str) -> String {
    run(pod_command(from, &[PYTHON, "-c", EXT_HEADER_CLIENT, &dst.to_string(), &port.to_string(), ext]))
}

/// [`SYN_SENDER`] from `from` to `dst:port`; the number of SYN-ACKs seen.
pub fn syn_acks(from: &Pod, dst: IpAddr, port: u16, mode: &str) -> u32 {
    let text = run(pod_command(
        from,
        &[PYTHON, "-c", SYN_SENDER, &from.ipv4.to_string(), &dst.to_string(), &port.to_string(), mode],
    ));
    text.strip_prefix("synacks ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("scapy said {text:?}"))
}
