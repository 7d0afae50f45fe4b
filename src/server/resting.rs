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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::client_io::SendTimeout;

/// What the socket, the service and the driver tell each other about one connection.
#[derive(Default)]
pub(super) struct IdleSignal {
    /// Requests handed to the proxy whose response body hyper has not dropped yet.
    open_responses: AtomicU32,
    /// Requests handed to the proxy so far (wrapping): whether any came between two looks.
    requests: AtomicU32,
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
        self.requests.fetch_add(1, Ordering::Relaxed);
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

    fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// What the driver of a hyper connection does next about idleness.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Wait,
    /// Idle for `release_after`: shut hyper down and take the socket back.
    Release,
    /// A request head begun before the release is not whole `head_timeout` after hyper
    /// started waiting for it: close the connection.
    HeadTimedOut,
}

enum Phase {
    /// Not seen idle since this hyper connection started (or it is serving).
    Unarmed,
    /// Seen idle when the sleep was armed, with `requests` handed on by then.
    Resting { requests: u32 },
    /// Released, and hyper still waits for a head (a hyper connection that has not
    /// finished a request yet finishes the one it reads before it stops): the
    /// connection is closed at the sleep's deadline unless that request starts.
    Heading { requests: u32 },
    /// A request started after the release: hyper ends the connection after it.
    Finishing,
}

/// When to give an idle hyper connection up, and when a request head has taken too
/// long; it replaces hyper's header-read timer. One sleep for the whole client
/// connection, re-armed at most once per `release_after` however many requests it
/// carries: a busy keep-alive client costs no timer per request (hyper's timer was
/// set and cancelled for every head, and the release timer reset after every answer).
pub(super) struct IdleWatch {
    release_after: Duration,
    head_timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    phase: Phase,
}

impl IdleWatch {
    pub(super) fn new(release_after: Duration, head_timeout: Duration) -> IdleWatch {
        IdleWatch {
            release_after,
            head_timeout,
            sleep: None,
            phase: Phase::Unarmed,
        }
    }

    /// A new hyper connection starts on the socket.
    pub(super) fn start_run(&mut self) {
        self.phase = Phase::Unarmed;
    }

    /// The socket idles with no hyper connection: the sleep is re-armed for `timeout`
    /// from now (the keep-alive wait, or a stopping server's grace), in place of
    /// whatever it was armed for.
    pub(super) fn wait_idle(&mut self, timeout: Duration) {
        self.arm(tokio::time::Instant::now() + timeout);
    }

    /// The wait `wait_idle` armed has run out; registers `cx` until it does.
    pub(super) fn idle_elapsed(&mut self, cx: &mut Context<'_>) -> bool {
        self.elapsed(cx)
    }

    /// Looked at each time hyper returns `Pending`; registers `cx` for the next deadline.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>, signal: &IdleSignal) -> Verdict {
        loop {
            match self.phase {
                Phase::Unarmed => {
                    if !signal.hyper_is_idle() {
                        return Verdict::Wait;
                    }
                    self.arm(tokio::time::Instant::now() + self.release_after);
                    self.phase = Phase::Resting {
                        requests: signal.requests(),
                    };
                }
                Phase::Resting { requests } => {
                    // Busy again: the sleep stays armed, and what it finds when it is
                    // next looked at idle tells whether the client was idle throughout.
                    if !signal.hyper_is_idle() || !self.elapsed(cx) {
                        return Verdict::Wait;
                    }
                    if signal.requests() != requests {
                        // Requests came and went meanwhile: this idle spell began later.
                        self.phase = Phase::Unarmed;
                        continue;
                    }
                    let idle_since = self.deadline() - self.release_after;
                    self.arm(idle_since + self.head_timeout);
                    self.phase = Phase::Heading { requests };
                    return Verdict::Release;
                }
                Phase::Heading { requests } => {
                    if signal.requests() != requests {
                        self.phase = Phase::Finishing;
                        return Verdict::Wait;
                    }
                    return if self.elapsed(cx) {
                        Verdict::HeadTimedOut
                    } else {
                        Verdict::Wait
                    };
                }
                Phase::Finishing => return Verdict::Wait,
            }
        }
    }

    fn arm(&mut self, deadline: tokio::time::Instant) {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.sleep
            .as_ref()
            .map_or_else(tokio::time::Instant::now, |sleep| sleep.deadline())
    }

    fn elapsed(&mut self, cx: &mut Context<'_>) -> bool {
        self.sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
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

    /// Ready once the client has sent something (or closed); reads nothing, so it
    /// needs no buffer.
    pub(super) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.get_ref().poll_read_ready(cx)
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

    const REST: Duration = Duration::from_millis(50);
    const HEAD: Duration = Duration::from_millis(300);

    fn look(watch: &mut IdleWatch, signal: &IdleSignal) -> Verdict {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        watch.poll(&mut cx, signal)
    }

    /// hyper waiting for a head, with every answer written.
    fn idle() -> Arc<IdleSignal> {
        let signal = Arc::new(IdleSignal::default());
        signal.read_parked.store(true, Ordering::Relaxed);
        signal
    }

    /// One request from start to end, as the service and hyper report it.
    fn serve_one(signal: &Arc<IdleSignal>) {
        signal.read_parked.store(false, Ordering::Relaxed);
        drop(signal.open());
        signal.read_parked.store(true, Ordering::Relaxed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_released_after_the_rest_time() {
        let signal = idle();
        let mut watch = IdleWatch::new(REST, HEAD);
        assert_eq!(look(&mut watch, &signal), Verdict::Wait);
        tokio::time::advance(REST - Duration::from_millis(1)).await;
        assert_eq!(look(&mut watch, &signal), Verdict::Wait);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(look(&mut watch, &signal), Verdict::Release);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_client_keeps_its_hyper_connection() {
        let signal = idle();
        let mut watch = IdleWatch::new(REST, HEAD);
        for _ in 0..100 {
            assert_eq!(look(&mut watch, &signal), Verdict::Wait);
            serve_one(&signal);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        // Idle from the last request on: released within two rest times of it.
        let mut waited = Duration::ZERO;
        while look(&mut watch, &signal) == Verdict::Wait {
            tokio::time::advance(Duration::from_millis(5)).await;
            waited += Duration::from_millis(5);
        }
        assert!(
            waited >= REST - Duration::from_millis(10) && waited <= 2 * REST,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_an_answer_outstanding_is_not_idle() {
        let signal = idle();
        let mut watch = IdleWatch::new(REST, HEAD);
        let open = signal.open();
        tokio::time::advance(10 * REST).await;
        assert_eq!(look(&mut watch, &signal), Verdict::Wait);
        drop(open);
        signal.write_blocked.store(true, Ordering::Relaxed);
        tokio::time::advance(10 * REST).await;
        assert_eq!(look(&mut watch, &signal), Verdict::Wait);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_unfinished_after_the_release_times_out_from_when_idle_began() {
        let signal = idle();
        let mut watch = IdleWatch::new(REST, HEAD);
        assert_eq!(look(&mut watch, &signal), Verdict::Wait);
        tokio::time::advance(REST).await;
        assert_eq!(look(&mut watch, &signal), Verdict::Release);
        tokio::time::advance(HEAD - REST - Duration::from_millis(1)).await;
        assert_eq!(look(&mut watch, &signal), Verdict::Wait);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(look(&mut watch, &signal), Verdict::HeadTimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_finished_after_the_release_is_served_to_the_end() {
        let signal = idle();
        let mut watch = IdleWatch::new(REST, HEAD);
        look(&mut watch, &signal);
        tokio::time::advance(REST).await;
        assert_eq!(look(&mut watch, &signal), Verdict::Release);
        let _open = signal.open();
        tokio::time::advance(10 * HEAD).await;
        assert_eq!(look(&mut watch, &signal), Verdict::Wait);
        // The next hyper connection starts afresh.
        watch.start_run();
        drop(_open);
        assert_eq!(look(&mut watch, &signal), Verdict::Wait);
        tokio::time::advance(REST).await;
        assert_eq!(look(&mut watch, &signal), Verdict::Release);
    }

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
