//! The lifecycle: bind the listeners, start the control plane and the admin listener,
//! and the graceful shutdown (not ready, keep serving for `shutdown_delay`, stop
//! accepting, let in-flight requests finish up to `shutdown_timeout`). Accepting is in
//! `listener`, serving one client connection in `downstream`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::accesslog::AccessLog;
use crate::admin::{self, Shared};
use crate::config::Config;
use crate::control::Control;
use crate::proxy::{Proxy, ProxySettings};
use crate::setup::Setup;

mod downstream;
mod listener;

use downstream::Builders;
use listener::{accept_loop, Accepting, Listener, ListenerKind};

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
    /// A file the config names does not load (the same error `switchyard check` gives).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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

/// Loads what `config` names, binds the listeners and starts serving on the current
/// tokio runtime.
pub async fn start(config: Config) -> Result<Running, ServerError> {
    let Setup {
        config,
        admin_token,
        upstreams,
        listener_tls,
    } = Setup::new(config)?;
    let proxy_listener = bind("proxy.listen", config.proxy.listen).await?;
    let admin_listener = bind("admin.listen", config.admin.listen).await?;
    let proxy_addr = local_addr(&proxy_listener, config.proxy.listen);
    let admin_addr = local_addr(&admin_listener, config.admin.listen);
    let tls = match (&config.proxy.tls, listener_tls) {
        (Some(settings), Some(loaded)) => {
            let listener = bind("proxy.tls.listen", settings.listen).await?;
            Some((listener, loaded.certificates, loaded.server_config))
        }
        _ => None,
    };
    let tls_addr = tls
        .as_ref()
        .zip(config.proxy.tls.as_ref())
        .map(|((l, _, _), t)| local_addr(l, t.listen));

    let unverified_pools: Vec<String> = config
        .pools
        .iter()
        .filter(|pool| {
            upstreams
                .get(&pool.name)
                .and_then(|u| u.tls.as_ref())
                .is_some_and(|t| t.unverified)
        })
        .map(|pool| pool.name.clone())
        .collect();
    let control = Arc::new(Control::start(config.clone(), upstreams)?);
    control.persist_now().await?;
    control.sync_health_checks();
    let shared = Arc::new(Shared {
        control: Arc::clone(&control),
        ready: AtomicBool::new(true),
        token: admin_token,
        metrics_require_token: config.admin.metrics_require_token,
        certificates: tls
            .as_ref()
            .map(|(_, certificates, _)| Arc::clone(certificates)),
    });
    for pool in unverified_pools {
        tracing::warn!(
            %pool,
            "insecure_skip_verify: this pool's backend certificates are not verified; anyone on the path can pose as them"
        );
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

/// Binds the listener of config key `what`, naming it if that fails.
async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
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
    let accepting = Accepting {
        proxy: Arc::clone(&proxy),
        limit: connection_limit,
        builders,
        tracker: Arc::clone(&tracker),
        stop: stop_accepting,
        metrics: Arc::clone(&metrics),
    };
    accept_tasks.push(tokio::spawn(accept_loop(
        proxy_listener,
        plain,
        accepting.clone(),
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
            accepting,
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
