//! One client connection once accepted: the hyper builders for each protocol, the
//! service that hands requests to the proxy, HTTP/2 stream accounting (idle time,
//! rapid-reset floods), the first-request deadline and the HTTPS redirect.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::watch;

use std::future::Future;

use super::resting::{IdleSignal, IdleWatch, OpenResponse, RestingIo, Verdict};
use crate::client_io::SendTimeout;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ResponseBody};

/// The three ways a client connection is served: both HTTP versions by detection
/// (plain port with h2c on), or exactly one (chosen by ALPN on TLS; HTTP/1.1 on a plain
/// port without h2c).
pub(super) struct Builders {
    auto: auto::Builder<TokioExecutor>,
    http1: hyper::server::conn::http1::Builder,
    /// `http1` without hyper's header-read timer, for plain connections, whose driver
    /// keeps that deadline itself (`IdleWatch`).
    plain_http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    http2_idle_timeout: Duration,
    /// A connection with no request started by then is closed (`client_header_timeout`):
    /// it covers what hyper's header timer does not, protocol detection (h2c) and an
    /// HTTP/2 client that never opens a stream.
    first_request_timeout: Duration,
    send_timeout: Duration,
}

#[derive(Clone, Copy)]
pub(super) enum Served {
    Detect,
    Http1,
    Http2,
}

impl Builders {
    pub(super) fn new(settings: &crate::config::ProxyConfig) -> Builders {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.client_header_timeout)
            .max_buf_size(settings.max_header_size.max(8192))
            .keep_alive(true);
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(settings.client_header_timeout)
            .max_buf_size(settings.max_header_size.max(8192))
            .keep_alive(true);
        let mut plain_http1 = http1.clone();
        plain_http1.header_read_timeout(None);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        macro_rules! http2_settings {
            ($builder:expr) => {
                $builder
                    .timer(TokioTimer::new())
                    .max_header_list_size(settings.max_header_size as u32)
                    .max_concurrent_streams(settings.http2_max_concurrent_streams)
                    // Streams the client resets before the proxy has even seen them, and
                    // streams the proxy had to reset for protocol errors: past these the
                    // connection is closed (h2's defenses against reset floods).
                    .max_pending_accept_reset_streams(Some(20))
                    .max_local_error_reset_streams(Some(256))
                    // Idle HTTP/2 connections are pinged and closed when the peer is
                    // gone, the counterpart of the HTTP/1 header-read timer.
                    .keep_alive_interval(settings.client_header_timeout)
                    .keep_alive_timeout(Duration::from_secs(20))
            };
        }
        http2_settings!(auto.http2());
        http2_settings!(http2);
        Builders {
            auto,
            http1,
            plain_http1,
            http2,
            http2_idle_timeout: settings.http2_idle_timeout,
            first_request_timeout: settings.client_header_timeout,
            send_timeout: settings.send_timeout,
        }
    }
}

/// One client connection after accept (and TLS handshake).
pub(super) struct Connection {
    pub(super) proxy: Arc<Proxy>,
    pub(super) peer: SocketAddr,
    pub(super) tls: bool,
    pub(super) redirect_to_port: Option<u16>,
    pub(super) metrics: Arc<Metrics>,
}

/// A client that cancels at least this many streams before their answer, and more
/// than half of all it opened, is closed (Envoy's premature-reset rule): each
/// cancelled stream may have cost an upstream request.
const RESET_FLOOD_MIN_CANCELLED: u32 = 200;

#[derive(Default)]
struct StreamCounts {
    opened: AtomicU32,
    cancelled: AtomicU32,
    flood: tokio::sync::Notify,
    /// HTTP/2 streams whose answer has not been passed on whole yet.
    active: AtomicU32,
    /// When `active` last fell to zero (or the connection opened), in `clock_ms`.
    idle_since: AtomicU64,
    /// A request (HTTP/1) or stream (HTTP/2) has reached the proxy on this connection.
    started: AtomicBool,
    /// The server is stopping (or handing over): HTTP/1 answers carry
    /// `Connection: close`, so the client closes, never the proxy under its request.
    closing: AtomicBool,
}

/// How long a stopping server leaves an idle HTTP/1 connection open for the client to
/// send its next request (answered with `Connection: close`). Closing a keep-alive
/// connection races with a request the client may be sending on it; after this long
/// idle, that is as unlikely as for any other server closing an idle connection.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long hyper waits idle for the next request before it is given up: a busy
/// keep-alive client (the next request within milliseconds) keeps its hyper connection,
/// which costs a timer reset per request where starting hyper again would cost its
/// buffers and dispatcher (+15% CPU per request under wrk, measured with ab.sh, when
/// given up at once). 50 ms rather than 200: the same CPU under wrk (ab.sh B/A 1.006),
/// and fewer connections holding hyper's 16 KiB at any moment (3,000 opened back to
/// back by benches/idle_conns.py: 2.8 KB of RSS per idle connection instead of 5.2).
const RELEASE_AFTER_IDLE: Duration = Duration::from_millis(50);

/// Milliseconds on a process-wide monotonic clock, cheap enough to read per stream.
fn clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// One HTTP/2 stream in progress, from its request to the end (or drop) of its
/// response body: while any is, the connection is not idle.
struct ActiveStream(Arc<StreamCounts>);

impl ActiveStream {
    fn start(counts: Arc<StreamCounts>) -> ActiveStream {
        counts.active.fetch_add(1, Ordering::Relaxed);
        ActiveStream(counts)
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle_since.store(clock_ms(), Ordering::Relaxed);
        }
    }
}

/// The response body as the client connection sees it: the proxy's, plus the stream's
/// activity mark, released when hyper drops the body.
struct ClientBody {
    inner: ResponseBody,
    _active: Option<ActiveStream>,
    _open: Option<OpenResponse>,
}

impl http_body::Body for ClientBody {
    type Data = bytes::Bytes;
    type Error = <ResponseBody as http_body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Returns once the connection has carried HTTP/2 and had no stream in progress for
/// `timeout`: HTTP/2 has no header-read timer to close an idle connection, and a
/// client that answers pings could otherwise hold its connection slot forever.
async fn idle_for(counts: &StreamCounts, timeout: Duration, http2: bool) {
    let timeout_ms = timeout.as_millis() as u64;
    loop {
        let idle_since = counts.idle_since.load(Ordering::Relaxed);
        let due = idle_since + timeout_ms;
        let now = clock_ms();
        if now < due {
            tokio::time::sleep(Duration::from_millis(due - now)).await;
            continue;
        }
        let carried_http2 = http2 || counts.opened.load(Ordering::Relaxed) > 0;
        if carried_http2 && counts.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        // Busy, or HTTP/1 (its own timer applies): look again a timeout later.
        tokio::time::sleep(timeout).await;
    }
}

/// Counts an HTTP/2 stream as cancelled unless it is disarmed (the answer was ready).
struct CancelGuard(Option<Arc<StreamCounts>>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(counts) = self.0.take() {
            let cancelled = counts.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
            let opened = counts.opened.load(Ordering::Relaxed);
            if cancelled >= RESET_FLOOD_MIN_CANCELLED && cancelled * 2 > opened {
                counts.flood.notify_one();
            }
        }
    }
}

impl Connection {
    pub(super) async fn serve<S>(
        self,
        builders: &Builders,
        served: Served,
        stream: S,
        stop: watch::Receiver<bool>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let counts = Arc::new(StreamCounts::default());
        counts.idle_since.store(clock_ms(), Ordering::Relaxed);
        let metrics = Arc::clone(&self.metrics);
        let service = service(Arc::new(self), Arc::clone(&counts), None);
        let io = TokioIo::new(SendTimeout::new(
            stream,
            builders.send_timeout,
            metrics.send_timeouts.clone(),
        ));
        // One driver for three connection types that share no trait with a
        // `graceful_shutdown` method.
        macro_rules! drive_to_end {
            ($conn:expr) => {
                drive(
                    $conn,
                    |c| c.graceful_shutdown(),
                    stop,
                    Deadlines {
                        counts: &counts,
                        idle_timeout: builders.http2_idle_timeout,
                        http2: matches!(served, Served::Http2),
                        first_request_timeout: builders.first_request_timeout,
                    },
                    &metrics,
                    peer,
                )
                .await
                .map_err(|e| {
                    if e.is_header_timeout() {
                        metrics.client_header_timeouts.inc();
                    }
                    e.to_string()
                })
            };
        }
        let ended = match served {
            Served::Detect => {
                drive_to_end!(builders.auto.serve_connection_with_upgrades(io, service))
            }
            Served::Http1 => {
                drive_to_end!(builders.http1.serve_connection(io, service).with_upgrades())
            }
            Served::Http2 => drive_to_end!(builders.http2.serve_connection(io, service)),
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, "client connection ended: {e}");
        }
    }
}

/// hyper's header-read timer cut a request head off (TLS and h2c connections; plain
/// ones keep that deadline in `IdleWatch`).
trait HeaderTimeout {
    fn is_header_timeout(&self) -> bool;
}

impl HeaderTimeout for hyper::Error {
    fn is_header_timeout(&self) -> bool {
        self.is_timeout()
    }
}

impl HeaderTimeout for Box<dyn std::error::Error + Send + Sync> {
    fn is_header_timeout(&self) -> bool {
        self.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
    }
}

/// Hands each request to the proxy. `signal` counts HTTP/1 requests open, for a
/// connection that gives hyper up between requests.
fn service(
    this: Arc<Connection>,
    counts: Arc<StreamCounts>,
    signal: Option<Arc<IdleSignal>>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ClientBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + Unpin
       + 'static {
    let peer = Arc::new(crate::proxy::Peer::new(this.peer, this.tls));
    service_fn(move |req: Request<Incoming>| {
        let counts = Arc::clone(&counts);
        let open = signal.as_ref().map(IdleSignal::open);
        let http1 = req.version() < Version::HTTP_2;
        // Now, as hyper hands the request over, not when it first polls the future
        // (see `Proxy::handle`).
        let answer = match this.redirect_to_port {
            Some(port) => Err(redirect_to_https(&req, port)),
            None => Ok(this.proxy.handle(req, &peer)),
        };
        async move {
            let wrap = |response: Response<ResponseBody>, active| {
                response.map(|inner| ClientBody {
                    inner,
                    _active: active,
                    _open: open,
                })
            };
            if !counts.started.load(Ordering::Relaxed) {
                counts.started.store(true, Ordering::Relaxed);
            }
            let answer = match answer {
                Ok(answer) => answer,
                Err(redirect) => return Ok::<_, Infallible>(wrap(redirect, None)),
            };
            let mut guard = CancelGuard(None);
            let mut active = None;
            if !http1 {
                counts.opened.fetch_add(1, Ordering::Relaxed);
                active = Some(ActiveStream::start(Arc::clone(&counts)));
                guard.0 = Some(Arc::clone(&counts));
            }
            let mut response = answer.await;
            guard.0 = None;
            if http1
                && counts.closing.load(Ordering::Relaxed)
                && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
            {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok(wrap(response, active))
        }
    })
}

impl Connection {
    /// A plain HTTP/1.1 connection (no h2c): served by one hyper connection per run
    /// of requests, so that an idle keep-alive client holds no hyper buffers (see
    /// `resting`). Deadlines match `serve`'s: the wait for a request is
    /// `client_header_timeout`, counted when no request ever came, and so is a head
    /// begun and not finished (kept by `IdleWatch` rather than hyper); a stopping server
    /// gives an idle client `CLOSE_GRACE` to send one more request, answered with
    /// `Connection: close`.
    pub(super) fn serve_plain_http1<'a>(
        self,
        builders: &'a Builders,
        stream: tokio::net::TcpStream,
        mut stop: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + 'a {
        // Set up outside the future: what an async fn is given stays in its future
        // beside whatever it is moved into, and this future is what every idle
        // connection holds.
        let peer = self.peer;
        let counts = Arc::new(StreamCounts::default());
        let metrics = Arc::clone(&self.metrics);
        let signal = Arc::new(IdleSignal::default());
        let mut service = service(
            Arc::new(self),
            Arc::clone(&counts),
            Some(Arc::clone(&signal)),
        );
        let mut io = RestingIo::new(
            SendTimeout::new(stream, builders.send_timeout, metrics.send_timeouts.clone()),
            Arc::clone(&signal),
        );
        let mut watch = IdleWatch::new(RELEASE_AFTER_IDLE, builders.first_request_timeout);
        async move {
            loop {
                if !io.has_read_ahead() {
                    // No hyper connection and no buffer: the socket's readiness, the stop
                    // signal and the watch's one sleep, polled by hand rather than by
                    // `select!`, whose futures would make every connection's future larger.
                    watch.wait_idle(builders.first_request_timeout);
                    let mut stopping = std::pin::pin!(stop_requested(&mut stop));
                    let mut stop_seen = false;
                    let woke = std::future::poll_fn(|cx| {
                        if let Poll::Ready(ready) = io.poll_read_ready(cx) {
                            return Poll::Ready(ready.is_ok());
                        }
                        if !stop_seen && stopping.as_mut().poll(cx).is_ready() {
                            stop_seen = true;
                            counts.closing.store(true, Ordering::Relaxed);
                            watch.wait_idle(CLOSE_GRACE);
                        }
                        if !watch.idle_elapsed(cx) {
                            return Poll::Pending;
                        }
                        if !stop_seen && !counts.started.load(Ordering::Relaxed) {
                            metrics.client_header_timeouts.inc();
                            tracing::debug!(
                                %peer,
                                "closing a connection that sent no request within client_header_timeout"
                            );
                        }
                        Poll::Ready(false)
                    })
                    .await;
                    if !woke {
                        return;
                    }
                }
                // Boxed: hyper's connection is kilobytes, held only while requests run; inline
                // it would stay in every idle connection's task.
                let mut conn = Box::new(
                    builders
                        .plain_http1
                        .serve_connection(TokioIo::new(io), service)
                        .with_upgrades(),
                );
                watch.start_run();
                let mut released = false;
                let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
                let ended = {
                    let mut stopping = std::pin::pin!(stop_requested(&mut stop));
                    let mut stop_seen = false;
                    std::future::poll_fn(|cx| loop {
                        let polled = std::pin::Pin::new(&mut *conn).poll(cx);
                        if polled.is_ready() {
                            return polled.map(|ended| ended.map_err(|e| e.to_string()));
                        }
                        match watch.poll(cx, &signal) {
                            Verdict::Wait => {}
                            Verdict::Release => {
                                released = true;
                                signal.set_releasing(true);
                                std::pin::Pin::new(&mut *conn).graceful_shutdown();
                                continue;
                            }
                            Verdict::HeadTimedOut => {
                                metrics.client_header_timeouts.inc();
                                return std::task::Poll::Ready(Err(
                                    "no whole request head within client_header_timeout".to_owned(),
                                ));
                            }
                        }
                        if !stop_seen && stopping.as_mut().poll(cx).is_ready() {
                            stop_seen = true;
                            counts.closing.store(true, Ordering::Relaxed);
                            grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
                        }
                        if let Some(sleep) = grace.as_mut() {
                            if sleep.as_mut().poll(cx).is_ready() {
                                grace = None;
                                std::pin::Pin::new(&mut *conn).graceful_shutdown();
                                continue;
                            }
                        }
                        return std::task::Poll::Pending;
                    })
                    .await
                };
                signal.set_releasing(false);
                if let Err(e) = ended {
                    tracing::debug!(%peer, "client connection ended: {e}");
                    return;
                }
                match (released, conn.into_parts()) {
                    (true, Some(parts)) => {
                        tracing::trace!(%peer, read_ahead = parts.read_buf.len(), "idle: hyper released");
                        io = parts.io.into_inner();
                        io.put_back(parts.read_buf);
                        service = parts.service;
                    }
                    // Closed by hyper (the client asked, or it stopped), or upgraded.
                    (released, _) => {
                        tracing::trace!(%peer, released, "hyper connection ended");
                        return;
                    }
                }
            }
        }
    }
}

/// `stop` turned true (or its sender is gone). A waiting `wait_for` takes the channel's
/// mutex, which every connection shares, each time it is polled, and a connection's
/// futures are polled on every wake of its task: a shared lock per request. This polls
/// it once, to register the task's waker (a task's waker stays the same), and after
/// that only once the channel's version has moved, which is one atomic load.
///
/// The version is noted at that first poll only. The sender moves the version before
/// it wakes the waiters, so a poll on another thread in between finds `wait_for` still
/// pending: noting the version again there would shut out the wake that follows.
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let mut probe = stop.clone();
    // Unconstrained: out of its task's budget, `wait_for` would return pending without
    // registering the waker, and the version noted here would shut out the stop.
    let mut waiting = std::pin::pin!(tokio::task::unconstrained(stop.wait_for(|s| *s)));
    let mut registered = false;
    std::future::poll_fn(|cx| {
        if !registered {
            registered = true;
            probe.mark_unchanged();
        } else if !probe.has_changed().unwrap_or(true) {
            return std::task::Poll::Pending;
        }
        waiting.as_mut().poll(cx).map(drop)
    })
    .await
}

/// What ends a connection that is not asked to.
struct Deadlines<'a> {
    counts: &'a StreamCounts,
    idle_timeout: Duration,
    http2: bool,
    first_request_timeout: Duration,
}

/// Returns if no request has started on the connection `timeout` after it opened.
async fn no_request_within(counts: &StreamCounts, timeout: Duration) {
    tokio::time::sleep(timeout).await;
    if counts.started.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}

/// Runs one connection to its end: asked to stop, it finishes what it has in hand
/// (graceful shutdown); flooding with cancelled streams, or silent since it opened, it
/// is dropped on the spot.
async fn drive<C, E>(
    conn: C,
    graceful_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
    mut stop: watch::Receiver<bool>,
    deadlines: Deadlines<'_>,
    metrics: &Metrics,
    peer: SocketAddr,
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    let Deadlines {
        counts,
        idle_timeout,
        http2,
        first_request_timeout,
    } = deadlines;
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => ended,
        () = no_request_within(counts, first_request_timeout) => {
            // Nothing was asked, so nothing is lost: no graceful goodbye for a client
            // that may never read one.
            metrics.client_header_timeouts.inc();
            tracing::debug!(%peer, "closing a connection that sent no request within client_header_timeout");
            Ok(())
        }
        () = stop_requested(&mut stop) => {
            let carried_http2 = http2 || counts.opened.load(Ordering::Relaxed) > 0;
            if !carried_http2 {
                // HTTP/1: let a busy client get its `Connection: close` answer and close
                // by itself. (HTTP/2's GOAWAY below is race-free by design.)
                counts.closing.store(true, Ordering::Relaxed);
                if let Ok(ended) = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                    return ended;
                }
            }
            graceful_shutdown(conn.as_mut());
            conn.await
        }
        () = idle_for(counts, idle_timeout, http2) => {
            tracing::debug!(%peer, "closing an idle HTTP/2 connection");
            graceful_shutdown(conn.as_mut());
            conn.await
        }
        () = counts.flood.notified() => {
            metrics.http2_reset_floods.inc();
            tracing::warn!(
                %peer,
                opened = counts.opened.load(Ordering::Relaxed),
                cancelled = counts.cancelled.load(Ordering::Relaxed),
                "closing an HTTP/2 connection that cancels most of its streams (rapid reset)"
            );
            Ok(())
        }
    }
}

/// `redirect_http`: the same host and path on HTTPS, 308 so the method and body stay.
fn redirect_to_https(req: &Request<Incoming>, port: u16) -> Response<ResponseBody> {
    let host = match crate::headers::request_host(req) {
        Ok(host) if !host.is_empty() => host,
        _ => return ProxyError::InvalidHost.response(),
    };
    // An IPv6 literal lost its brackets with the port.
    let host: std::borrow::Cow<str> = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]").into()
    } else {
        host.into()
    };
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let Ok(location) = http::HeaderValue::try_from(location) else {
        return ProxyError::BadRequest.response();
    };
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
    response
        .headers_mut()
        .insert(http::header::LOCATION, location);
    response
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::Poll;
    use std::time::Duration;

    use tokio::sync::watch;

    use super::stop_requested;

    /// A connection's task can have spent its budget (tokio's cooperative scheduling)
    /// when it first looks for the stop: that look must still register for it.
    #[tokio::test]
    async fn a_connection_out_of_budget_at_its_first_look_sees_the_stop() {
        let (stop, mut watcher) = watch::channel(false);
        let (busy, mut work) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..1000 {
            busy.send(()).unwrap();
        }
        let (polled, looked) = tokio::sync::oneshot::channel();
        let mut polled = Some(polled);
        let connection = tokio::spawn(async move {
            let mut stopping = std::pin::pin!(stop_requested(&mut watcher));
            let mut polls = 0;
            std::future::poll_fn(|cx| {
                polls += 1;
                if polls == 1 {
                    // Work until the budget is spent: the receiver then says pending
                    // (and wakes the task for a second poll).
                    while work.poll_recv(cx).is_ready() {}
                }
                let stopped = stopping.as_mut().poll(cx);
                if polls == 2 {
                    let _ = polled.take().map(|p| p.send(()));
                }
                stopped
            })
            .await;
        });
        looked.await.unwrap();
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), connection)
            .await
            .expect("the connection missed the stop")
            .unwrap();
    }

    /// The stop is sent from the runtime that accepts while connections run on workers:
    /// a connection's task can be polled between the channel's version moving and its
    /// waiters being woken. Such a poll must not make it miss the stop (it did: the
    /// drain of an upgrade then waited for `shutdown_timeout`).
    #[test]
    fn a_stop_sent_while_a_connection_is_polled_on_another_thread_is_seen() {
        const TRIALS: usize = 300;
        const CONNECTIONS: usize = 4;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for trial in 0..TRIALS {
                let (stop, watcher) = watch::channel(false);
                let (polled, mut first_polls) = tokio::sync::mpsc::channel(CONNECTIONS);
                let connections: Vec<_> = (0..CONNECTIONS)
                    .map(|_| {
                        let mut watcher = watcher.clone();
                        let polled = polled.clone();
                        tokio::spawn(async move {
                            let mut stopping = std::pin::pin!(stop_requested(&mut watcher));
                            let mut told = false;
                            // A busy connection: its task is woken all the time.
                            std::future::poll_fn(|cx| {
                                if stopping.as_mut().poll(cx).is_ready() {
                                    return Poll::Ready(());
                                }
                                if !told {
                                    told = true;
                                    let _ = polled.try_send(());
                                }
                                cx.waker().wake_by_ref();
                                Poll::Pending
                            })
                            .await;
                        })
                    })
                    .collect();
                for _ in 0..CONNECTIONS {
                    first_polls.recv().await;
                }
                stop.send_replace(true);
                for connection in connections {
                    tokio::time::timeout(Duration::from_secs(5), connection)
                        .await
                        .unwrap_or_else(|_| panic!("trial {trial}: a connection missed the stop"))
                        .unwrap();
                }
            }
        });
    }
}
