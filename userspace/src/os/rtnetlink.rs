//! The few routing-netlink requests ambit makes, in a pod's network namespace: a policy rule
//! (`fwmark M lookup T`) and a route (`local default dev lo table T`), added and deleted.
//! A netlink socket belongs to the namespace it was created in: open it inside the pod's
//! (`Netns::run`) and use it from anywhere.
//!
//! Every request asks for an acknowledgement, and the kernel's answer is returned as the
//! error it carries. Adding what exists already and deleting what is gone both succeed, so
//! every call can be repeated.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NLMSG_HDRLEN: usize = 16;
/// `struct fib_rule_hdr` and `struct rtmsg`: both 12 bytes, the same first fields.
const BODY_LEN: usize = 12;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
/// `fib_rule_hdr.action`: look the table up.
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
/// `rtm_protocol` of the routes ambit adds, so that they can be told from others (`ip route`
/// shows it as a number). Any value above RTPROT_STATIC (4) is free for daemons.
pub const RTPROT_AMBIT: u8 = 0x53;

/// The address family of a request (`AF_INET` or `AF_INET6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }
}

/// A routing-netlink socket of the namespace it was opened in.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

/// One request being built: header, body, attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, body: [u8; BODY_LEN]) -> Msg {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, set in `finish`
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        b.extend_from_slice(&body);
        Msg(b)
    }

    fn attr_u32(mut self, kind: u16, value: u32) -> Msg {
        self.0.extend_from_slice(&8u16.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(&value.to_ne_bytes());
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// The body of a rule request: family, action "to table", the table in an attribute.
fn rule_body(family: Family) -> [u8; BODY_LEN] {
    let mut b = [0u8; BODY_LEN];
    b[0] = family.af();
    b[7] = FR_ACT_TO_TBL;
    b
}

/// The body of a route request: a host-scope `local` route to the default prefix.
fn local_default_body(family: Family) -> [u8; BODY_LEN] {
    let mut b = [0u8; BODY_LEN];
    b[0] = family.af();
    b[5] = RTPROT_AMBIT;
    b[6] = RT_SCOPE_HOST;
    b[7] = RTN_LOCAL;
    b
}

impl Rtnl {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> io::Result<Rtnl> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor we just created and own alone.
        Ok(Rtnl { fd: unsafe { OwnedFd::from_raw_fd(fd) }, seq: 0 })
    }

    /// `ip rule add fwmark <mark>/0xffffffff lookup <table> priority <priority>`.
    pub fn add_fwmark_rule(
        &mut self,
        family: Family,
        mark: u32,
        table: u32,
        priority: u32,
    ) -> io::Result<()> {
        self.rule(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, family, mark, table, priority)
    }

    /// `ip rule del` of the same rule.
    pub fn del_fwmark_rule(
        &mut self,
        family: Family,
        mark: u32,
        table: u32,
        priority: u32,
    ) -> io::Result<()> {
        self.rule(RTM_DELRULE, 0, family, mark, table, priority)
    }

    /// `ip route add local default dev <ifindex> table <table>`.
    pub fn add_local_default(&mut self, family: Family, table: u32, ifindex: u32) -> io::Result<()> {
        self.route(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, family, table, ifindex)
    }

    /// `ip route del` of the same route.
    pub fn del_local_default(&mut self, family: Family, table: u32, ifindex: u32) -> io::Result<()> {
        self.route(RTM_DELROUTE, 0, family, table, ifindex)
    }

    fn rule(
        &mut self,
        kind: u16,
        flags: u16,
        family: Family,
        mark: u32,
        table: u32,
        priority: u32,
    ) -> io::Result<()> {
        let seq = self.next_seq();
        let msg = Msg::new(kind, flags, seq, rule_body(family))
            .attr_u32(FRA_TABLE, table)
            .attr_u32(FRA_FWMARK, mark)
            .attr_u32(FRA_FWMASK, u32::MAX)
            .attr_u32(FRA_PRIORITY, priority)
            .finish();
        self.request(kind, seq, &msg)
    }

    fn route(&mut self, kind: u16, flags: u16, family: Family, table: u32, ifindex: u32) -> io::Result<()> {
        let seq = self.next_seq();
        let msg = Msg::new(kind, flags, seq, local_default_body(family))
            .attr_u32(RTA_TABLE, table)
            .attr_u32(RTA_OIF, ifindex)
            .finish();
        self.request(kind, seq, &msg)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request and waits for its acknowledgement. "Exists" on an add and "not
    /// there" on a delete count as done.
    fn request(&mut self, kind: u16, seq: u32, msg: &[u8]) -> io::Result<()> {
        // SAFETY: `msg` is valid for reads of its length; the kernel copies it.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is valid for writes of its length; the kernel writes at most that.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if let Some(errno) = ack(&buf[..n as usize], seq)? {
                return match errno {
                    0 => Ok(()),
                    libc::EEXIST if matches!(kind, RTM_NEWRULE | RTM_NEWROUTE) => Ok(()),
                    libc::ENOENT | libc::ESRCH if matches!(kind, RTM_DELRULE | RTM_DELROUTE) => Ok(()),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
        }
    }
}

/// The errno of the acknowledgement of request `seq` in `buf` (0: success), `None` when
/// `buf` holds no such message.
fn ack(buf: &[u8], seq: u32) -> io::Result<Option<i32>> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let u32_at = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = u32_at(off) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if kind == NLMSG_ERROR && u32_at(off + 8) == seq && len >= NLMSG_HDRLEN + 4 {
            let errno = i32::from_ne_bytes([buf[off + 16], buf[off + 17], buf[off + 18], buf[off + 19]]);
            return Ok(Some(-errno));
        }
        off += (len + 3) & !3;
    }
    Ok(None)
}

/// The index of interface `name` in the calling thread's current network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_request_is_laid_out_as_the_kernel_reads_it() {
        let m = Msg::new(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, 7, rule_body(Family::V6))
            .attr_u32(FRA_TABLE, 0x53a)
            .attr_u32(FRA_FWMARK, 0x53a)
            .finish();
        assert_eq!(m.len(), NLMSG_HDRLEN + BODY_LEN + 2 * 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().expect("4")), m.len() as u32);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWRULE);
        let flags = u16::from_ne_bytes([m[6], m[7]]);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().expect("4")), 7);
        assert_eq!(m[16], libc::AF_INET6 as u8);
        assert_eq!(m[16 + 7], FR_ACT_TO_TBL);
        // First attribute: length 8, FRA_TABLE, value.
        assert_eq!(&m[28..32], &[8, 0, FRA_TABLE as u8, 0]);
        assert_eq!(u32::from_ne_bytes(m[32..36].try_into().expect("4")), 0x53a);
    }

    #[test]
    fn acks_are_found_by_sequence_and_carry_the_errno() {
        let msg = |seq: u32, errno: i32| {
            let mut b = Vec::new();
            b.extend_from_slice(&36u32.to_ne_bytes());
            b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&(-errno).to_ne_bytes());
            b.extend_from_slice(&[0u8; 16]);
            b
        };
        let mut two = msg(3, libc::EEXIST);
        two.extend(msg(4, 0));
        assert_eq!(ack(&two, 4).expect("parses"), Some(0));
        assert_eq!(ack(&two, 3).expect("parses"), Some(libc::EEXIST));
        assert_eq!(ack(&two, 5).expect("parses"), None);
        assert!(ack(&two[..20], 3).is_err(), "a message longer than what was read");
    }
}
