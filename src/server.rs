//! Listeners and lifecycle: the proxy's accept loop with its connection limit, the admin
//! listener, and graceful shutdown (not ready, keep serving for `shutdown_delay`, stop
//! accepting, let in-flight requests finish up to `shutdown_timeout`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use std::sync::atomic::{AtomicU32, AtomicU64};

use http::{Request, Response, Version};
use hyper::body::Incoming;

use crate::accesslog::AccessLog;
use crate::admin::{self, Shared};
use crate::client_io::SendTimeout;
use crate::config::Config;
use crate::control::Control;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxySettings, ResponseBody};
use crate::tls::Certificates;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("state.path: {0}")]
    State(#[from] crate::control::ControlError),
    #[error("proxy.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A started server. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Runs the graceful shutdown sequence and returns when it is complete.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Starts the shutdown sequence without waiting for it.
    pub fn begin_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the server has stopped (after `begin_shutdown` or `shutdown`).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Binds both listeners and starts serving on the current tokio runtime.
pub async fn start(config: Config) -> Result<Running, ServerError> {
    let proxy_listener = TcpListener::bind(config.proxy.listen)
        .await
        .map_err(|source| ServerError::Bind {
            what: "proxy.listen",
            addr: config.proxy.listen,
            source,
        })?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| ServerError::Bind {
            what: "admin.listen",
            addr: config.admin.listen,
            source,
        })?;
    let proxy_addr = local_addr(&proxy_listener, config.proxy.listen);
    let admin_addr = local_addr(&admin_listener, config.admin.listen);
    let tls = match &config.proxy.tls {
        None => None,
        Some(tls) => {
            let listener =
                TcpListener::bind(tls.listen)
                    .await
                    .map_err(|source| ServerError::Bind {
                        what: "proxy.tls.listen",
                        addr: tls.listen,
                        source,
                    })?;
            let certificates = Arc::new(Certificates::load(tls.certificates.clone())?);
            let server_config = crate::tls::server_config(
                Arc::clone(&certificates),
                tls.min_version,
                tls.client_auth.as_ref(),
            )?;
            Some((listener, certificates, server_config))
        }
    };
    let tls_addr = tls
        .as_ref()
        .zip(config.proxy.tls.as_ref())
        .map(|((l, _, _), t)| local_addr(l, t.listen));

    let control = Arc::new(Control::start(config.clone())?);
    control.persist_now().await?;
    control.sync_health_checks();
    let shared = Arc::new(Shared {
        control: Arc::clone(&control),
        ready: AtomicBool::new(true),
        token: config.admin.token.clone(),
        metrics_require_token: config.admin.metrics_require_token,
        certificates: tls
            .as_ref()
            .map(|(_, certificates, _)| Arc::clone(certificates)),
    });
    for pool in &config.pools {
        if pool.upstream.tls.as_ref().is_some_and(|t| t.unverified) {
            tracing::warn!(
                pool = %pool.name,
                "insecure_skip_verify: this pool's backend certificates are not verified; anyone on the path can pose as them"
            );
        }
    }
    if let Some(certificates) = &shared.certificates {
        let store = certificates.current();
        control.metrics().set_certificates(&store.info);
        for cert in &store.info {
            tracing::info!(cert_file = %cert.cert_file.display(), names = %cert.names.join(","), "certificate loaded");
            if cert.not_after.is_some_and(|t| t < crate::tls::now_unix()) {
                tracing::warn!(cert_file = %cert.cert_file.display(), "certificate has expired");
            }
        }
    }
    let proxy = Arc::new(Proxy {
        table: Arc::clone(control.table()),
        settings: ProxySettings {
            connect_timeout: config.proxy.connect_timeout,
            upstream_header_timeout: config.proxy.upstream_header_timeout,
            connect_attempts: config.proxy.connect_attempts,
            max_request_body: config.proxy.max_request_body,
            client_body_timeout: config.proxy.client_body_timeout,
        },
        client_body_timeouts: control.metrics().client_body_timeouts.clone(),
        metrics: config
            .metrics
            .enabled
            .then(|| Arc::clone(control.metrics())),
        access_log: AccessLog::start(&config.log, control.metrics().access_log_dropped.clone()),
    });

    tracing::info!(
        proxy_addr = %proxy_addr,
        admin_addr = %admin_addr,
        tls_addr = %tls_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        pools = %describe_pools(&config),
        services = %describe_services(&config),
        "switchyard listening"
    );

    let (stop, stop_rx) = watch::channel(false);
    let tls_listener = tls.map(|(listener, _, server_config)| (listener, server_config));
    let task = tokio::spawn(lifecycle(
        config,
        proxy_listener,
        tls_listener,
        admin_listener,
        proxy,
        Arc::clone(&shared),
        stop_rx,
    ));
    Ok(Running {
        proxy_addr,
        admin_addr,
        tls_addr,
        shared,
        stop,
        task,
    })
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

fn describe_pools(config: &Config) -> String {
    config
        .pools
        .iter()
        .map(|p| {
            let backends: Vec<String> = p.backends.iter().map(|b| b.addr.to_string()).collect();
            format!("{}=[{}]", p.name, backends.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe_services(config: &Config) -> String {
    config
        .services
        .iter()
        .map(|s| {
            let hosts: Vec<String> = s.hosts.iter().map(ToString::to_string).collect();
            format!(
                "{}({} {})->{}",
                s.name,
                hosts.join(","),
                s.path_prefix,
                s.active
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn lifecycle(
    config: Config,
    proxy_listener: TcpListener,
    tls_listener: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    admin_listener: TcpListener,
    proxy: Arc<Proxy>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let (stop_accepting_tx, stop_accepting) = watch::channel(false);
    let (stop_admin_tx, mut stop_admin) = watch::channel(false);

    let admin_app = admin::app(Arc::clone(&shared));
    let admin_task = tokio::spawn(async move {
        let served = axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(async move {
                let _ = stop_admin.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!("admin listener failed: {e}");
        }
    });

    let tracker = Arc::new(ConnTracker::new());
    let builders = Arc::new(Builders::new(&config.proxy));
    // One limit for both listeners: `max_connections` is what the process can hold.
    let connection_limit = Arc::new(Semaphore::new(config.proxy.max_connections));
    let metrics = Arc::clone(shared.control.metrics());
    let mut accept_tasks = Vec::new();
    let mut file_watcher = None;
    let plain = Listener {
        kind: ListenerKind::Plain {
            h2c: config.proxy.h2c,
            redirect_to_port: config
                .proxy
                .tls
                .as_ref()
                .filter(|t| t.redirect_http)
                .map(|t| {
                    t.redirect_port.unwrap_or_else(|| {
                        tls_listener
                            .as_ref()
                            .and_then(|(l, _)| l.local_addr().ok())
                            .map_or(t.listen.port(), |a| a.port())
                    })
                }),
        },
        open: metrics.connections("http"),
        refused: metrics.connections_refused("http"),
    };
    accept_tasks.push(tokio::spawn(accept_loop(
        proxy_listener,
        plain,
        Arc::clone(&proxy),
        Arc::clone(&connection_limit),
        Arc::clone(&builders),
        Arc::clone(&tracker),
        stop_accepting.clone(),
        Arc::clone(&metrics),
    )));
    if let (Some((listener, server_config)), Some(tls)) = (tls_listener, &config.proxy.tls) {
        let kind = ListenerKind::Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(server_config),
            handshake_timeout: tls.handshake_timeout,
            handshakes: Arc::new(Semaphore::new(tls.max_handshakes)),
        };
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            Listener {
                kind,
                open: metrics.connections("https"),
                refused: metrics.connections_refused("https"),
            },
            Arc::clone(&proxy),
            Arc::clone(&connection_limit),
            Arc::clone(&builders),
            Arc::clone(&tracker),
            stop_accepting.clone(),
            Arc::clone(&metrics),
        )));
        if let Some(certificates) = &shared.certificates {
            if !tls.reload_interval.is_zero() {
                let metrics = Arc::clone(&metrics);
                file_watcher = Some(tokio::spawn(crate::tls::watch_files(
                    Arc::clone(certificates),
                    tls.reload_interval,
                    move |result| {
                        tracing::info!("certificate files changed on disk");
                        crate::admin::record_reload(&metrics, result);
                    },
                )));
            }
        }
    }

    let _ = stop.wait_for(|s| *s).await;
    shared.ready.store(false, Ordering::SeqCst);
    let delay = config.proxy.shutdown_delay;
    tracing::info!(
        shutdown_delay = ?delay,
        shutdown_timeout = ?config.proxy.shutdown_timeout,
        "shutting down: /readyz now answers 503"
    );
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let _ = stop_accepting_tx.send(true);
    for task in accept_tasks {
        if let Err(e) = task.await {
            tracing::error!("accept loop failed: {e}");
        }
    }
    if let Some(watcher) = file_watcher {
        watcher.abort();
    }
    tracing::info!("stopped accepting; waiting for in-flight requests");
    let deadline = tokio::time::Instant::now() + config.proxy.shutdown_timeout;
    // HTTP connections first, then what outlives them: upgraded tunnels (WebSockets)
    // still count as in flight on their backends.
    let drained = tokio::time::timeout_at(deadline, async {
        tracker.shutdown().await;
        loop {
            let busy: u64 = shared
                .table()
                .load()
                .pools
                .iter()
                .flat_map(|p| p.backends.iter())
                .map(|b| b.in_flight())
                .sum();
            if busy == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("all requests and tunnels finished"),
        Err(_) => tracing::warn!(
            "shutdown_timeout of {:?} passed with requests still in flight; closing them",
            config.proxy.shutdown_timeout
        ),
    }
    shared.control.stop_health_checks();
    let _ = stop_admin_tx.send(true);
    // An admin long poll (wait-drained) must not hold the exit: a moment to answer,
    // then the admin listener is dropped.
    let mut admin_task = admin_task;
    if tokio::time::timeout(Duration::from_secs(1), &mut admin_task)
        .await
        .is_err()
    {
        admin_task.abort();
    }
}

/// The three ways a client connection is served: both HTTP versions by detection
/// (plain port with h2c on), or exactly one (chosen by ALPN on TLS; HTTP/1.1 on a plain
/// port without h2c).
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    http2_idle_timeout: Duration,
    /// A connection with no request started by then is closed (`client_header_timeout`):
    /// it covers what hyper's header timer does not, protocol detection (h2c) and an
    /// HTTP/2 client that never opens a stream.
    first_request_timeout: Duration,
    send_timeout: Duration,
}

#[derive(Clone, Copy)]
enum Served {
    Detect,
    Http1,
    Http2,
}

impl Builders {
    fn new(settings: &crate::config::ProxyConfig) -> Builders {
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
            http2,
            http2_idle_timeout: settings.http2_idle_timeout,
            first_request_timeout: settings.client_header_timeout,
            send_timeout: settings.send_timeout,
        }
    }
}

/// Client connections still open, for the graceful shutdown: each holds a receiver
/// that says when to finish, and the shutdown waits for every receiver to be dropped.
struct ConnTracker {
    stop: watch::Sender<bool>,
}

impl ConnTracker {
    fn new() -> ConnTracker {
        ConnTracker {
            stop: watch::channel(false).0,
        }
    }

    fn watcher(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    async fn shutdown(&self) {
        self.stop.send_replace(true);
        self.stop.closed().await;
    }
}

struct Listener {
    kind: ListenerKind,
    open: prometheus::IntGauge,
    refused: prometheus::IntCounter,
}

/// Connections over `max_connections` that are answered with a 503 at leisure (their
/// request read first, so the close does not reset the answer away). Past this many at
/// once, the rest are answered and closed on the spot: a flood costs no tasks, timers
/// or file descriptors held.
const MAX_REFUSALS: usize = 64;

#[derive(Clone)]
enum ListenerKind {
    Plain {
        h2c: bool,
        /// Every request is answered with a redirect to HTTPS on this port.
        redirect_to_port: Option<u16>,
    },
    Tls {
        acceptor: tokio_rustls::TlsAcceptor,
        handshake_timeout: Duration,
        /// Handshakes are the expensive part of a TLS connection: only this many at
        /// once, the rest wait (within their handshake timeout).
        handshakes: Arc<Semaphore>,
    },
}

/// Accepts until told to stop. Connections are watched by `tracker`, so the shutdown
/// can wait for them.
#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: TcpListener,
    config: Listener,
    proxy: Arc<Proxy>,
    limit: Arc<Semaphore>,
    builders: Arc<Builders>,
    tracker: Arc<ConnTracker>,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let overloaded = bytes::Bytes::from(ProxyError::Overloaded.raw_http1());
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            config.refused.inc();
            if matches!(config.kind, ListenerKind::Plain { .. }) {
                match Arc::clone(&refusals).try_acquire_owned() {
                    Ok(slot) => {
                        let answer = overloaded.clone();
                        tokio::spawn(async move {
                            refuse(stream, &answer).await;
                            drop(slot);
                        });
                    }
                    // A flood: answer with what fits in the socket buffer, close, and
                    // hold nothing.
                    Err(_) => refuse_now(stream, &overloaded),
                }
            }
            // A TLS client cannot read a plain answer: closing is all there is.
            continue;
        };
        let _ = stream.set_nodelay(true);
        config.open.inc();
        let open = config.open.clone();
        let watcher = tracker.watcher();
        let proxy = Arc::clone(&proxy);
        let builders = Arc::clone(&builders);
        let metrics = Arc::clone(&metrics);
        let kind = config.kind.clone();
        tokio::spawn(async move {
            match kind {
                ListenerKind::Plain {
                    h2c,
                    redirect_to_port,
                } => {
                    let served = if h2c { Served::Detect } else { Served::Http1 };
                    let conn = Connection {
                        proxy,
                        peer,
                        tls: false,
                        redirect_to_port,
                        metrics,
                    };
                    conn.serve(&builders, served, stream, watcher).await;
                }
                ListenerKind::Tls {
                    acceptor,
                    handshake_timeout,
                    handshakes,
                } => {
                    let handshake = tokio::time::timeout(handshake_timeout, async {
                        let _slot = handshakes.acquire().await;
                        acceptor.accept(stream).await
                    })
                    .await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => Some(stream),
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            failed_handshake(&metrics, "error")
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            failed_handshake(&metrics, "timeout")
                        }
                    };
                    if let Some(stream) = stream {
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        let served = if h2 { Served::Http2 } else { Served::Http1 };
                        let conn = Connection {
                            proxy,
                            peer,
                            tls: true,
                            redirect_to_port: None,
                            metrics,
                        };
                        conn.serve(&builders, served, stream, watcher).await;
                    }
                }
            }
            open.dec();
            drop(permit);
        });
    }
}

fn failed_handshake<T>(metrics: &Metrics, reason: &str) -> Option<T> {
    metrics
        .tls_handshake_failures
        .with_label_values(&[reason])
        .inc();
    None
}

/// One client connection after accept (and TLS handshake).
struct Connection {
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    tls: bool,
    redirect_to_port: Option<u16>,
    metrics: Arc<Metrics>,
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
}

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
    async fn serve<S>(
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
        let this = Arc::new(self);
        let service_counts = Arc::clone(&counts);
        let service = service_fn(move |req: Request<Incoming>| {
            let this = Arc::clone(&this);
            let counts = Arc::clone(&service_counts);
            async move {
                let wrap = |response: Response<ResponseBody>, active| {
                    response.map(|inner| ClientBody {
                        inner,
                        _active: active,
                    })
                };
                if !counts.started.load(Ordering::Relaxed) {
                    counts.started.store(true, Ordering::Relaxed);
                }
                if let Some(port) = this.redirect_to_port {
                    return Ok::<_, Infallible>(wrap(redirect_to_https(&req, port), None));
                }
                let mut guard = CancelGuard(None);
                let mut active = None;
                if req.version() == Version::HTTP_2 {
                    counts.opened.fetch_add(1, Ordering::Relaxed);
                    active = Some(ActiveStream::start(Arc::clone(&counts)));
                    guard.0 = Some(counts);
                }
                let response = this.proxy.handle(req, this.peer, this.tls).await;
                guard.0 = None;
                Ok(wrap(response, active))
            }
        });
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
                .map_err(|e| e.to_string())
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
        () = async { drop(stop.wait_for(|s| *s).await) } => {
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

/// Answers a connection the proxy will not serve with a complete HTTP response. The
/// request is read first (briefly), so closing does not reset the connection before the
/// client has read the answer.
async fn refuse(mut stream: TcpStream, answer: &[u8]) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.write_all(answer)).await;
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
}

/// As `refuse`, without waiting for anything: what has arrived of the request is read,
/// the answer written if the socket takes it, and the connection closed.
fn refuse_now(stream: TcpStream, answer: &[u8]) {
    let mut buf = [0u8; 4096];
    let _ = stream.try_read(&mut buf);
    let _ = stream.try_write(answer);
}
