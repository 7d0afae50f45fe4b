//! HTTP/1.1 to a backend, driven inside the request's own task: the request is written
//! and the response read by the future that handles the request, and its body by the
//! client connection's task as it passes the body on. No connection task, no channel
//! between tasks, no wake-up of another task per request (what hyper's client costs),
//! and the request is only borrowed, so a failed attempt leaves it whole for the next.
//! Upgrades (101) hand the connection over as it is. HTTP/2 backends and the client
//! side stay with hyper.

mod body;
mod chunked;
// Public for `benches/upstream_h1.rs`.
#[doc(hidden)]
pub mod head;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use crate::body::{RequestBody, RequestBodyError};
use crate::headers::Forwarded;
use crate::idle_timer::IdleTimer;
use head::RequestFraming;

pub use body::ResponseBody;

/// Bytes read from a backend at a time.
const READ_CHUNK: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the backend closed the connection before it sent a response")]
    Closed,
    #[error("the backend closed the connection before the response ended")]
    Truncated,
    #[error("malformed response head: {0}")]
    Malformed(httparse::Error),
    #[error("response head over {} bytes", head::MAX_HEAD)]
    HeadTooLarge,
    #[error("response head with more than {} fields", head::MAX_HEADERS)]
    TooManyHeaders,
    #[error("bare LF in the response head")]
    BareLf,
    #[error("response status out of range")]
    BadStatus,
    #[error("bad header field in the response")]
    BadHeader,
    #[error("response with both Content-Length and Transfer-Encoding")]
    BothLengths,
    #[error("bad Content-Length in the response")]
    BadContentLength,
    #[error("Transfer-Encoding in an HTTP/1.0 response")]
    TransferEncodingInHttp10,
    #[error("bad chunked body: {0}")]
    BadChunk(&'static str),
    #[error("the request body did not match its Content-Length")]
    BodyLength,
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedUpgrade,
}

/// How sending a request on a connection failed.
#[derive(Debug)]
pub enum SendError {
    /// A reused connection turned out closed before any of the response came back and
    /// before any of the request's body was taken, for an idempotent request: most
    /// likely the backend closed it while it was idle, and the request can go again on
    /// another connection.
    Stale(Error),
    /// The client's request body failed (too large, too slow, client gone).
    Body(RequestBodyError),
    /// The exchange failed after (part of) the request went out.
    Failed(Error),
    /// No response head within the deadline after the request was sent.
    TimedOut,
    /// The backend took none of the request body for the body timeout.
    Stalled,
}

/// A backend connection: TCP, or TLS over it.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => crate::gather::poll_write_gathered(Pin::new(s), cx, bufs),
            Io::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Wakes nothing: a look at an idle connection wants no wake-up.
struct Noop;

impl std::task::Wake for Noop {
    fn wake(self: std::sync::Arc<Self>) {}
}

static NOOP_WAKER: std::sync::LazyLock<std::task::Waker> =
    std::sync::LazyLock::new(|| std::task::Waker::from(std::sync::Arc::new(Noop)));

/// One HTTP/1.1 connection to a backend, between requests.
pub struct Conn {
    io: Io,
    /// What was read beyond the last response; empty on a pooled connection.
    read: BytesMut,
    /// The request head (and chunk framing) being written.
    out: Vec<u8>,
    /// Requests sent on it: a request on a reused connection may meet a close the
    /// backend made while it was idle.
    sent: u32,
    /// Something of the current request's answer came (an informational answer too):
    /// the backend had the request, so a close is no keep-alive race.
    heard: bool,
    /// The response-head deadline, with the thread (`this_thread`) whose runtime made it.
    header_deadline: Option<(u64, Pin<Box<tokio::time::Sleep>>)>,
    /// The field names of the last response.
    names: head::FieldNames,
    /// The TLS client settings it was opened with, `None` over plain TCP: a pool
    /// reuses it only while these are still its settings (see `client::ConnPool`).
    opened_with: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// A request's head as HTTP/1.1 bytes, made once when the request is prepared. The
/// request's fields share the read buffer of the client's connection, which hyper
/// would otherwise have to leave and replace with a new one each time it looks at the
/// connection while the backend answers; and a second attempt (another connection or
/// backend) sends these same bytes.
pub struct EncodedRequest {
    head: Vec<u8>,
    method: http::Method,
    framing: RequestFraming,
    /// The request asks to switch protocols: a 101 is an answer to it.
    upgrade: bool,
    /// The request's own header map, emptied: the response's fields go into it, so
    /// the map hyper parsed the request into serves the answer too, and hyper keeps
    /// it for the connection's next request, instead of a map made and one freed
    /// with every request.
    spare_fields: Option<HeaderMap>,
}

impl EncodedRequest {
    /// `parts` as they go out, with `forwarded`'s fields; `body` as it is before any of
    /// it was read, for the framing.
    pub fn new(
        parts: http::request::Parts,
        forwarded: Option<&Forwarded>,
        body: &RequestBody,
        upgrade: bool,
    ) -> EncodedRequest {
        let framing = RequestFraming::of(
            &parts.headers,
            body.is_end_stream(),
            body.size_hint().exact(),
        );
        let mut head = Vec::with_capacity(ENCODED_HEAD_CAPACITY);
        head::encode_request(&mut head, &parts, forwarded, framing);
        let mut fields = parts.headers;
        fields.clear();
        EncodedRequest {
            head,
            method: parts.method,
            framing,
            upgrade,
            spare_fields: Some(fields),
        }
    }
}

/// Room first made for an encoded request head, in one allocation: most heads fit,
/// and one that does not grows.
const ENCODED_HEAD_CAPACITY: usize = 1024;

/// A number for the calling thread, never reused within the process.
fn this_thread() -> u64 {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static NUMBER: Cell<u64> = const { Cell::new(0) });
    NUMBER.with(|number| {
        if number.get() == 0 {
            number.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        number.get()
    })
}

/// The methods a request may be sent twice with (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The rest of a request whose answer came while its body was still going out.
struct Upload {
    outbox: Outbox,
    body: RequestBody,
}

/// What of a request is still to be written.
struct Outbox {
    /// Written so far of `Conn::out`.
    head_at: usize,
    data: Bytes,
    /// What follows `data`: CRLF in a chunked body.
    after: &'static [u8],
    framing: RequestFraming,
    /// Body bytes taken so far.
    taken: u64,
    body_done: bool,
    /// Runs while the backend takes nothing of what is to be written.
    unwritten_for: IdleTimer,
}

impl Outbox {
    fn pending(&self, conn: &Conn) -> bool {
        self.head_at < conn.out.len() || !self.data.is_empty() || !self.after.is_empty()
    }

    /// A write to the backend is blocked: pending, until the backend has taken nothing
    /// for the body timeout.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        if self.unwritten_for.expired(cx) {
            Poll::Ready(Err(SendError::Stalled))
        } else {
            Poll::Pending
        }
    }
}

impl Conn {
    /// Boxed: a connection moves from the pool into each request's future and its
    /// response body and back, and at the size of a pointer each of those (and every
    /// move of them) is smaller by what a connection holds.
    pub fn new(io: Io, opened_with: Option<std::sync::Arc<rustls::ClientConfig>>) -> Box<Conn> {
        Box::new(Conn {
            io,
            read: BytesMut::new(),
            out: Vec::new(),
            sent: 0,
            heard: false,
            header_deadline: None,
            names: head::FieldNames::default(),
            opened_with,
        })
    }

    /// The TLS client settings it was opened with (`None`: plain TCP).
    pub fn opened_with(&self) -> Option<&std::sync::Arc<rustls::ClientConfig>> {
        self.opened_with.as_ref()
    }

    /// Whether an idle connection can take a request: the backend has neither closed it
    /// nor sent anything unasked. The look costs no system call when nothing arrived
    /// (tokio keeps the socket's readiness), and registers no wake-up.
    pub fn is_usable(&mut self) -> bool {
        match &mut self.io {
            // `try_read` looks at that readiness before it reads: no waker to store and
            // no buffer to reserve on every checkout. A byte read means the connection
            // goes, so one byte of room is enough.
            Io::Plain(stream) => matches!(
                stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
            Io::Tls(_) => {
                let mut cx = Context::from_waker(&NOOP_WAKER);
                poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.read).is_pending()
            }
        }
    }

    /// Sends the request and reads the response head; the connection moves into the
    /// response body, which gives it back when the body ended clean. `header_timeout`
    /// runs from when the whole request went out.
    pub async fn send(
        mut self: Box<Self>,
        request: &mut EncodedRequest,
        body: &mut RequestBody,
        header_timeout: Duration,
        body_timeout: Duration,
    ) -> Result<(http::response::Parts, ResponseBody), SendError> {
        let framing = request.framing;
        self.out.clear();
        self.out.extend_from_slice(&request.head);
        let reused = self.sent > 0;
        self.sent += 1;
        self.heard = false;
        let mut outbox = Outbox {
            head_at: 0,
            data: Bytes::new(),
            after: b"",
            framing,
            taken: 0,
            body_done: framing == RequestFraming::Empty,
            unwritten_for: IdleTimer::new(body_timeout),
        };
        let (method, fields) = (&request.method, &mut request.spare_fields);
        // While the body goes out the backend may already answer (a 413, a redirect, a
        // full-duplex app): the head is read alongside, and the rest of the body then
        // goes out as the response body is read (`ResponseBody`).
        let early = std::future::poll_fn(|cx| {
            if outbox.framing != RequestFraming::Empty {
                if let Poll::Ready(head) = self.poll_head(cx, method, fields) {
                    return Poll::Ready(Ok(Some(head)));
                }
            }
            self.poll_write_request(cx, &mut outbox, body)
                .map_ok(|()| None)
        })
        .await;
        let answered = match early {
            Ok(Some(head)) => head,
            Ok(None) => {
                let deadline = tokio::time::Instant::now() + header_timeout;
                let until =
                    std::future::poll_fn(|cx| self.poll_head_until(cx, method, fields, deadline));
                match until.await {
                    Some(head) => head,
                    None => return Err(SendError::TimedOut),
                }
            }
            Err(SendError::Failed(error)) => {
                return Err(self.failed(error, reused, method, &outbox))
            }
            Err(other) => return Err(other),
        };
        let head = answered.map_err(|error| self.failed(error, reused, method, &outbox))?;
        if head.body == head::BodyKind::Upgrade && !request.upgrade {
            return Err(SendError::Failed(Error::UnaskedUpgrade));
        }
        let upload = (!outbox.body_done || outbox.pending(&self)).then(|| {
            Box::new(Upload {
                outbox,
                body: std::mem::replace(body, RequestBody::empty()),
            })
        });
        // A connection whose request was still going out when the answer came is not
        // reused: where its request ends is the backend's guess.
        let keep_alive = head.keep_alive && upload.is_none();
        Ok((
            head.parts,
            ResponseBody::new(self, head.body, keep_alive, upload),
        ))
    }

    /// `error` as a stale connection when it can only be one.
    fn failed(
        &self,
        error: Error,
        reused: bool,
        method: &http::Method,
        outbox: &Outbox,
    ) -> SendError {
        let closed = match &error {
            Error::Closed => true,
            Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        };
        if reused
            && closed
            && !self.heard
            && outbox.taken == 0
            && self.read.is_empty()
            && is_idempotent(method)
        {
            SendError::Stale(error)
        } else {
            SendError::Failed(error)
        }
    }

    /// `poll_head`, or `None` once `deadline` has passed. The deadline is kept on the
    /// connection's own sleep, which only moves when it fires before the deadline of
    /// the request now waiting (it was armed for an earlier one): an answer that comes
    /// in time, as nearly all do, costs no timer set and cancelled.
    fn poll_head_until(
        &mut self,
        cx: &mut Context<'_>,
        method: &http::Method,
        fields: &mut Option<HeaderMap>,
        deadline: tokio::time::Instant,
    ) -> Poll<Option<Result<head::Head, Error>>> {
        if let Poll::Ready(head) = self.poll_head(cx, method, fields) {
            return Poll::Ready(Some(head));
        }
        let thread = this_thread();
        let sleep = match &mut self.header_deadline {
            // A sleep belongs to the runtime that made it, and a pooled connection may
            // be taken by another worker's thread.
            Some((made_on, sleep)) if *made_on == thread => {
                if sleep.deadline() > deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            slot => {
                let (_, sleep) =
                    slot.insert((thread, Box::pin(tokio::time::sleep_until(deadline))));
                sleep
            }
        };
        while sleep.as_mut().poll(cx).is_ready() {
            if sleep.deadline() >= deadline {
                return Poll::Ready(None);
            }
            sleep.as_mut().reset(deadline);
        }
        Poll::Pending
    }

    /// `fields`: an empty map for the response's fields, if there is one to reuse.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &http::Method,
        fields: &mut Option<HeaderMap>,
    ) -> Poll<Result<head::Head, Error>> {
        loop {
            if !self.read.is_empty() {
                let parsed =
                    head::parse_response_into(&mut self.read, method, fields, &mut self.names)?;
                if let Some(head) = parsed {
                    return Poll::Ready(Ok(head));
                }
            }
            let had = self.read.len();
            self.read.reserve(READ_CHUNK);
            if ready!(poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read))? == 0 {
                return Poll::Ready(Err(if had == 0 {
                    Error::Closed
                } else {
                    Error::Truncated
                }));
            }
            self.heard = true;
        }
    }

    /// Writes the head, then the body as it comes, framed as `outbox.framing` says.
    fn poll_write_request(
        &mut self,
        cx: &mut Context<'_>,
        outbox: &mut Outbox,
        body: &mut RequestBody,
    ) -> Poll<Result<(), SendError>> {
        loop {
            while outbox.pending(self) {
                let slices = [
                    io::IoSlice::new(&self.out[outbox.head_at..]),
                    io::IoSlice::new(&outbox.data),
                    io::IoSlice::new(outbox.after),
                ];
                let written = match Pin::new(&mut self.io).poll_write_vectored(cx, &slices) {
                    Poll::Ready(written) => written.map_err(|e| SendError::Failed(e.into()))?,
                    Poll::Pending => return outbox.blocked(cx),
                };
                outbox.unwritten_for.progress();
                if written == 0 {
                    return Poll::Ready(Err(SendError::Failed(
                        io::Error::from(io::ErrorKind::WriteZero).into(),
                    )));
                }
                let mut left = written;
                let head_left = self.out.len() - outbox.head_at;
                let step = left.min(head_left);
                outbox.head_at += step;
                left -= step;
                let step = left.min(outbox.data.len());
                outbox.data.advance(step);
                left -= step;
                outbox.after = &outbox.after[left.min(outbox.after.len())..];
            }
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(flushed) => flushed.map_err(|e| SendError::Failed(e.into()))?,
                Poll::Pending => return outbox.blocked(cx),
            }
            if outbox.body_done {
                return Poll::Ready(Ok(()));
            }
            self.out.clear();
            outbox.head_at = 0;
            match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                None => {
                    outbox.body_done = true;
                    match outbox.framing {
                        RequestFraming::Chunked => self.out.extend_from_slice(b"0\r\n\r\n"),
                        RequestFraming::Length { length, .. } if length != outbox.taken => {
                            return Poll::Ready(Err(SendError::Failed(Error::BodyLength)))
                        }
                        _ => {}
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(SendError::Body(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        outbox.taken += data.len() as u64;
                        match outbox.framing {
                            RequestFraming::Length { length, .. } if outbox.taken > length => {
                                return Poll::Ready(Err(SendError::Failed(Error::BodyLength)))
                            }
                            RequestFraming::Chunked => {
                                use std::io::Write as _;
                                // Writing to a Vec cannot fail.
                                let _ = write!(self.out, "{:x}\r\n", data.len());
                                outbox.after = b"\r\n";
                            }
                            _ => {}
                        }
                        outbox.data = data;
                    }
                    Err(frame) => {
                        // Trailers end the body; only chunked coding can carry them.
                        if let (RequestFraming::Chunked, Ok(trailers)) =
                            (outbox.framing, frame.into_trailers())
                        {
                            self.out.extend_from_slice(b"0\r\n");
                            head::encode_fields(&mut self.out, &trailers);
                            self.out.extend_from_slice(b"\r\n");
                            outbox.framing = RequestFraming::Empty;
                        }
                    }
                },
            }
        }
    }

    /// Reads more of the response into the buffer; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(READ_CHUNK);
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }

    fn into_upgraded(self) -> (Io, BytesMut) {
        (self.io, self.read)
    }
}
