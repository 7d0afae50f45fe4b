//! Listeners and lifecycle: the proxy's accept loop with its connection limit, the admin
//! listener, and graceful shutdown (not ready, keep serving for `shutdown_delay`, stop
//! accepting, let in-flight requests finish up to `shutdown_timeout`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::accesslog::AccessLog;
use crate::admin;
use crate::config::Config;
use crate::control::Control;
use crate::error::ProxyError;
use crate::proxy::{Proxy, ProxySettings};
use crate::routing::RoutingTable;

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
}

/// What the admin API and the lifecycle share with the data plane.
pub struct Shared {
    pub control: Arc<Control>,
    /// False once shutdown has begun: `/readyz` answers 503.
    pub ready: AtomicBool,
    pub token: Option<String>,
    pub metrics_require_token: bool,
}

impl Shared {
    pub fn table(&self) -> &Arc<ArcSwap<RoutingTable>> {
        self.control.table()
    }

    /// Ready to take traffic: not shutting down, and every backend checked once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.control.first_round_done()
    }
}

/// A started server. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
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

    let control = Arc::new(Control::start(config.clone()));
    control.persist_now().await?;
    control.sync_health_checks();
    let shared = Arc::new(Shared {
        control: Arc::clone(&control),
        ready: AtomicBool::new(true),
        token: config.admin.token.clone(),
        metrics_require_token: config.admin.metrics_require_token,
    });
    let proxy = Arc::new(Proxy {
        table: Arc::clone(control.table()),
        settings: ProxySettings {
            connect_timeout: config.proxy.connect_timeout,
            upstream_header_timeout: config.proxy.upstream_header_timeout,
            connect_attempts: config.proxy.connect_attempts,
            max_request_body: config.proxy.max_request_body,
        },
        metrics: config
            .metrics
            .enabled
            .then(|| Arc::clone(control.metrics())),
        access_log: AccessLog::start(&config.log, control.metrics().access_log_dropped.clone()),
    });

    tracing::info!(
        proxy_addr = %proxy_addr,
        admin_addr = %admin_addr,
        pools = %describe_pools(&config),
        services = %describe_services(&config),
        "switchyard listening"
    );

    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(lifecycle(
        config,
        proxy_listener,
        admin_listener,
        proxy,
        Arc::clone(&shared),
        stop_rx,
    ));
    Ok(Running {
        proxy_addr,
        admin_addr,
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

    let graceful = GracefulShutdown::new();
    let accept_task = {
        let settings = config.proxy.clone();
        let open = shared.control.metrics().connections("http");
        tokio::spawn(accept_loop(
            proxy_listener,
            proxy,
            settings,
            graceful,
            stop_accepting,
            open,
        ))
    };

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
    let graceful = match accept_task.await {
        Ok(graceful) => graceful,
        Err(e) => {
            tracing::error!("accept loop failed: {e}");
            GracefulShutdown::new()
        }
    };
    tracing::info!("stopped accepting; waiting for in-flight requests");
    let deadline = tokio::time::Instant::now() + config.proxy.shutdown_timeout;
    // HTTP connections first, then what outlives them: upgraded tunnels (WebSockets)
    // still count as in flight on their backends.
    let drained = tokio::time::timeout_at(deadline, async {
        graceful.shutdown().await;
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

/// Accepts until told to stop, then hands back the graceful-shutdown watcher that
/// tracks the connections still open.
async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: crate::config::ProxyConfig,
    graceful: GracefulShutdown,
    mut stop: watch::Receiver<bool>,
    connections_open: prometheus::IntGauge,
) -> GracefulShutdown {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.client_header_timeout)
        .max_buf_size(settings.max_header_size.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_size as u32)
        // Idle HTTP/2 connections are pinged and closed when the peer is gone, the
        // counterpart of the HTTP/1 header-read timer.
        .keep_alive_interval(settings.client_header_timeout)
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let open = connections_open;

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
            tokio::spawn(refuse(stream, ProxyError::Overloaded));
            continue;
        };
        let _ = stream.set_nodelay(true);
        open.inc();
        let open = open.clone();
        let proxy = Arc::clone(&proxy);
        let service = service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, Infallible>(proxy.handle(req, peer, false).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "client connection ended: {e}");
            }
            open.dec();
            drop(permit);
        });
    }
    graceful
}

/// Answers a connection the proxy will not serve with a complete HTTP response. The
/// request is read first (briefly), so closing does not reset the connection before the
/// client has read the answer.
async fn refuse(mut stream: TcpStream, error: ProxyError) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await;
    let _ = stream.write_all(&error.raw_http1()).await;
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await;
}
