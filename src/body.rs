//! Body types of the request path. Both stream frame by frame, so hyper's flow control
//! gives backpressure end to end and no body is ever held whole in memory. They are
//! concrete types, not boxed, to spare an allocation per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;

use std::time::Duration;

use prometheus::IntCounter;

use crate::idle_timer::IdleTimer;

/// The client's request body on its way upstream, cut off at `max_request_body`, and
/// at `client_body_timeout` when the client stops sending it.
pub struct RequestBody {
    inner: Option<Incoming>,
    remaining: u64,
    on_end: Option<oneshot::Sender<()>>,
    stall: Option<Stall>,
    /// A copy being taken as the body streams past (a mirrored request's).
    tee: Option<Box<Tee>>,
    /// A body known whole (a mirrored copy's), sent as one frame. Boxed: every
    /// request's body carries the field, few ever use it.
    fixed: Option<Box<Bytes>>,
}

/// How taking a copy of a body ended.
pub enum TeeEnd {
    /// The whole body, as it was sent.
    Whole(Bytes),
    /// It grew past the copy's limit: no copy.
    TooLarge,
    /// The client's body failed or stopped: no copy.
    Broken,
}

/// Keeps the frames of a body (cheap: `Bytes` are shared, not copied) up to `limit`
/// bytes, and hands them over once when the body ends.
pub struct Tee {
    chunks: Vec<Bytes>,
    kept: u64,
    limit: u64,
    done: Option<Box<dyn FnOnce(TeeEnd) + Send>>,
}

impl Tee {
    pub fn new(limit: u64, done: Box<dyn FnOnce(TeeEnd) + Send>) -> Tee {
        Tee {
            chunks: Vec::new(),
            kept: 0,
            limit,
            done: Some(done),
        }
    }

    fn keep(&mut self, data: &Bytes) {
        if self.done.is_none() {
            return;
        }
        self.kept += data.len() as u64;
        if self.kept > self.limit {
            self.chunks = Vec::new();
            self.finish(TeeEnd::TooLarge);
        } else if !data.is_empty() {
            self.chunks.push(data.clone());
        }
    }

    fn whole(&mut self) {
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut joined = Vec::with_capacity(self.kept as usize);
                for chunk in self.chunks.drain(..) {
                    joined.extend_from_slice(&chunk);
                }
                Bytes::from(joined)
            }
        };
        self.finish(TeeEnd::Whole(body));
    }

    fn finish(&mut self, end: TeeEnd) {
        if let Some(done) = self.done.take() {
            done(end);
        }
    }
}

impl Drop for Tee {
    /// A body dropped before its end (the exchange failed, the client went away).
    fn drop(&mut self) {
        self.finish(TeeEnd::Broken);
    }
}

/// `client_body_timeout` for one body, and what to count when it fires.
struct Stall {
    clock: IdleTimer,
    timed_out: IntCounter,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error(
        "request body is larger than max_request_body (a frame of {0} bytes passed the limit)"
    )]
    TooLarge(u64),
    #[error("reading the client's request body failed: {0}")]
    Client(#[from] hyper::Error),
    #[error("the client sent nothing of its request body for {0:?} (client_body_timeout)")]
    TimedOut(Duration),
}

impl RequestBody {
    /// `timed_out` is counted when `idle_timeout` passes with nothing from the client.
    pub fn new(
        inner: Incoming,
        limit: Option<u64>,
        idle_timeout: Duration,
        timed_out: &IntCounter,
    ) -> RequestBody {
        // A bodiless request (most of them) gets no clock at all.
        let stall = (!inner.is_end_stream()).then(|| Stall {
            clock: IdleTimer::new(idle_timeout),
            timed_out: timed_out.clone(),
        });
        RequestBody {
            inner: Some(inner),
            remaining: limit.unwrap_or(u64::MAX),
            on_end: None,
            stall,
            tee: None,
            fixed: None,
        }
    }

    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            remaining: 0,
            on_end: None,
            stall: None,
            tee: None,
            fixed: None,
        }
    }

    /// A body known whole.
    pub fn fixed(bytes: Bytes) -> RequestBody {
        RequestBody {
            fixed: (!bytes.is_empty()).then(|| Box::new(bytes)),
            ..RequestBody::empty()
        }
    }

    /// Takes a copy of the body as it streams past; a body with nothing to stream is
    /// handed over whole at once.
    pub fn tee(&mut self, mut tee: Tee) {
        if self.is_end_stream() {
            tee.whole();
        } else {
            self.tee = Some(Box::new(tee));
        }
    }

    /// A receiver that completes once the whole body has been read (or reading it
    /// failed); `None` when there is no body to wait for. The upstream's response time
    /// is measured from there, so a long upload is not mistaken for a slow backend.
    pub fn notify_end(&mut self) -> Option<oneshot::Receiver<()>> {
        if self.is_end_stream() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.on_end = Some(tx);
        Some(rx)
    }

    fn ended(&mut self) {
        if let Some(tx) = self.on_end.take() {
            let _ = tx.send(());
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            if let Some(bytes) = this.fixed.take() {
                return Poll::Ready(Some(Ok(Frame::data(*bytes))));
            }
            this.ended();
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.inner = None;
                        this.ended();
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge(len))));
                    }
                    this.remaining -= len;
                    if let Some(tee) = &mut this.tee {
                        tee.keep(data);
                    }
                }
                if let Some(stall) = &mut this.stall {
                    stall.clock.progress();
                }
                if inner.is_end_stream() {
                    if let Some(mut tee) = this.tee.take() {
                        tee.whole();
                    }
                    this.ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ended();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                if let Some(mut tee) = this.tee.take() {
                    tee.whole();
                }
                this.ended();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(stall) = &mut this.stall else {
                    return Poll::Pending;
                };
                if !stall.clock.expired(cx) {
                    return Poll::Pending;
                }
                stall.timed_out.inc();
                let timeout = stall.clock.timeout();
                this.inner = None;
                this.ended();
                Poll::Ready(Some(Err(RequestBodyError::TimedOut(timeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.fixed.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => SizeHint::with_exact(self.fixed.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// What the client receives: an upstream response streamed through, or a short body the
/// proxy made itself (errors, rejections). `E` hears how the upstream body went (see
/// `Ending`): the forwarding code decides what that means for its connection.
pub enum ProxyBody<E: Ending> {
    Upstream {
        inner: E::Body,
        /// Until the body ends; a bodiless answer keeps it (already told) until hyper
        /// drops the body, so whatever it holds lasts as long.
        ending: Option<E>,
        /// Runs while the client's side waits for more of the body and the backend
        /// sends none (`upstream_body_timeout`). It cannot blame the backend for a slow
        /// client: the body is polled only when the client side can take more.
        waiting: IdleTimer,
    },
    Full(Option<Bytes>),
}

/// Told, as an upstream response body is passed on, how it goes.
pub trait Ending {
    /// The upstream body it hears about.
    type Body: Body<Data = Bytes> + Unpin;
    /// A data frame of `bytes` was passed on.
    fn passed(&mut self, bytes: u64);
    /// The body was passed on whole; `body` is what is left of it (its connection).
    fn ended(&mut self, body: &mut Self::Body);
    /// The upstream broke off in the middle of the body.
    fn broken(&mut self);
    /// The upstream sent nothing for `waited`: the body is given up, with this error.
    fn stalled(&mut self, waited: Duration) -> <Self::Body as Body>::Error;
    /// The request body is still going out with `body`: a response that waits for it
    /// waits on the client, not on the backend.
    fn still_sending(&self, _body: &Self::Body) -> bool {
        false
    }
}

impl<E: Ending> ProxyBody<E> {
    pub fn upstream(mut inner: E::Body, mut ending: E, body_timeout: Duration) -> ProxyBody<E> {
        if inner.is_end_stream() {
            // HEAD, 204, 304: hyper may never poll an empty body, so it ends now.
            ending.ended(&mut inner);
        }
        ProxyBody::Upstream {
            inner,
            ending: Some(ending),
            waiting: IdleTimer::new(body_timeout),
        }
    }

    pub fn text(text: &'static str) -> ProxyBody<E> {
        ProxyBody::Full(Some(Bytes::from_static(text.as_bytes())))
    }

    pub fn empty() -> ProxyBody<E> {
        ProxyBody::Full(None)
    }

    /// The ending of an upstream body not yet ended or dropped; `None` for the proxy's
    /// own bodies.
    pub fn ending_mut(&mut self) -> Option<&mut E> {
        match self {
            ProxyBody::Upstream { ending, .. } => ending.as_mut(),
            ProxyBody::Full(_) => None,
        }
    }
}

impl<E: Ending + Unpin> Body for ProxyBody<E> {
    type Data = Bytes;
    type Error = <E::Body as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Upstream {
                inner,
                ending,
                waiting,
            } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                if polled.is_pending() {
                    if ending.as_ref().is_some_and(|e| e.still_sending(inner)) {
                        waiting.progress();
                        return Poll::Pending;
                    }
                    if !waiting.expired(cx) {
                        return Poll::Pending;
                    }
                    return match ending.take() {
                        Some(mut ending) => {
                            Poll::Ready(Some(Err(ending.stalled(waiting.timeout()))))
                        }
                        None => Poll::Pending,
                    };
                }
                waiting.progress();
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(mut ending) = ending.take() {
                            ending.ended(inner);
                        }
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(ending), Some(data)) = (ending.as_mut(), frame.data_ref()) {
                            ending.passed(data.len() as u64);
                        }
                        if inner.is_end_stream() {
                            if let Some(mut ending) = ending.take() {
                                ending.ended(inner);
                            }
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(mut ending) = ending.take() {
                            ending.broken();
                        }
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(data) => data.is_none(),
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
