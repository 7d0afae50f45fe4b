//! Upstream connections: connect (TCP, then TLS when the pool asks for it) with a
//! timeout, and keep them per backend. HTTP/1.1 connections (`upstream_h1`) wait idle
//! in a lock-free queue; an HTTP/2 backend gets one multiplexed hyper connection that
//! every request shares.
//!
//! The proxy connects *before* it hands the request over, so a refused or timed-out
//! connect leaves the request (and its unread body) intact for a retry on another
//! backend; a pooled connection found closed when the request is offered leaves it
//! intact too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use crossbeam_queue::SegQueue;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::config::{Protocol, UpstreamConfig};
use crate::tls::{UpstreamTls, UpstreamTlsError};
use crate::upstream_h1;
use rustls::pki_types::ServerName;

/// How a pool's backends are reached: the runtime side of `UpstreamConfig`.
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    pub protocol: Protocol,
    pub tls: Option<Arc<UpstreamTls>>,
}

/// Each pool's `Upstream`, by pool name.
pub type Upstreams = std::collections::HashMap<String, Upstream>;

impl Upstream {
    /// Reads the CA and client certificate files the pool names and builds its TLS
    /// client; the error says which pool key it is about.
    pub fn from_config(config: &UpstreamConfig) -> Result<Upstream, UpstreamTlsError> {
        let tls = match &config.tls {
            None => None,
            Some(tls) => Some(Arc::new(crate::tls::upstream_tls(
                tls,
                config.protocol.is_h2(),
            )?)),
        };
        Ok(Upstream {
            protocol: config.protocol,
            tls,
        })
    }

    pub fn scheme(&self) -> http::uri::Scheme {
        if self.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        }
    }
}

/// A connection ready for one request: HTTP/1.1 (exclusive until its response ends) or
/// a handle on a shared HTTP/2 connection.
pub enum Sender {
    H1(Box<upstream_h1::Conn>),
    H2(http2::SendRequest<RequestBody>),
}

impl Sender {
    /// Sends a request whose failure needs no telling apart (health checks, mirrored
    /// copies); the proxy's own path tells them apart (`proxy::send_to`).
    pub async fn send_request(
        self,
        req: Request<RequestBody>,
        header_timeout: Duration,
    ) -> Result<Response<UpstreamBody>, String> {
        match self {
            Sender::H1(conn) => {
                let (parts, mut body) = req.into_parts();
                let upgrade = crate::headers::is_upgrade_request(&parts.headers);
                let mut request = upstream_h1::EncodedRequest::new(parts, None, &body, upgrade);
                // What such requests carry is small: the one limit covers both waits.
                match conn
                    .send(&mut request, &mut body, header_timeout, header_timeout)
                    .await
                {
                    Ok((head, body)) => Ok(Response::from_parts(head, UpstreamBody::H1(body))),
                    Err(upstream_h1::SendError::TimedOut) => {
                        Err(format!("no response headers within {header_timeout:?}"))
                    }
                    Err(upstream_h1::SendError::Stalled) => Err(format!(
                        "the backend took none of the request body for {header_timeout:?}"
                    )),
                    Err(upstream_h1::SendError::Stale(e) | upstream_h1::SendError::Failed(e)) => {
                        Err(e.to_string())
                    }
                    Err(upstream_h1::SendError::Body(e)) => Err(e.to_string()),
                }
            }
            Sender::H2(mut sender) => {
                let response = tokio::time::timeout(header_timeout, sender.try_send_request(req))
                    .await
                    .map_err(|_| format!("no response headers within {header_timeout:?}"))?
                    .map_err(|e: TrySendError<_>| e.into_error().to_string())?;
                Ok(response.map(UpstreamBody::H2))
            }
        }
    }
}

/// A backend's response body, from either kind of connection.
pub enum UpstreamBody {
    H1(upstream_h1::ResponseBody),
    H2(Incoming),
}

impl UpstreamBody {
    /// The request body still goes out alongside (HTTP/1.1 only: hyper sends an HTTP/2
    /// request body on its own).
    pub fn still_sending(&self) -> bool {
        match self {
            UpstreamBody::H1(body) => body.still_sending(),
            UpstreamBody::H2(_) => false,
        }
    }

    /// The HTTP/1.1 connection, once its body ended clean and the backend keeps it
    /// open; HTTP/2 connections are shared and never handed back.
    pub fn take_reusable(&mut self) -> Option<Box<upstream_h1::Conn>> {
        match self {
            UpstreamBody::H1(body) => body.take_reusable(),
            UpstreamBody::H2(_) => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::H1(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as Self::Error),
            UpstreamBody::H2(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as Self::Error),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(body) => body.is_end_stream(),
            UpstreamBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(body) => body.size_hint(),
            UpstreamBody::H2(body) => body.size_hint(),
        }
    }
}

/// Idle connections kept per backend (per backend and worker with `workers > 1`);
/// beyond this a finished connection is closed.
const MAX_IDLE_PER_BACKEND: usize = 512;

pub struct ConnPool {
    /// One list per worker (see `worker`): a connection goes back to the list of the
    /// thread its response ended on, which is the thread its connection task runs on,
    /// and is taken from there again, so no request wakes another thread. Each is made
    /// when its first connection comes back, then grown a block of 31 slots at a time,
    /// instead of holding `MAX_IDLE_PER_BACKEND` slots from the start: a backend that
    /// never saw a request costs a few words here, where at 20,000 backends the
    /// preallocated queues took 600 MB.
    idle: Box<[IdleList]>,
    idle_timeout: Duration,
    /// Made on the first HTTP/2 connect: an HTTP/1.1 backend never needs it.
    h2: std::sync::OnceLock<Box<SharedH2>>,
}

/// An HTTP/2 backend's one multiplexed connection.
#[derive(Default)]
struct SharedH2 {
    conn: ArcSwapOption<OpenH2>,
    /// Held only while an HTTP/2 connection is being opened, so concurrent requests
    /// wait for that one instead of each opening their own.
    connecting: tokio::sync::Mutex<()>,
}

struct OpenH2 {
    sender: http2::SendRequest<RequestBody>,
    /// The TLS client settings it was opened with (see `opened_as`).
    opened_with: Option<Arc<rustls::ClientConfig>>,
}

/// Whether a connection of HTTP/2 or not (`h2`), opened with the TLS client settings
/// `opened_with` (`None`: plain TCP), may carry a request of a pool whose settings are
/// now `upstream`. Backends and their pooled connections outlive a reload, which makes
/// a pool's TLS client anew from its files: without this, a reload that turns TLS on (or
/// changes the CA, the server name or the client certificate, or the protocol) would
/// leave requests going over the connections made before, for as long as traffic kept
/// them from idling out. Each connection holds its settings, so their address cannot
/// be reused by newer ones.
fn opened_as(
    h2: bool,
    opened_with: Option<&Arc<rustls::ClientConfig>>,
    upstream: &Upstream,
) -> bool {
    h2 == upstream.protocol.is_h2()
        && match (opened_with, &upstream.tls) {
            (None, None) => true,
            (Some(opened), Some(now)) => Arc::ptr_eq(opened, &now.config),
            _ => false,
        }
}

/// One worker's idle connections to a backend.
#[derive(Default)]
struct IdleList {
    queue: std::sync::OnceLock<Box<SegQueue<IdleConn>>>,
    /// Connections in `queue`, kept to bound it; per list, so that no request touches
    /// a cache line another worker writes.
    len: AtomicUsize,
}

struct IdleConn {
    conn: Box<upstream_h1::Conn>,
    since: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

impl ConnPool {
    pub fn new(idle_timeout: Duration) -> ConnPool {
        ConnPool {
            idle: (0..crate::worker::lists())
                .map(|_| IdleList::default())
                .collect(),
            idle_timeout,
            h2: std::sync::OnceLock::new(),
        }
    }

    /// A pooled connection that is still open, not past its idle time and opened with
    /// the pool's current TLS settings (`upstream`); the others met on the way are
    /// closed.
    pub fn checkout(&self, upstream: &Upstream) -> Option<Sender> {
        if let Some(shared) = self.live_h2(upstream) {
            return Some(Sender::H2(shared));
        }
        let list = self.own_list();
        let idle = list.queue.get()?;
        while let Some(mut idle_conn) = idle.pop() {
            list.len.fetch_sub(1, Ordering::Relaxed);
            if self.reusable(&mut idle_conn, upstream) {
                return Some(Sender::H1(idle_conn.conn));
            }
        }
        None
    }

    /// Not past its idle time, opened with the pool's current settings, and neither
    /// closed by the backend nor sent anything unasked.
    fn reusable(&self, idle_conn: &mut IdleConn, upstream: &Upstream) -> bool {
        idle_conn.since.elapsed() <= self.idle_timeout
            && opened_as(false, idle_conn.conn.opened_with(), upstream)
            && idle_conn.conn.is_usable()
    }

    fn live_h2(&self, upstream: &Upstream) -> Option<http2::SendRequest<RequestBody>> {
        let h2 = self.h2.get()?;
        let guard = h2.conn.load();
        let shared = guard.as_deref()?;
        if !opened_as(true, shared.opened_with.as_ref(), upstream) {
            // Made before a reload changed the pool: forgotten (unless a newer one took
            // its place meanwhile), so it closes once its last stream ends.
            h2.conn.compare_and_swap(&guard, None);
            return None;
        }
        (!shared.sender.is_closed()).then(|| shared.sender.clone())
    }

    /// An HTTP/1.1 connection whose response ended clean, for the next request.
    pub fn checkin(&self, conn: Box<upstream_h1::Conn>) {
        // A full queue drops the connection, which closes it.
        let list = self.own_list();
        let room = list
            .len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_IDLE_PER_BACKEND).then_some(n + 1)
            });
        if room.is_ok() {
            list.queue.get_or_init(Box::default).push(IdleConn {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes the idle connections the backend has closed, that are past their idle
    /// time or that were made before a reload changed the pool's settings (now
    /// `upstream`), so none lingers (half-closed, holding a descriptor) until a request
    /// comes for its backend; and forgets a shared HTTP/2 connection of the old
    /// settings. Run from the main thread now and then: it takes each list's
    /// connections and puts the good ones back, a moment in which that list's worker
    /// finds it empty and opens a connection instead.
    pub fn sweep(&self, upstream: &Upstream) {
        drop(self.live_h2(upstream));
        for list in self.idle.iter() {
            let Some(idle) = list.queue.get() else {
                continue;
            };
            for _ in 0..idle.len() {
                let Some(mut idle_conn) = idle.pop() else {
                    break;
                };
                if self.reusable(&mut idle_conn, upstream) {
                    idle.push(idle_conn);
                } else {
                    list.len.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The shared HTTP/2 connection refused a request: forget it, so the next request
    /// opens a new one instead of offering to this one again.
    pub fn forget_shared(&self) {
        if let Some(h2) = self.h2.get() {
            h2.conn.store(None);
        }
    }

    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .filter_map(|list| list.queue.get())
            .map(|idle| idle.len())
            .sum()
    }

    /// The idle list of the thread this runs on.
    fn own_list(&self) -> &IdleList {
        // A pool made before the workers started has one list, which they share.
        &self.idle[crate::worker::list() % self.idle.len()]
    }

    /// A new connection for HTTP/1.1; for HTTP/2 the shared one, opened if needed.
    /// `tls_name` is the backend's own name, for a TLS pool that names none.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        tls_name: Option<&ServerName<'static>>,
        upstream: &Upstream,
        timeout: Duration,
    ) -> Result<Sender, ConnectError> {
        if !upstream.protocol.is_h2() {
            return connect(addr, tls_name, upstream, timeout).await;
        }
        let h2 = self.h2.get_or_init(Box::default);
        let _opening = h2.connecting.lock().await;
        if let Some(shared) = self.live_h2(upstream) {
            return Ok(Sender::H2(shared));
        }
        let sender = connect(addr, tls_name, upstream, timeout).await?;
        if let Sender::H2(shared) = &sender {
            // In place of one opened with other settings, which closes once its last
            // stream ends.
            h2.conn.store(Some(Arc::new(OpenH2 {
                sender: shared.clone(),
                opened_with: upstream.tls.as_ref().map(|tls| Arc::clone(&tls.config)),
            })));
        }
        Ok(sender)
    }
}

/// Opens a connection to `addr` as `upstream` says; an HTTP/2 connection's task runs on
/// its own and ends when the connection closes. The timeout covers TCP and TLS, whose name
/// is the pool's `server_name`, else the backend's host name, else its IP address.
pub async fn connect(
    addr: SocketAddr,
    tls_name: Option<&ServerName<'static>>,
    upstream: &Upstream,
    timeout: Duration,
) -> Result<Sender, ConnectError> {
    let opened = tokio::time::timeout(timeout, async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        match &upstream.tls {
            None if !upstream.protocol.is_h2() => Ok(Sender::H1(upstream_h1::Conn::new(
                upstream_h1::Io::Plain(stream),
                None,
            ))),
            None => handshake(stream, addr).await,
            Some(tls) => {
                let name = tls
                    .server_name
                    .clone()
                    .or_else(|| tls_name.cloned())
                    .unwrap_or_else(|| addr.ip().into());
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
                    .connect(name, stream)
                    .await
                    .map_err(ConnectError::Tls)?;
                if upstream.protocol.is_h2() {
                    handshake(stream, addr).await
                } else {
                    Ok(Sender::H1(upstream_h1::Conn::new(
                        upstream_h1::Io::Tls(Box::new(stream)),
                        Some(Arc::clone(&tls.config)),
                    )))
                }
            }
        }
    })
    .await;
    opened.unwrap_or(Err(ConnectError::Timeout(timeout)))
}

async fn handshake<S>(stream: S, addr: SocketAddr) -> Result<Sender, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // A shared connection that dies silently would fail every request on it:
        // ping it, and drop it when the pings go unanswered.
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, "upstream HTTP/2 connection ended: {e}");
        }
    });
    Ok(Sender::H2(sender))
}
