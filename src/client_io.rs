//! The client connection's socket with a send timeout: when the client stops taking
//! the response (its receive window and the socket buffer are full) for
//! `send_timeout`, the write fails and hyper closes the connection, which releases the
//! request's in-flight count and its upstream connection. The clock only runs while a
//! write is blocked: a client that keeps reading costs no timer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::idle_timer::IdleTimer;

pub struct SendTimeout<S> {
    inner: S,
    clock: IdleTimer,
    timed_out: IntCounter,
}

impl<S> SendTimeout<S> {
    pub fn new(inner: S, timeout: Duration, timed_out: IntCounter) -> SendTimeout<S> {
        SendTimeout {
            inner,
            clock: IdleTimer::new(timeout),
            timed_out,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// What a write that returned `polled` means, with the clock applied.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.clock.progress();
            return polled;
        }
        if !self.clock.expired(cx) {
            return Poll::Pending;
        }
        self.timed_out.inc();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took nothing of the response for {:?} (send_timeout)",
                self.clock.timeout()
            ),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, polled)
    }
}
