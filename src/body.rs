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
        }
    }

    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            remaining: 0,
            on_end: None,
            stall: None,
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
                }
                if let Some(stall) = &mut this.stall {
                    stall.clock.progress();
                }
                if inner.is_end_stream() {
                    this.ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ended();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
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
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// What the client receives: an upstream response streamed through, or a short body the
/// proxy made itself (errors, rejections). `E` hears how the upstream body went (see
/// `Ending`): the forwarding code decides what that means for its connection.
pub enum ProxyBody<E> {
    Upstream {
        inner: Incoming,
        /// Until the body ends; a bodiless answer keeps it (already told) until hyper
        /// drops the body, so whatever it holds lasts as long.
        ending: Option<E>,
    },
    Full(Option<Bytes>),
}

/// Told, as an upstream response body is passed on, how it goes.
pub trait Ending {
    /// A data frame of `bytes` was passed on.
    fn passed(&mut self, bytes: u64);
    /// The body was passed on whole.
    fn ended(&mut self);
    /// The upstream broke off in the middle of the body.
    fn broken(&mut self);
}

impl<E: Ending> ProxyBody<E> {
    pub fn upstream(inner: Incoming, mut ending: E) -> ProxyBody<E> {
        if inner.is_end_stream() {
            // HEAD, 204, 304: hyper may never poll an empty body, so it ends now.
            ending.ended();
        }
        ProxyBody::Upstream {
            inner,
            ending: Some(ending),
        }
    }
}

impl<E> ProxyBody<E> {
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Upstream { inner, ending } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(mut ending) = ending.take() {
                            ending.ended();
                        }
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(ending), Some(data)) = (ending.as_mut(), frame.data_ref()) {
                            ending.passed(data.len() as u64);
                        }
                        if inner.is_end_stream() {
                            if let Some(mut ending) = ending.take() {
                                ending.ended();
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
