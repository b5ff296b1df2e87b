//! The socket under an HBONE connection's TLS, with a read buffer held only while bytes flow.
//!
//! rustls asks for at most 4 KiB per read, so reading the socket straight into it costs a
//! syscall per 4 KiB (a third of the proxy's CPU under bulk transfers). A 32 KiB buffer
//! turns that into one per 32 KiB — but a buffer kept for the connection's life (tokio's
//! `BufReader`) costs 32 KiB on every pooled connection, idle ones too: a third of a KiB for
//! each idle tunnel it carries. Here the buffer is taken when a read begins and given back
//! when the socket has nothing more to read, so an idle connection holds none and a busy one
//! keeps reusing the same buffer.
//!
//! Given-back buffers wait in a small per-thread stash for the next connection that wakes up
//! on that worker: a 32 KiB `malloc` and `free` for every burst (a request/response exchange,
//! a new tunnel's headers) is out of reach of the allocator's per-thread caches and cost
//! ~10,000 instructions per tunnelled connection in a connection storm (callgrind).

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

/// `io` with a read buffer of `capacity` bytes while reads find data; writes pass through
/// unbuffered (vectored when `io` is).
#[derive(Debug)]
pub struct ReadBuffered<T> {
    io: T,
    capacity: usize,
    /// Read from `io`, not yet returned; empty with no capacity when the socket is idle.
    buf: BytesMut,
}

/// Buffers kept per thread: enough for the connections one worker serves back to back; the
/// worst case held is this many buffers per worker, whatever the number of connections.
const STASH_MAX: usize = 4;

thread_local! {
    static STASH: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer of at least `capacity` bytes, from the stash when one is there.
fn take_buffer(capacity: usize) -> BytesMut {
    let stashed = STASH.with(|s| s.borrow_mut().pop());
    match stashed {
        Some(mut buf) => {
            buf.reserve(capacity);
            buf
        }
        None => BytesMut::with_capacity(capacity),
    }
}

/// Stashes `buf` for the next reader on this thread, or frees it when the stash is full.
fn give_back(buf: BytesMut) {
    // A buffer still shared (bytes split off it) or with unread bytes is not ours to reuse.
    if buf.capacity() == 0 || !buf.is_empty() {
        return;
    }
    STASH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < STASH_MAX {
            s.push(buf);
        }
    });
}

impl<T> ReadBuffered<T> {
    pub fn new(io: T, capacity: usize) -> Self {
        ReadBuffered { io, capacity, buf: BytesMut::new() }
    }

    /// Gives the (drained) buffer back: the connection is idle or done.
    fn release(&mut self) {
        give_back(std::mem::take(&mut self.buf));
    }

    /// Bytes of buffer held right now (0 when idle).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.capacity()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            // Takes a buffer after an idle spell; reclaims the drained one's space otherwise.
            if this.buf.capacity() == 0 {
                this.buf = take_buffer(this.capacity);
            } else {
                this.buf.reserve(this.capacity);
            }
            match poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Ready(Ok(_)) => {}
                // Nothing more to read: the connection is idle until the peer sends again.
                Poll::Pending => {
                    this.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.release();
                    return Poll::Ready(Err(e));
                }
            }
            if this.buf.is_empty() {
                // End of stream: nothing to return, nothing to keep.
                this.release();
                return Poll::Ready(Ok(()));
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn reads_in_small_pieces_through_one_buffer_and_gives_it_back_when_idle() {
        let (mut peer, ours) = tokio::io::duplex(64 * 1024);
        let mut r = ReadBuffered::new(ours, 32 * 1024);
        assert_eq!(r.held(), 0, "nothing held before the first read");

        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        let mut small = [0u8; 4096];
        let mut filled = 0;
        while filled < sent.len() {
            let n = r.read(&mut small).await.unwrap();
            assert!(n > 0 && n <= 4096, "a read returns at most what was asked: {n}");
            got[filled..filled + n].copy_from_slice(&small[..n]);
            filled += n;
        }
        assert_eq!(got, sent, "bytes arrive whole and in order");

        // The peer is quiet: the next read parks, and the buffer goes with it.
        let idle = futures::FutureExt::now_or_never(r.read(&mut small));
        assert!(idle.is_none(), "no data, so the read waits");
        assert_eq!(r.held(), 0, "an idle connection holds no read buffer");

        // It comes back with the next bytes, and EOF still reads as 0.
        peer.write_all(b"again").await.unwrap();
        let n = r.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"again");
        drop(peer);
        assert_eq!(r.read(&mut small).await.unwrap(), 0, "end of stream reads as 0");
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn given_back_buffers_are_reused_on_the_thread_up_to_the_stash_limit() {
        // A thread of its own: the stash is per thread and other tests use theirs.
        std::thread::spawn(|| {
            let buf = take_buffer(32 * 1024);
            let addr = buf.as_ptr();
            give_back(buf);
            let again = take_buffer(32 * 1024);
            assert_eq!(again.as_ptr(), addr, "the stashed buffer comes back, not a new one");
            assert!(again.capacity() >= 32 * 1024);

            let mut unread = again;
            unread.extend_from_slice(b"not read yet");
            give_back(unread);
            assert_eq!(STASH.with(|s| s.borrow().len()), 0, "a buffer with unread bytes is not stashed");

            for _ in 0..STASH_MAX + 3 {
                give_back(BytesMut::with_capacity(1024));
            }
            assert_eq!(STASH.with(|s| s.borrow().len()), STASH_MAX, "the stash is bounded");
            give_back(BytesMut::new());
            assert_eq!(STASH.with(|s| s.borrow().len()), STASH_MAX);
        })
        .join()
        .unwrap();
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let mut w = ReadBuffered::new(ours, 32 * 1024);
        w.write_all(b"through").await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"through");
    }
}
