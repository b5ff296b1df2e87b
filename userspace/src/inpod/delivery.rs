//! Delivering inbound connections from the client's own address, inside the pod's network
//! namespace, without iptables.
//!
//! The proxy connects to the application from a transparent socket bound to the client's
//! address and marked with the delivery mark. Inside the pod, that address is not local, so
//! the application's replies would leave by `eth0`. Three settings of the pod's namespace
//! bring them back to the proxy:
//! - `net.ipv4.tcp_fwmark_accept=1`: the application's accepted socket (and its SYN-ACK)
//!   takes the mark of the SYN that opened it, the delivery mark;
//! - a policy rule, `fwmark <delivery mark> lookup <table>`, and in that table `local default
//!   dev lo`: marked packets are delivered locally, to the proxy's socket;
//! - `net.ipv4.fwmark_reflect=1` and `net.ipv6.fwmark_reflect=1`: the resets and ICMP errors
//!   the kernel answers the proxy's SYN with (a closed port) carry its mark too, so the proxy
//!   sees "refused" at once rather than waiting while the reset leaves for the real client.
//!
//! Only sockets that carry the delivery mark are affected: the application's other traffic,
//! kubelet probes and the proxy's own connections route as before. All of it is undone when
//! the pod leaves the mesh.

use std::io;

use crate::os::{
    netns::Netns,
    rtnetlink::{self, Family, Rtnl},
};

/// Priority of the policy rule: after the `local` table (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 32000;

const SYSCTLS: [&str; 3] = [
    "/proc/sys/net/ipv4/tcp_fwmark_accept",
    "/proc/sys/net/ipv4/fwmark_reflect",
    "/proc/sys/net/ipv6/fwmark_reflect",
];

/// The pod's families that need the rule and route.
fn families(v4: bool, v6: bool) -> Vec<Family> {
    [(v4, Family::V4), (v6, Family::V6)].into_iter().filter(|(has, _)| *has).map(|(_, f)| f).collect()
}

fn write_sysctls(value: &str) -> io::Result<()> {
    for path in SYSCTLS {
        std::fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    }
    Ok(())
}

/// Prepares the pod's namespace (see the module documentation). Repeating it changes nothing.
pub fn prepare(netns: &Netns, v4: bool, v6: bool, mark: u32) -> io::Result<()> {
    // The sysctls follow the namespace of whoever opens them, the netlink socket the one it
    // is created in, and so does the interface index: all three inside the pod.
    let (mut nl, lo) = netns.run(|| -> io::Result<(Rtnl, u32)> {
        write_sysctls("1")?;
        Ok((Rtnl::open()?, rtnetlink::ifindex("lo")?))
    })??;
    let table = mark;
    for f in families(v4, v6) {
        nl.add_local_default(f, table, lo).map_err(|e| {
            io::Error::new(e.kind(), format!("adding `local default dev lo table {table}` ({f:?}): {e}"))
        })?;
        nl.add_fwmark_rule(f, mark, table, RULE_PRIORITY).map_err(|e| {
            io::Error::new(e.kind(), format!("adding `fwmark {mark:#x} lookup {table}` ({f:?}): {e}"))
        })?;
    }
    Ok(())
}

/// Undoes [`prepare`]: rules, routes, and the sysctls back to their defaults (0, which pods
/// cannot change themselves: none of the three is a "safe" sysctl Kubernetes lets them set).
pub fn undo(netns: &Netns, v4: bool, v6: bool, mark: u32) -> io::Result<()> {
    let (mut nl, lo) = netns.run(|| -> io::Result<(Rtnl, u32)> {
        write_sysctls("0")?;
        Ok((Rtnl::open()?, rtnetlink::ifindex("lo")?))
    })??;
    let table = mark;
    for f in families(v4, v6) {
        nl.del_fwmark_rule(f, mark, table, RULE_PRIORITY)?;
        nl.del_local_default(f, table, lo)?;
    }
    Ok(())
}
