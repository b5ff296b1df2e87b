//! Copies bytes both ways between the client and the upstream connection, counting them.
//!
//! A clean end of stream on one side is passed on as a half-close (FIN) and the other
//! direction keeps going; an error on either side resets both, so each peer sees what it
//! would have seen without the proxy.

use std::{io, time::Duration};

use crate::metrics::{ByteCounter, RelayCounters};
use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpStream,
    },
};

/// Per-direction buffer. Large enough for bulk transfers to run at line rate, small enough
/// that idle-connection memory stays modest.
const BUF_SIZE: usize = 32 * 1024;

/// What went through a relayed connection.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Client to upstream.
    pub sent: u64,
    /// Upstream to client.
    pub received: u64,
    pub error: Option<io::Error>,
}

/// Copies until end of stream (passed on as a half-close). A buffer is taken for each read
/// when there is something to read (allocation is cheap next to the syscalls), so an idle
/// connection holds none.
async fn copy(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    counter: &ByteCounter,
    total: &mut u64,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf = BytesMut::with_capacity(BUF_SIZE);
        // `read_buf`, not `try_read_buf`: a short read clears the readiness, so the next
        // `readable()` parks instead of costing a read that fails with EAGAIN.
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the other direction may still have data.
            return to.shutdown().await;
        }
        to.write_all(&buf).await?;
        *total += n as u64;
        counter.add(n as u64);
    }
}

/// Makes the socket's close send a reset.
pub fn linger_zero(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set SO_LINGER for a reset; closing normally");
    }
}

/// The error a relay ends with when it is closed from outside (authorization).
pub fn revoked() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "closed by the proxy: denied by an authorization policy")
}

/// Relays until both directions ended; client → upstream is the request.
pub async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    counters: &RelayCounters,
    close: Option<&super::authorize::Revocation>,
) -> Transfer {
    let (mut sent, mut received) = (0u64, 0u64);
    let mut error = None;
    {
        let (mut client_r, mut client_w) = client.split();
        let (mut up_r, mut up_w) = upstream.split();
        let up = copy(&mut client_r, &mut up_w, counters.request(), &mut sent);
        let down = copy(&mut up_r, &mut client_w, counters.response(), &mut received);
        let closed = async {
            match close {
                Some(c) => c.revoked().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(up, down, closed);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            let result = tokio::select! {
                r = &mut up, if !up_done => { up_done = true; r }
                r = &mut down, if !down_done => { down_done = true; r }
                () = &mut closed => Err(revoked()),
            };
            if let Err(e) = result {
                error = Some(e);
                break;
            }
        }
    }
    if error.is_some() {
        linger_zero(&client);
        linger_zero(&upstream);
    }
    Transfer { sent, received, error }
}
