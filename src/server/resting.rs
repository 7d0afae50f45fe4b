//! A plain HTTP/1.1 keep-alive connection that holds no hyper buffers between requests.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer (and its dispatcher) for
//! as long as a connection is open, busy or idle: 20 KiB per idle keep-alive client,
//! where nginx frees its buffers once a request is done (about 1 KiB). Here each run
//! of requests gets its own hyper connection: when hyper has answered everything and
//! waits for the next request head with nothing to write, the socket tells the driver;
//! after `RELEASE_AFTER_IDLE` of that (a busy client keeps its hyper connection), it
//! shuts that hyper connection down (a no-op on the socket) and takes the socket back
//! with whatever hyper had read ahead, copied out of hyper's buffer. Idle, the
//! connection is the socket, its task and a few words; the next byte from the client
//! starts a new hyper connection on it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::client_io::SendTimeout;

/// What the socket, the service and the driver tell each other about one connection.
#[derive(Default)]
pub(super) struct IdleSignal {
    /// Requests handed to the proxy whose response body hyper has not dropped yet.
    open_responses: AtomicU32,
    /// hyper's last read found no bytes: it waits on the socket.
    read_parked: AtomicBool,
    /// The last write or flush could not complete: hyper still has bytes to send.
    write_blocked: AtomicBool,
    /// The driver is shutting hyper down to take the socket back: the socket stays open.
    releasing: AtomicBool,
}

impl IdleSignal {
    /// Marks a request open until the returned guard (kept with its response body)
    /// is dropped.
    pub(super) fn open(self: &Arc<Self>) -> OpenResponse {
        self.open_responses.fetch_add(1, Ordering::Relaxed);
        OpenResponse(Arc::clone(self))
    }

    /// Whether hyper, once it has returned `Pending`, only waits for the next request
    /// head: it has every answer passed on and written, and found nothing to read.
    pub(super) fn hyper_is_idle(&self) -> bool {
        self.read_parked.load(Ordering::Relaxed)
            && !self.write_blocked.load(Ordering::Relaxed)
            && self.open_responses.load(Ordering::Relaxed) == 0
    }

    pub(super) fn set_releasing(&self, releasing: bool) {
        self.releasing.store(releasing, Ordering::Relaxed);
    }
}

/// A request on its way through the proxy, until hyper is done with its answer.
pub(super) struct OpenResponse(Arc<IdleSignal>);

impl Drop for OpenResponse {
    fn drop(&mut self) {
        self.0.open_responses.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The socket as hyper sees it: bytes read ahead by the previous hyper connection come
/// first, and it reports when hyper is idle.
pub(super) struct RestingIo {
    inner: SendTimeout<TcpStream>,
    read_ahead: Bytes,
    signal: Arc<IdleSignal>,
}

impl RestingIo {
    pub(super) fn new(inner: SendTimeout<TcpStream>, signal: Arc<IdleSignal>) -> RestingIo {
        RestingIo {
            inner,
            read_ahead: Bytes::new(),
            signal,
        }
    }

    /// Takes back the bytes a finished hyper connection had read but not parsed.
    pub(super) fn put_back(&mut self, read_ahead: Bytes) {
        put_back(&mut self.read_ahead, read_ahead);
    }

    pub(super) fn has_read_ahead(&self) -> bool {
        !self.read_ahead.is_empty()
    }

    /// Waits until the client has sent something (or closed), holding no buffer.
    pub(super) async fn readable(&self) -> io::Result<()> {
        self.inner.get_ref().readable().await
    }
}

impl AsyncRead for RestingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.read_ahead.is_empty() {
            let n = this.read_ahead.len().min(buf.remaining());
            buf.put_slice(&this.read_ahead[..n]);
            this.read_ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.signal
            .read_parked
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for RestingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.signal
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = crate::gather::poll_write_gathered(Pin::new(&mut self.inner), cx, bufs);
        self.signal
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.signal
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.signal.releasing.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Puts `taken` (what hyper had read ahead) in front of `kept` (what it had not yet
/// taken of the last read-ahead).
fn put_back(kept: &mut Bytes, taken: Bytes) {
    if taken.is_empty() {
        // Even empty, hyper's `Bytes` can share its whole read buffer (8 KB and up):
        // kept, it would pin that buffer for as long as the connection idles.
        return;
    }
    let mut joined = Vec::with_capacity(taken.len() + kept.len());
    joined.extend_from_slice(&taken);
    joined.extend_from_slice(kept);
    // Copied for the same reason: a few pipelined bytes, not hyper's buffer.
    *kept = joined.into();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What hyper hands back: a frozen read buffer, the bytes it parsed advanced past.
    fn hyper_read_buf(unparsed: &[u8]) -> Bytes {
        let mut buf = bytes::BytesMut::with_capacity(8192);
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        buf.advance(buf.len());
        buf.extend_from_slice(unparsed);
        buf.freeze()
    }

    #[test]
    fn nothing_read_ahead_keeps_nothing_of_hypers_buffer() {
        let from_hyper = hyper_read_buf(b"");
        let probe = from_hyper.clone();
        let mut kept = Bytes::new();
        put_back(&mut kept, from_hyper);
        assert!(kept.is_empty());
        assert!(probe.is_unique(), "hyper's buffer is still shared");
    }

    #[test]
    fn bytes_read_ahead_are_copied_out_of_hypers_buffer() {
        let from_hyper = hyper_read_buf(b"GET /next");
        let probe = from_hyper.clone();
        let mut kept = Bytes::new();
        put_back(&mut kept, from_hyper);
        assert_eq!(&kept[..], b"GET /next");
        assert!(probe.is_unique(), "hyper's buffer is still shared");
    }

    #[test]
    fn newer_read_ahead_goes_in_front_of_what_was_left() {
        let mut kept = Bytes::from_static(b" HTTP/1.1\r\n");
        put_back(&mut kept, hyper_read_buf(b"GET /"));
        assert_eq!(&kept[..], b"GET / HTTP/1.1\r\n");
    }
}
