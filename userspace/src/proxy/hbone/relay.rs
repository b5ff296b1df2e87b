//! The byte relay between a TCP socket and a CONNECT stream, as one hand-written future.
//!
//! Every idle tunnelled connection keeps its relay's state for as long as it is open, so the
//! state is kept to what the bytes need: the socket, the stream's two halves, at most one
//! chunk in flight each way, and the counts. Readiness is polled (`poll_read_ready`,
//! `poll_capacity`, `poll_data`, `poll_write`), which parks the task's waker in the socket
//! and the stream themselves; nested `async` futures would each carry their own waiter and
//! buffers (an idle tunnel's relay shrank from 768 to a few hundred bytes this way).

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{io::AsyncWrite, net::TcpStream};
use tokio_util::io::poll_read_buf;

use super::{BULK_READ_CHUNK, READ_CHUNK};
use crate::{
    metrics::{ByteCounter, RelayCounters},
    proxy::{authorize::Revocation, relay::linger_zero, Transfer},
};

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

pin_project_lite::pin_project! {
    /// Relays between a TCP connection and a CONNECT stream until both directions ended
    /// (see [`relay`]).
    pub struct Relay<'a> {
        tcp: TcpStream,
        send: SendStream<Bytes>,
        recv: RecvStream,
        // One reference and the end, not one per direction: every idle tunnel keeps this.
        counters: &'a RelayCounters,
        end: End,
        // Read from the socket, not yet given to the stream (flow control).
        up: Bytes,
        // Received from the stream, not yet written to the socket.
        down: Bytes,
        sent: u64,
        received: u64,
        up_done: bool,
        // The last read filled its buffer: read in bulk-sized chunks.
        up_bulk: bool,
        // The stream ended: the socket's write side is shut down next.
        down_eof: bool,
        down_done: bool,
        close: Option<&'a Revocation>,
    }
}

/// Which end of the tunnel a relay is, for its byte counters.
#[derive(Clone, Copy, Debug)]
pub enum End {
    /// Sent the CONNECT: the socket's bytes are the request.
    Connecting,
    /// Answered it: the socket's bytes are the response.
    Answering,
}

/// Relays between `tcp` and the CONNECT stream (`send`, `recv`) until both directions
/// ended: TCP → stream with HTTP/2 flow control and END_STREAM at EOF, stream → TCP
/// releasing flow-control credit as bytes are written and a FIN at its end. A failure on
/// one side resets the other (RST_STREAM on the tunnel, TCP reset on the socket), as does
/// `close` firing (authorization revoked). The transfer's `sent` is TCP → tunnel and
/// `received` tunnel → TCP; `end` says which of `counters`' directions each is.
pub fn relay<'a>(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    counters: &'a RelayCounters,
    end: End,
    close: Option<&'a Revocation>,
) -> Relay<'a> {
    Relay {
        tcp,
        send,
        recv,
        counters,
        end,
        up: Bytes::new(),
        down: Bytes::new(),
        sent: 0,
        received: 0,
        up_done: false,
        up_bulk: false,
        down_eof: false,
        down_done: false,
        close,
    }
}

impl End {
    /// `counters`' directions as (socket → tunnel, tunnel → socket) for this end.
    fn directions(self, counters: &RelayCounters) -> (&ByteCounter, &ByteCounter) {
        match self {
            End::Connecting => (counters.request(), counters.response()),
            End::Answering => (counters.response(), counters.request()),
        }
    }
}

impl Relay<'_> {
    /// `n` bytes of the socket's already went out with the CONNECT: counted as sent.
    pub fn sent_early(mut self, n: u64) -> Self {
        self.sent += n;
        self.end.directions(self.counters).0.add(n);
        self
    }
}

impl Future for Relay<'_> {
    type Output = Transfer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Transfer> {
        let this = self.project();
        let (to_tunnel, from_tunnel) = this.end.directions(this.counters);
        let mut result = Ok(());
        if let Some(close) = this.close {
            if close.poll_revoked(cx).is_ready() {
                result = Err(crate::proxy::relay::revoked());
            }
        }
        if result.is_ok() && !*this.up_done {
            let up = (this.up, this.up_bulk);
            match poll_up(this.tcp, this.send, up, to_tunnel, this.sent, cx) {
                Poll::Ready(Ok(())) => *this.up_done = true,
                Poll::Ready(Err(e)) => result = Err(e),
                Poll::Pending => {}
            }
        }
        if result.is_ok() && !*this.down_done {
            let down = (this.down, this.down_eof);
            match poll_down(this.tcp, this.recv, down, from_tunnel, this.received, cx) {
                Poll::Ready(Ok(())) => *this.down_done = true,
                Poll::Ready(Err(e)) => result = Err(e),
                Poll::Pending => {}
            }
        }
        let error = match result {
            Ok(()) if *this.up_done && *this.down_done => None,
            Ok(()) => return Poll::Pending,
            Err(e) => {
                this.send.send_reset(h2::Reason::CANCEL);
                linger_zero(this.tcp);
                Some(e)
            }
        };
        Poll::Ready(Transfer { sent: *this.sent, received: *this.received, error })
    }
}

/// TCP → stream until EOF (END_STREAM sent). A buffer is taken only once the socket is
/// readable, so an idle tunnel holds none.
fn poll_up(
    tcp: &mut TcpStream,
    send: &mut SendStream<Bytes>,
    (pending, bulk): (&mut Bytes, &mut bool),
    counter: &ByteCounter,
    total: &mut u64,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    loop {
        if pending.is_empty() {
            ready!(tcp.poll_read_ready(cx))?;
            let size = if *bulk { BULK_READ_CHUNK } else { READ_CHUNK };
            let mut buf = BytesMut::with_capacity(size);
            // Through `AsyncRead`, not `try_read_buf`: a short read clears the socket's
            // readiness, so the next poll parks instead of costing a read that fails with
            // EAGAIN (two syscalls per request/response exchange). Stale readiness makes
            // this Pending, and the buffer is dropped with it.
            match ready!(poll_read_buf(Pin::new(&mut *tcp), cx, &mut buf))? {
                0 => return Poll::Ready(send.send_data(Bytes::new(), true).map_err(h2_io)),
                n => {
                    *bulk = n == buf.capacity();
                    *pending = buf.freeze();
                }
            }
        }
        send.reserve_capacity(pending.len());
        let cap = match ready!(send.poll_capacity(cx)) {
            Some(cap) => cap.map_err(h2_io)?,
            None => {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed")))
            }
        };
        let chunk = pending.split_to(cap.min(pending.len()));
        let len = chunk.len() as u64;
        send.send_data(chunk, false).map_err(h2_io)?;
        *total += len;
        counter.add(len);
    }
}

/// Stream → TCP until the stream ends (FIN sent), releasing flow-control credit for what
/// was written.
fn poll_down(
    tcp: &mut TcpStream,
    recv: &mut RecvStream,
    (pending, eof): (&mut Bytes, &mut bool),
    counter: &ByteCounter,
    total: &mut u64,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    loop {
        if !pending.is_empty() {
            let n = ready!(Pin::new(&mut *tcp).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            pending.advance(n);
            recv.flow_control().release_capacity(n).map_err(h2_io)?;
            *total += n as u64;
            counter.add(n as u64);
            continue;
        }
        if *eof {
            return Pin::new(&mut *tcp).poll_shutdown(cx);
        }
        match ready!(recv.poll_data(cx)) {
            Some(chunk) => *pending = chunk.map_err(h2_io)?,
            None => *eof = true,
        }
    }
}
