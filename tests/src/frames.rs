//! Crafted Ethernet frames for the inbound program, each with the verdict its construction
//! calls for: every IPv4 and IPv6 header shape the program must classify (options, extension
//! header chains, fragments, truncations, other protocols), built field by field.
//!
//! The expected verdict comes from how a frame was built, not from re-running the parser:
//! a TCP SYN behind three extension headers to the pod's address must be assigned, whatever
//! the program does with it.

/// What the inbound program must do with a frame (one counter each, `ambit_common::stats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Assigned to the proxy's listener.
    Assign,
    KubeletProbe,
    ProxyPort,
    PassSegment,
    PassDatagram,
    PassArp,
    Malformed,
    Fragment,
    Protocol,
    Uncovered,
}

/// A frame and what must happen to it.
pub struct Case {
    pub name: String,
    pub frame: Vec<u8>,
    pub expect: Verdict,
}

/// The addresses and ports the frames are built around.
#[derive(Clone, Debug)]
pub struct Target {
    pub pod4: [u8; 4],
    pub pod6: [u8; 16],
    /// Addresses of the pod the mesh does not list.
    pub uncovered4: [u8; 4],
    pub uncovered6: [u8; 16],
    pub app_port: u16,
    /// HBONE, outbound and inbound capture ports.
    pub proxy_ports: [u16; 3],
    /// A connection the kubelet opened (IPv4): (source, source port, destination port).
    pub probe: ([u8; 4], u16, u16),
}

/// A small deterministic generator (xorshift64*): the same seed gives the same frames.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const IGMP: u8 = 2;
const ICMPV6: u8 = 58;
const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const ESP: u8 = 50;
const AH: u8 = 51;
const NONEXT: u8 = 59;
const DSTOPTS: u8 = 60;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ECE_CWR: u8 = 0xc0;

/// TCP flag sets: connection-opening ones first.
const OPENING: [u8; 5] = [SYN, SYN | ECE_CWR, SYN | FIN, SYN | RST, SYN | PSH];
const OTHER: [u8; 6] = [ACK, SYN | ACK, RST, FIN | ACK, 0, PSH | ACK];

pub fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0xbb, 0x02, 0, 0, 0, 0, 0xaa];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 =
        b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header with `options` (a multiple of 4), then `payload`. `total` overrides the
/// total length; `version_ihl` the first byte.
pub struct V4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub options: usize,
    pub flags_offset: u16,
    pub total: Option<u16>,
    pub version_ihl: Option<u8>,
}

impl V4 {
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8) -> V4 {
        V4 { src, dst, proto, options: 0, flags_offset: 0x4000, total: None, version_ihl: None }
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let ihl = 20 + self.options;
        let total = self.total.unwrap_or((ihl + payload.len()) as u16);
        let mut h = vec![self.version_ihl.unwrap_or(0x40 | (ihl / 4) as u8), 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]);
        h.extend_from_slice(&self.flags_offset.to_be_bytes());
        h.extend_from_slice(&[64, self.proto, 0, 0]);
        h.extend_from_slice(&self.src);
        h.extend_from_slice(&self.dst);
        // NOP options, then end of list.
        h.extend(std::iter::repeat_n(1u8, self.options));
        if self.options > 0 {
            h[ihl - 1] = 0;
        }
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = eth(ETH_P_IP);
        f.extend(h);
        f.extend_from_slice(payload);
        f
    }
}

/// An IPv6 header; `payload_len` overrides the payload length, `version` the first nibble.
pub fn v6(
    src: [u8; 16],
    dst: [u8; 16],
    next: u8,
    payload: &[u8],
    payload_len: Option<u16>,
    version: u8,
) -> Vec<u8> {
    let mut f = eth(ETH_P_IPV6);
    f.extend_from_slice(&[version << 4, 0, 0, 0]);
    f.extend_from_slice(&payload_len.unwrap_or(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(payload);
    f
}

/// A TCP header with `doff` 32-bit words (options padded with NOPs).
pub fn tcp(sport: u16, dport: u16, flags: u8, doff: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(60);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]);
    t.extend_from_slice(&[doff << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let words = usize::from(doff.max(5));
    t.extend(std::iter::repeat_n(1u8, words * 4 - 20));
    t
}

fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&[0, 12, 0, 0, b'p', b'i', b'n', b'g']);
    u
}

/// One IPv6 extension header, `next` after it.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop(u8),
    DestOpts(u8),
    /// Segments left 0: processed here, the upper layer follows.
    Routing(u8),
    Ah(u8),
    /// An atomic fragment (offset 0, no more fragments): a whole packet.
    AtomicFragment,
    /// A real fragment: (offset in 8-byte units, more fragments).
    Fragment(u16, bool),
}

impl Ext {
    fn proto(self) -> u8 {
        match self {
            Ext::HopByHop(_) => HOPOPTS,
            Ext::DestOpts(_) => DSTOPTS,
            Ext::Routing(_) => ROUTING,
            Ext::Ah(_) => AH,
            Ext::AtomicFragment | Ext::Fragment(..) => FRAGMENT,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(len) | Ext::DestOpts(len) => {
                // Options: Pad1 all the way.
                let mut h = vec![next, len];
                h.resize((usize::from(len) + 1) * 8, 0);
                h
            }
            Ext::Routing(len) => {
                let mut h = vec![next, len, 0, 0];
                h.resize(usize::from(len + 1) * 8, 0);
                h
            }
            Ext::Ah(len) => {
                let mut h = vec![next, len, 0, 0, 0, 0, 0, 7];
                h.resize((usize::from(len) + 2) * 4, 0xee);
                h
            }
            Ext::AtomicFragment => vec![next, 0, 0, 0, 0, 0, 0, 9],
            Ext::Fragment(off, more) => {
                let v = (off << 3) | u16::from(more);
                let b = v.to_be_bytes();
                vec![next, 0, b[0], b[1], 0, 0, 0, 9]
            }
        }
    }
}

/// The chain `exts` followed by `upper` (protocol number and bytes): (first next header,
/// bytes).
pub fn chain(exts: &[Ext], upper: u8, payload: &[u8]) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(upper, |n| n.proto());
        out.extend(e.bytes(next));
    }
    out.extend_from_slice(payload);
    (exts.first().map_or(upper, |e| e.proto()), out)
}

fn random_ext(rng: &mut Rng) -> Ext {
    match rng.below(5) {
        0 => Ext::HopByHop(rng.below(3) as u8),
        1 => Ext::DestOpts(rng.below(3) as u8),
        2 => Ext::Routing(rng.below(3) as u8),
        3 => Ext::Ah(1 + rng.below(4) as u8),
        _ => Ext::AtomicFragment,
    }
}

impl Target {
    /// The verdict for a well-formed segment with `flags` to `dst` (covered or not) on `port`.
    fn tcp_verdict(&self, flags: u8, covered: bool, port: u16, probe: bool) -> Verdict {
        if flags & SYN == 0 || flags & ACK != 0 {
            Verdict::PassSegment
        } else if !covered {
            Verdict::Uncovered
        } else if self.proxy_ports.contains(&port) {
            Verdict::ProxyPort
        } else if probe {
            Verdict::KubeletProbe
        } else {
            Verdict::Assign
        }
    }

    fn port(&self, rng: &mut Rng) -> u16 {
        match rng.below(6) {
            0..=2 => self.app_port,
            3 => self.proxy_ports[rng.below(3) as usize],
            _ => 1 + rng.below(65535) as u16,
        }
    }

    /// Every shape, `rounds` times over with fresh random fields.
    pub fn cases(&self, rng: &mut Rng, rounds: usize) -> Vec<Case> {
        let mut out = Vec::new();
        for _ in 0..rounds {
            self.link_layer(rng, &mut out);
            self.ipv4_tcp(rng, &mut out);
            self.ipv4_defects(rng, &mut out);
            self.ipv4_fragments_and_protocols(rng, &mut out);
            self.ipv6_tcp(rng, &mut out);
            self.ipv6_defects(rng, &mut out);
            self.ipv6_fragments_and_protocols(rng, &mut out);
        }
        out
    }

    fn link_layer(&self, rng: &mut Rng, out: &mut Vec<Case>) {
        let mut arp = eth(ETH_P_ARP);
        arp.extend(rng.bytes(28));
        out.push(Case { name: "ARP".into(), frame: arp, expect: Verdict::PassArp });
        // A VLAN tag the stack did not strip (QinQ), MPLS, LLDP, anything: around an IPv4 SYN.
        let syn = V4::new([10, 9, 0, 1], self.pod4, TCP).build(&tcp(40000, self.app_port, SYN, 5));
        for ethertype in [0x8100, 0x88a8, 0x8847, 0x88cc, 0x0001, rng.next_u64() as u16 | 0x0600] {
            if [ETH_P_IP, ETH_P_IPV6, ETH_P_ARP].contains(&ethertype) {
                continue;
            }
            let mut f = eth(ethertype);
            f.extend_from_slice(&[0, 5, 0x08, 0x00]);
            f.extend_from_slice(&syn[14..]);
            out.push(Case {
                name: format!("ethertype {ethertype:#06x}"),
                frame: f,
                expect: Verdict::Protocol,
            });
        }
    }

    fn ipv4_tcp(&self, rng: &mut Rng, out: &mut Vec<Case>) {
        for flags in OPENING.iter().chain(OTHER.iter()).copied() {
            let covered = rng.below(4) != 0;
            let dst = if covered { self.pod4 } else { self.uncovered4 };
            let port = self.port(rng);
            let mut v = V4::new([10, rng.byte(), rng.byte(), rng.byte()], dst, TCP);
            v.options = 4 * rng.below(11) as usize;
            v.flags_offset = if rng.below(2) == 0 { 0x4000 } else { 0 };
            let doff = 5 + rng.below(11) as u8;
            let frame = v.build(&tcp(1024 + rng.below(60000) as u16, port, flags, doff));
            let name = format!(
                "v4 options {} flags {flags:#04x} doff {doff} port {port} covered {covered}",
                v.options
            );
            out.push(Case { name, frame, expect: self.tcp_verdict(flags, covered, port, false) });
        }
        // The kubelet's own probe, and a connection that only looks like it.
        let (src, sport, dport) = self.probe;
        for (sport, is_probe) in [(sport, true), (sport.wrapping_add(1), false)] {
            let frame = V4::new(src, self.pod4, TCP).build(&tcp(sport, dport, SYN, 5));
            let expect = if is_probe { Verdict::KubeletProbe } else { Verdict::Assign };
            out.push(Case { name: format!("probe-like SYN from port {sport}"), frame, expect });
        }
    }

    fn ipv4_defects(&self, rng: &mut Rng, out: &mut Vec<Case>) {
        let seg = tcp(40000, self.app_port, SYN, 5);
        let base = || V4::new([10, 9, 0, 1], self.pod4, TCP);
        let mut m = |name: String, frame: Vec<u8>| out.push(Case { name, frame, expect: Verdict::Malformed });
        let mut v = base();
        v.version_ihl = Some(0x60 | 5);
        m("v4 with version 6".into(), v.build(&seg));
        for ihl in 0..5u8 {
            let mut v = base();
            v.version_ihl = Some(0x40 | ihl);
            m(format!("v4 ihl {ihl}"), v.build(&seg));
        }
        let mut v = base();
        v.options = 8;
        v.total = Some(20);
        m("v4 total shorter than its header".into(), v.build(&seg));
        let mut v = base();
        v.total = Some(20 + rng.below(20) as u16);
        m("v4 total too short for TCP".into(), v.build(&seg));
        // (A frame cut inside the IP header itself cannot be test-run: the kernel's
        // BPF_PROG_TEST_RUN refuses it; see `runnable`.)
        let cut = 34 + rng.below(20) as usize;
        let mut v = base();
        v.total = Some((cut - 14) as u16);
        m(format!("TCP header cut at {cut}"), v.build(&seg)[..cut].to_vec());
        for doff in 0..5u8 {
            m(format!("TCP doff {doff}"), base().build(&tcp(40000, self.app_port, SYN, doff)));
        }
    }

    fn ipv4_fragments_and_protocols(&self, rng: &mut Rng, out: &mut Vec<Case>) {
        let seg = tcp(40000, self.app_port, SYN, 5);
        // The attack: a first fragment carrying 8 bytes of TCP (IP options make it small),
        // then the rest; and any other fragment of TCP.
        let mut first = V4::new([10, 9, 0, 1], self.pod4, TCP);
        first.options = 40;
        first.flags_offset = 0x2000;
        out.push(Case {
            name: "v4 tiny first fragment".into(),
            frame: first.build(&seg[..8]),
            expect: Verdict::Fragment,
        });
        let mut second = V4::new([10, 9, 0, 1], self.pod4, TCP);
        second.flags_offset = 1;
        out.push(Case {
            name: "v4 second fragment (SYN flag inside)".into(),
            frame: second.build(&seg[8..]),
            expect: Verdict::Fragment,
        });
        let mut any = V4::new([10, 9, 0, 1], self.pod4, TCP);
        any.flags_offset = (rng.below(2) as u16) << 13 | (1 + rng.below(0x1ffe) as u16);
        out.push(Case { name: "v4 TCP fragment".into(), frame: any.build(&seg), expect: Verdict::Fragment });
        for proto in [UDP, ICMP, IGMP] {
            let mut v = V4::new([10, 9, 0, 1], self.pod4, proto);
            v.flags_offset = if rng.below(2) == 0 { 0x4000 } else { 0x2000 | rng.below(100) as u16 };
            let payload = if proto == UDP { udp(5353, 53) } else { rng.bytes(8) };
            let frame = v.build(&payload);
            out.push(Case { name: format!("v4 protocol {proto}"), frame, expect: Verdict::PassDatagram });
        }
        for proto in [4, 41, 47, ESP, AH, 132, 255, pick_other(rng, &[TCP, UDP, ICMP, IGMP])] {
            let frame = V4::new([10, 9, 0, 1], self.pod4, proto).build(&seg);
            out.push(Case { name: format!("v4 protocol {proto}"), frame, expect: Verdict::Protocol });
        }
    }

    fn ipv6_tcp(&self, rng: &mut Rng, out: &mut Vec<Case>) {
        let mut src = [0u8; 16];
        src[0] = 0xfd;
        for flags in OPENING.iter().chain(OTHER.iter()).copied() {
            src[15] = rng.byte();
            let covered = rng.below(4) != 0;
            let dst = if covered { self.pod6 } else { self.uncovered6 };
            let port = self.port(rng);
            let n = rng.below(9) as usize;
            let exts: Vec<Ext> = (0..n).map(|_| random_ext(rng)).collect();
            let doff = 5 + rng.below(11) as u8;
            let (next, payload) = chain(&exts, TCP, &tcp(1024 + rng.below(60000) as u16, port, flags, doff));
            let frame = v6(src, dst, next, &payload, None, 6);
            let name = format!("v6 {exts:?} flags {flags:#04x} port {port} covered {covered}");
            out.push(Case { name, frame, expect: self.tcp_verdict(flags, covered, port, false) });
        }
        // The attack as found: a SYN behind one hop-by-hop or destination options header.
        for e in [Ext::HopByHop(0), Ext::DestOpts(0)] {
            let (next, payload) = chain(&[e], TCP, &tcp(40000, self.app_port, SYN, 5));
            let frame = v6(src, self.pod6, next, &payload, None, 6);
            out.push(Case { name: format!("v6 SYN behind {e:?}"), frame, expect: Verdict::Assign });
        }
        // To the pod's link-local address and a multicast group: not covered.
        let mut ll = [0u8; 16];
        ll[0] = 0xfe;
        ll[1] = 0x80;
        ll[15] = 2;
        let mut mc = [0u8; 16];
        mc[0] = 0xff;
        mc[1] = 0x02;
        mc[15] = 1;
        for dst in [ll, mc] {
            let frame = v6(src, dst, TCP, &tcp(40000, self.app_port, SYN, 5), None, 6);
            out.push(Case { name: format!("v6 SYN to {dst:02x?}"), frame, expect: Verdict::Uncovered });
        }
    }

    fn ipv6_defects(&self, rng: &mut Rng, out: &mut Vec<Case>) {
        let mut src = [0u8; 16];
        src[0] = 0xfd;
        src[15] = 9;
        let seg = tcp(40000, self.app_port, SYN, 5);
        let mut m = |name: String, frame: Vec<u8>| out.push(Case { name, frame, expect: Verdict::Malformed });
        m("v6 with version 4".into(), v6(src, self.pod6, TCP, &seg, None, 4));
        let whole = v6(src, self.pod6, TCP, &seg, None, 6);
        let cut = 54 + rng.below(20) as usize;
        m(format!("v6 TCP header cut at {cut}"), whole[..cut].to_vec());
        m(
            "v6 payload length too short for TCP".into(),
            v6(src, self.pod6, TCP, &seg, Some(rng.below(20) as u16), 6),
        );
        // Nine extension headers: one more than the program walks.
        let nine: Vec<Ext> = (0..9).map(|_| random_ext(rng)).collect();
        let (next, payload) = chain(&nine, TCP, &seg);
        m(format!("v6 chain of nine {nine:?}"), v6(src, self.pod6, next, &payload, None, 6));
        // A chain cut in the middle of a header.
        let exts: Vec<Ext> = (0..1 + rng.below(4)).map(|_| random_ext(rng)).collect();
        let (next, payload) = chain(&exts, TCP, &seg);
        let cut = 54 + rng.below((payload.len() - seg.len()) as u64) as usize;
        let frame = v6(src, self.pod6, next, &payload, None, 6);
        m(format!("v6 chain {exts:?} cut at {cut}"), frame[..cut.max(55)].to_vec());
        // An extension header whose length runs past the frame.
        let (next, payload) = chain(&[Ext::DestOpts(200)], TCP, &seg);
        let frame = v6(src, self.pod6, next, &payload[..40], Some(payload.len() as u16), 6);
        m("v6 extension header longer than the frame".into(), frame);
    }

    fn ipv6_fragments_and_protocols(&self, rng: &mut Rng, out: &mut Vec<Case>) {
        let mut src = [0u8; 16];
        src[0] = 0xfd;
        src[15] = 9;
        let seg = tcp(40000, self.app_port, SYN, 5);
        for (off, more) in [(0u16, true), (1 + rng.below(8000) as u16, rng.below(2) == 0)] {
            for (upper, expect) in [
                (TCP, Verdict::Fragment),
                (DSTOPTS, Verdict::Fragment),
                (NONEXT, Verdict::Fragment),
                (UDP, Verdict::PassDatagram),
                (ICMPV6, Verdict::PassDatagram),
            ] {
                let before: Vec<Ext> = (0..rng.below(3)).map(|_| random_ext(rng)).collect();
                let mut exts = before.clone();
                exts.push(Ext::Fragment(off, more));
                let (next, payload) = chain(&exts, upper, &seg[..8]);
                let frame = v6(src, self.pod6, next, &payload, None, 6);
                out.push(Case { name: format!("v6 fragment {exts:?} of {upper}"), frame, expect });
            }
        }
        for (upper, expect) in [
            (UDP, Verdict::PassDatagram),
            (ICMPV6, Verdict::PassDatagram),
            (ESP, Verdict::Protocol),
            (NONEXT, Verdict::Protocol),
            (132, Verdict::Protocol),
            (4, Verdict::Protocol),
            (41, Verdict::Protocol),
            (
                pick_other(rng, &[TCP, UDP, ICMPV6, HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS]),
                Verdict::Protocol,
            ),
        ] {
            let exts: Vec<Ext> = (0..rng.below(4)).map(|_| random_ext(rng)).collect();
            let body = if upper == UDP { udp(5353, 53) } else { rng.bytes(16) };
            let (next, payload) = chain(&exts, upper, &body);
            let frame = v6(src, self.pod6, next, &payload, None, 6);
            out.push(Case { name: format!("v6 {exts:?} then protocol {upper}"), frame, expect });
        }
    }
}

/// A protocol number other than those in `not`.
fn pick_other(rng: &mut Rng, not: &[u8]) -> u8 {
    loop {
        let p = rng.byte();
        if !not.contains(&p) {
            return p;
        }
    }
}

/// Whether the kernel's `BPF_PROG_TEST_RUN` takes `frame`: it refuses IPv4 and IPv6 frames
/// shorter than their fixed IP header (such frames still reach a TC program on a real
/// interface, where the program drops them as malformed: the stack would anyway).
pub fn runnable(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => frame.len() >= 14 + 20,
        ETH_P_IPV6 => frame.len() >= 14 + 40,
        _ => true,
    }
}

/// `frame` with random damage: bytes flipped or the end cut off. Its verdict is unknown; only
/// that there is exactly one can be checked.
pub fn mutate(rng: &mut Rng, frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    match rng.below(3) {
        0 => f.truncate(14 + rng.below((f.len() - 13) as u64) as usize),
        _ => {
            for _ in 0..1 + rng.below(4) {
                let i = 12 + rng.below((f.len() - 12) as u64) as usize;
                f[i] ^= 1 << rng.below(8);
            }
        }
    }
    f
}
