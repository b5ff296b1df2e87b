//! Original destinations as the proxy looks them up on accept: the seam between the data
//! path and the kernel's map, with a table in memory for running the proxy without eBPF.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use ambit_common::maps::{ConnKey, OrigDst};

use super::{addr, CaptureError, OrigDstTable};
use crate::os::cookie::NetnsCookie;

/// Where the proxy finds where a captured connection was going.
pub trait OrigDstSource: Send + Sync + 'static {
    /// The record of an accepted connection, removed as it is read: each is taken once.
    fn take(&self, key: &ConnKey) -> Result<Option<OrigDst>, CaptureError>;
    /// Records waiting for their accept (diagnostics).
    fn pending(&self) -> usize;
}

impl OrigDstSource for OrigDstTable {
    fn take(&self, key: &ConnKey) -> Result<Option<OrigDst>, CaptureError> {
        OrigDstTable::take(self, key)
    }

    fn pending(&self) -> usize {
        self.len()
    }
}

/// Original destinations put there by hand, as sock_ops would have recorded them: the proxy
/// runs unprivileged and without eBPF (the in-process tests), and a client connects to the
/// proxy's outbound listener directly after [`MockOrigDst::record`].
#[derive(Debug, Default)]
pub struct MockOrigDst(Mutex<HashMap<ConnKey, OrigDst>>);

impl MockOrigDst {
    /// Records that the connection from `client` to the listener at `listener`, in the
    /// network namespace with `netns_cookie`, was going to `dst`.
    pub fn record(
        &self,
        netns_cookie: NetnsCookie,
        client: SocketAddr,
        listener: SocketAddr,
        dst: SocketAddr,
    ) {
        let orig = OrigDst { ip: addr::ip_key(dst.ip()), port: dst.port(), _pad: 0 };
        self.lock().insert(addr::conn_key(netns_cookie, client, listener), orig);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnKey, OrigDst>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl OrigDstSource for MockOrigDst {
    fn take(&self, key: &ConnKey) -> Result<Option<OrigDst>, CaptureError> {
        Ok(self.lock().remove(key))
    }

    fn pending(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NetnsCookie;

    #[test]
    fn a_recorded_destination_is_taken_once_by_the_key_the_proxy_builds() {
        let m = MockOrigDst::default();
        let (client, listener, dst) = (
            "127.0.0.2:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
            "10.1.0.3:80".parse().unwrap(),
        );
        m.record(NetnsCookie(7), client, listener, dst);
        assert_eq!(m.pending(), 1);
        let key = addr::conn_key(NetnsCookie(7), client, listener);
        let got = m.take(&key).expect("no error").expect("recorded");
        assert_eq!(addr::orig_dst_addr(&got), Some(dst));
        assert!(m.take(&key).expect("no error").is_none(), "taken once");
        assert!(
            m.take(&addr::conn_key(NetnsCookie(8), client, listener)).expect("no error").is_none(),
            "other netns"
        );
    }
}
