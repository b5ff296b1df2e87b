//! DNS messages (RFC 1035, EDNS(0) from RFC 6891) as the node proxy reads and writes them.
//! Queries come from applications and are untrusted: they are parsed strictly and in bounded
//! time (every step moves forward through the buffer, and a compression pointer may only
//! point backwards), and what cannot be classified is an error. Answers are built here from
//! scratch; forwarded answers are relayed as they came and never parsed beyond the header.

use std::net::IpAddr;

/// A message's fixed header.
pub const HEADER_LEN: usize = 12;
/// Classic DNS over UDP without EDNS.
pub const CLASSIC_UDP: usize = 512;
/// The largest UDP answer sent whatever a client advertises: the size DNS Flag Day 2020
/// settled on, below every common path MTU, so answers are never fragmented.
pub const MAX_UDP: usize = 1232;
/// The most a name may hold on the wire, length octets included.
const MAX_NAME: usize = 255;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// Flag bits of the header's second word.
const QR: u16 = 0x8000;
const OPCODE: u16 = 0x7800;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;

/// Response codes the proxy answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

impl Rcode {
    /// The name ztunnel's DNS metrics and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Rcode::NoError => "NOERROR",
            Rcode::FormErr => "FORMERR",
            Rcode::ServFail => "SERVFAIL",
            Rcode::NxDomain => "NXDOMAIN",
            Rcode::NotImp => "NOTIMP",
            Rcode::Refused => "REFUSED",
        }
    }
}

/// Why a message is not a query the proxy can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{0} bytes is shorter than a DNS header")]
    Short(usize),
    #[error("a response, not a query")]
    NotAQuery,
    #[error("opcode {0} (only standard queries are answered)")]
    Opcode(u8),
    #[error("{0} questions (a query asks one)")]
    Questions(u16),
    #[error("the message ends inside {0}")]
    Truncated(&'static str),
    #[error("a name longer than 255 bytes")]
    NameTooLong,
    #[error("a compression pointer that does not point backwards")]
    BadPointer,
    #[error("label type {0:#04x} (only plain labels and pointers exist)")]
    LabelType(u8),
    #[error("{0} bytes after the last record")]
    Trailing(usize),
    #[error("a query, not a response")]
    NotAResponse,
    #[error("a record of type {rtype} with {len} bytes of data")]
    RecordData { rtype: u16, len: usize },
}

impl WireError {
    /// The answer a client gets: none for what is not a query (a reflected answer could
    /// loop between two resolvers), NOTIMP for other opcodes, FORMERR for the rest.
    pub fn rcode(&self) -> Option<Rcode> {
        match self {
            WireError::Short(_) | WireError::NotAQuery | WireError::NotAResponse => None,
            WireError::Opcode(_) => Some(Rcode::NotImp),
            _ => Some(Rcode::FormErr),
        }
    }
}

/// A parsed query: one question, and the EDNS payload size if the client sent an OPT record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub recursion_desired: bool,
    /// The name asked, lower-cased, dot-separated, without the root's trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question as it came (the client's letter case included): echoed in the answer.
    question: Vec<u8>,
    pub edns_udp_size: Option<u16>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end =
            self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or(WireError::Truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A name at the current position, followed through compression pointers; the reader
    /// moves past the name's own bytes. Labels are appended to `out` (lower-cased, dotted)
    /// when given.
    fn name(&mut self, mut out: Option<&mut String>) -> Result<(), WireError> {
        let mut at = self.pos;
        // Where the name's own bytes end: after the first pointer, or the root label.
        let mut resume = None;
        // A pointer must land before the start of the stretch being read (the name's start,
        // then each jump's target): the starts strictly decrease, so the walk ends.
        let mut floor = at;
        let mut wire_len = 0usize;
        loop {
            let len = *self.buf.get(at).ok_or(WireError::Truncated("a name"))? as usize;
            match len & 0xC0 {
                0x00 => {}
                0xC0 => {
                    let low = *self.buf.get(at + 1).ok_or(WireError::Truncated("a name"))? as usize;
                    let target = ((len & 0x3F) << 8) | low;
                    // Names start after the header: nothing before it is one.
                    if target >= floor || target < HEADER_LEN {
                        return Err(WireError::BadPointer);
                    }
                    resume.get_or_insert(at + 2);
                    floor = target;
                    at = target;
                    continue;
                }
                // 0x40 and 0x80: extended label types (RFC 6891 retired them), or a label
                // longer than 63 bytes.
                _ => return Err(WireError::LabelType(len as u8)),
            }
            wire_len += len + 1;
            if wire_len > MAX_NAME {
                return Err(WireError::NameTooLong);
            }
            if len == 0 {
                self.pos = resume.unwrap_or(at + 1);
                return Ok(());
            }
            let label = self.buf.get(at + 1..at + 1 + len).ok_or(WireError::Truncated("a label"))?;
            if let Some(out) = out.as_deref_mut() {
                if !out.is_empty() {
                    out.push('.');
                }
                // Bytes outside printable ASCII are kept escaped: such a name is never a
                // mesh name, and the escaped form cannot collide with one.
                for &b in label {
                    match b.to_ascii_lowercase() {
                        c @ (b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_') => out.push(c as char),
                        c => out.push_str(&format!("\\{c:03}")),
                    }
                }
            }
            at += 1 + len;
        }
    }

    /// Reads a resource record: its type, class and data.
    fn record(&mut self) -> Result<(u16, u16, &'a [u8]), WireError> {
        self.name(None)?;
        let rtype = self.u16("a record")?;
        let class = self.u16("a record")?;
        self.take(4, "a record")?;
        let rdlen = self.u16("a record")? as usize;
        let data = self.take(rdlen, "a record's data")?;
        Ok((rtype, class, data))
    }
}

/// Parses a query. An error's [`WireError::rcode`] says what to answer (if anything).
pub fn parse_query(buf: &[u8]) -> Result<Query, WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Short(buf.len()));
    }
    let mut r = Reader { buf, pos: 0 };
    let id = r.u16("the header")?;
    let flags = r.u16("the header")?;
    if flags & QR != 0 {
        return Err(WireError::NotAQuery);
    }
    let opcode = ((flags & OPCODE) >> 11) as u8;
    if opcode != 0 {
        return Err(WireError::Opcode(opcode));
    }
    let qdcount = r.u16("the header")?;
    let ancount = r.u16("the header")?;
    let nscount = r.u16("the header")?;
    let arcount = r.u16("the header")?;
    if qdcount != 1 {
        return Err(WireError::Questions(qdcount));
    }
    let start = r.pos;
    let mut name = String::new();
    r.name(Some(&mut name))?;
    let qtype = r.u16("the question")?;
    let qclass = r.u16("the question")?;
    let question = buf[start..r.pos].to_vec();
    let mut edns_udp_size = None;
    // Records in a query are rare (EDNS's OPT, a cookie, TSIG); each is walked to find the
    // OPT and to refuse a message that lies about its counts.
    for _ in 0..(u32::from(ancount) + u32::from(nscount) + u32::from(arcount)) {
        let (rtype, class, _) = r.record()?;
        if rtype == TYPE_OPT {
            edns_udp_size = Some(class);
        }
    }
    if r.pos != buf.len() {
        return Err(WireError::Trailing(buf.len() - r.pos));
    }
    Ok(Query { id, recursion_desired: flags & RD != 0, name, qtype, qclass, question, edns_udp_size })
}

impl Query {
    /// Whether the question is of class IN (the only class the mesh has names in).
    pub fn is_internet(&self) -> bool {
        self.qclass == CLASS_IN
    }

    /// The largest UDP answer this client takes.
    pub fn udp_limit(&self) -> usize {
        match self.edns_udp_size {
            Some(n) => (n as usize).clamp(CLASSIC_UDP, MAX_UDP),
            None => CLASSIC_UDP,
        }
    }
}

/// A response, read strictly: what a client would make of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    pub rcode: u8,
    pub truncated: bool,
    /// The question's name (lower-cased, dotted), empty when the response has no question.
    pub name: String,
    /// The A and AAAA records of the answer section.
    pub addresses: Vec<IpAddr>,
}

/// Reads a response (the proxy's own answers are checked with it by the tests and the
/// fuzzer: every one must read back).
pub fn parse_response(buf: &[u8]) -> Result<Response, WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Short(buf.len()));
    }
    let mut r = Reader { buf, pos: 0 };
    let id = r.u16("the header")?;
    let flags = r.u16("the header")?;
    if flags & QR == 0 {
        return Err(WireError::NotAResponse);
    }
    let (qd, an, ns, ar) = (r.u16("")?, r.u16("")?, r.u16("")?, r.u16("")?);
    if qd > 1 {
        return Err(WireError::Questions(qd));
    }
    let mut name = String::new();
    if qd == 1 {
        r.name(Some(&mut name))?;
        r.take(4, "the question")?;
    }
    let mut addresses = Vec::new();
    for i in 0..(u32::from(an) + u32::from(ns) + u32::from(ar)) {
        let (rtype, _, data) = r.record()?;
        if i >= u32::from(an) || !matches!(rtype, TYPE_A | TYPE_AAAA) {
            continue;
        }
        let ip = match (rtype, data.len()) {
            (TYPE_A, 4) => IpAddr::from(<[u8; 4]>::try_from(data).expect("length checked")),
            (TYPE_AAAA, 16) => IpAddr::from(<[u8; 16]>::try_from(data).expect("length checked")),
            (rtype, len) => return Err(WireError::RecordData { rtype, len }),
        };
        addresses.push(ip);
    }
    if r.pos != buf.len() {
        return Err(WireError::Trailing(buf.len() - r.pos));
    }
    Ok(Response { id, rcode: (flags & 0x0F) as u8, truncated: flags & TC != 0, name, addresses })
}

/// The ID of a message (a query or a forwarded answer), if it has a header.
pub fn id_of(buf: &[u8]) -> Option<u16> {
    (buf.len() >= HEADER_LEN).then(|| u16::from_be_bytes([buf[0], buf[1]]))
}

/// A recursive query for `name` (dotted, a trailing dot allowed) and `qtype`, class IN, with
/// EDNS offering [`MAX_UDP`] bytes; `None` when the name is not one DNS can carry (an empty
/// label, a label over 63 bytes, over 255 bytes in all).
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Option<Vec<u8>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut q = Vec::with_capacity(HEADER_LEN + name.len() + 2 + 4 + 11);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&RD.to_be_bytes());
    // One question, no answers, no authorities, one additional record (the OPT).
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    let start = q.len();
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    if q.len() - start > 255 {
        return None;
    }
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    // OPT: root owner, type, UDP size, extended rcode and flags, no data.
    q.push(0);
    q.extend_from_slice(&TYPE_OPT.to_be_bytes());
    q.extend_from_slice(&(MAX_UDP as u16).to_be_bytes());
    q.extend_from_slice(&[0; 6]);
    Some(q)
}

/// Whether an answer says it was truncated (TC): a UDP answer then is asked again over TCP.
pub fn is_truncated(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN && u16::from_be_bytes([buf[2], buf[3]]) & TC != 0
}

/// The response code of an answer, for the metrics.
pub fn rcode_of(buf: &[u8]) -> Option<u8> {
    (buf.len() >= HEADER_LEN).then(|| buf[3] & 0x0F)
}

/// An answer to `q` with `rcode` and, for NOERROR, `addresses` as A or AAAA records (those
/// of the question's type; the others are left out: a known name without records of the
/// type asked is NOERROR with no answer). Records that do not fit in `limit` bytes are left
/// out and the answer marked truncated, so the client asks again over TCP.
pub fn answer(q: &Query, rcode: Rcode, addresses: &[IpAddr], ttl: u32, limit: usize) -> Vec<u8> {
    let records: Vec<&IpAddr> = addresses
        .iter()
        .filter(|a| matches!((q.qtype, a), (TYPE_A, IpAddr::V4(_)) | (TYPE_AAAA, IpAddr::V6(_))))
        .collect();
    let opt_len = if q.edns_udp_size.is_some() { 11 } else { 0 };
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len() + records.len() * 28 + opt_len);
    out.extend_from_slice(&q.id.to_be_bytes());
    let flags = QR | AA | RA | if q.recursion_desired { RD } else { 0 } | rcode as u16;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&q.question);
    let mut count = 0u16;
    let mut truncated = false;
    for a in records {
        let rdata: Vec<u8> = match a {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        if out.len() + 12 + rdata.len() + opt_len > limit {
            truncated = true;
            break;
        }
        // The owner name is the question's: a pointer to it, right after the header.
        out.extend_from_slice(&[0xC0, HEADER_LEN as u8]);
        out.extend_from_slice(&q.qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
        count += 1;
    }
    out[6..8].copy_from_slice(&count.to_be_bytes());
    if truncated {
        out[2] |= (TC >> 8) as u8;
    }
    if q.edns_udp_size.is_some() {
        // OPT: root owner, our payload size, no extended rcode, version 0, no options.
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&(MAX_UDP as u16).to_be_bytes());
        out.extend_from_slice(&[0; 6]);
        out[10..12].copy_from_slice(&1u16.to_be_bytes());
    }
    out
}

/// An error answer to a message that has a header but no readable question.
pub fn error_answer(buf: &[u8], rcode: Rcode) -> Option<Vec<u8>> {
    let id = id_of(buf)?;
    let rd = u16::from_be_bytes([buf[2], buf[3]]) & RD;
    let opcode = u16::from_be_bytes([buf[2], buf[3]]) & OPCODE;
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(QR | RA | opcode | rd | rcode as u16).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

#[cfg(test)]
#[path = "wire_tests.rs"]
pub(crate) mod tests;
