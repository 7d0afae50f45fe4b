//! The whole-config reload (SIGHUP, `POST /api/v1/config/reload`): read and check the
//! file and everything it names, bind any new listening address, commit the traffic
//! side through `Control::reload`, then swap what new connections are served with and
//! close the listeners that moved. Any failure before the commit changes nothing;
//! after it nothing can fail.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::downstream::Builders;
use super::listener::{Accepting, ListenerKind, Serving, TlsServing};
use super::{local_addr, Bound};
use crate::accesslog::AccessLog;
use crate::admin::{ConfigReloadError, Lifecycle, ListenAddrs, Shared, UpgradeRefusal, Upgraded};
use crate::config::{Config, ConfigChange};
use crate::control::{Control, Reloaded};
use crate::proxy::{Proxy, ProxySettings};
use crate::setup::Setup;

/// What the lifecycle and reloads share.
pub(super) struct Runtime {
    pub(super) shared: Arc<Shared>,
    pub(super) accepting: Accepting,
    /// One binary upgrade at a time.
    pub(super) upgrading: std::sync::atomic::AtomicBool,
    /// Set once an upgrade has handed over: the lifecycle drains and stops.
    pub(super) handover: tokio::sync::watch::Sender<bool>,
    /// Held by a reload and, for good, by the shutdown: one at a time.
    pub(super) live: tokio::sync::Mutex<Live>,
}

/// What a reload replaces besides the serving settings.
pub(super) struct Live {
    /// The config the listeners, limits and logs follow.
    pub(super) config: Arc<Config>,
    pub(super) max_connections: usize,
    pub(super) plain: Bound,
    pub(super) tls: Option<Bound>,
    pub(super) admin: Bound,
    pub(super) file_watcher: Option<JoinHandle<()>>,
    pub(super) access_log: Option<Arc<AccessLog>>,
    pub(super) shutting_down: bool,
}

/// The serving settings for `config`: the proxy with its timeouts, log and metrics,
/// the hyper builders, h2c, the HTTPS redirect and the TLS acceptor.
pub(super) fn serving(
    config: &Config,
    control: &Control,
    access_log: Option<Arc<AccessLog>>,
    tls: Option<Arc<rustls::ServerConfig>>,
    tls_addr: Option<SocketAddr>,
) -> Serving {
    let metrics = control.metrics();
    let proxy = Arc::new(Proxy {
        table: Arc::clone(control.table()),
        settings: ProxySettings {
            connect_timeout: config.proxy.connect_timeout,
            upstream_header_timeout: config.proxy.upstream_header_timeout,
            upstream_body_timeout: config.proxy.upstream_body_timeout,
            connect_attempts: config.proxy.connect_attempts,
            max_request_body: config.proxy.max_request_body,
            client_body_timeout: config.proxy.client_body_timeout,
            mirror_max_body: config.proxy.mirror_max_body,
        },
        mirror: control.mirror_queue(),
        client_body_timeouts: metrics.client_body_timeouts.clone(),
        metrics: config.metrics.enabled.then(|| Arc::clone(metrics)),
        access_log,
    });
    let tls_settings = config.proxy.tls.as_ref();
    Serving {
        proxy,
        builders: Arc::new(Builders::new(&config.proxy)),
        h2c: config.proxy.h2c,
        redirect_to_port: tls_settings.filter(|t| t.redirect_http).map(|t| {
            t.redirect_port
                .unwrap_or_else(|| tls_addr.map_or(t.listen.port(), |a| a.port()))
        }),
        tls: tls.zip(tls_settings).map(|(server_config, t)| TlsServing {
            acceptor: tokio_rustls::TlsAcceptor::from(server_config),
            handshake_timeout: t.handshake_timeout,
            handshakes: Arc::new(Semaphore::new(t.max_handshakes)),
        }),
    }
}

/// Polls the listener's certificate files, when `reload_interval` asks for it.
pub(super) fn watch_certificates(config: &Config, shared: &Arc<Shared>) -> Option<JoinHandle<()>> {
    let tls = config.proxy.tls.as_ref()?;
    let certificates = shared.certificates.load_full()?;
    if tls.reload_interval.is_zero() {
        return None;
    }
    let metrics = Arc::clone(shared.control.metrics());
    Some(tokio::spawn(crate::tls::watch_files(
        certificates,
        tls.reload_interval,
        move |result| {
            tracing::info!("certificate files changed on disk");
            crate::admin::record_reload(&metrics, result);
        },
    )))
}

/// Keys that take effect only in a new process (a restart or an upgrade).
fn mark_needs_restart(changes: &mut [ConfigChange]) {
    for change in changes.iter_mut() {
        if change.key == "proxy.workers" || change.key == "state.path" || change.key == "cluster" {
            change.change = "needs_restart";
            change.detail = format!(
                "{} (takes effect when the process restarts or is upgraded)",
                change.detail
            );
        }
    }
}

/// A socket bound for a listener whose address changed.
struct Rebound {
    what: &'static str,
    configured: SocketAddr,
    listener: TcpListener,
}

async fn rebind(
    what: &'static str,
    old: Option<SocketAddr>,
    new: Option<SocketAddr>,
) -> Result<Option<Rebound>, ConfigReloadError> {
    match new {
        Some(addr) if old != Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ConfigReloadError::Bind { what, addr, source })?;
            Ok(Some(Rebound {
                what,
                configured: addr,
                listener,
            }))
        }
        _ => Ok(None),
    }
}

impl Runtime {
    async fn reload_now(&self) -> Result<Reloaded, ConfigReloadError> {
        let mut live = self.live.lock().await;
        if live.shutting_down {
            return Err(ConfigReloadError::ShuttingDown);
        }
        let path = live.config.origin.path().to_path_buf();
        let setup = tokio::task::spawn_blocking(move || -> Result<Setup, ConfigReloadError> {
            Ok(Setup::new(Config::load(&path)?)?)
        })
        .await
        // Loading cannot panic short of a bug, which is passed on as it is.
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        let Setup {
            mut config,
            admin_token,
            upstreams,
            listener_tls,
        } = setup;
        let mut changes = config.changes_from(&live.config);
        mark_needs_restart(&mut changes);
        // What only a new process can change stays as it is.
        config.proxy.workers = live.config.proxy.workers;
        config.state.path = live.config.state.path.clone();
        config.cluster = live.config.cluster.clone();

        // New sockets first: if one cannot be bound, nothing has changed yet.
        let new_plain = rebind(
            "proxy.listen",
            Some(live.plain.configured),
            Some(config.proxy.listen),
        )
        .await?;
        let new_tls = rebind(
            "proxy.tls.listen",
            live.tls.as_ref().map(|b| b.configured),
            config.proxy.tls.as_ref().map(|t| t.listen),
        )
        .await?;
        let new_admin = rebind(
            "admin.listen",
            Some(live.admin.configured),
            Some(config.admin.listen),
        )
        .await?;

        let control = Arc::clone(&self.shared.control);
        let reloaded = control.reload(config.clone(), upstreams, changes).await?;
        control.start_name_refresh();

        // Committed: from here on nothing fails.
        let access_log = if config.log == live.config.log {
            live.access_log.clone()
        } else {
            AccessLog::start(&config.log, control.metrics().access_log_dropped.clone())
        };
        let previous = **self.shared.listen.load();
        let tls_addr = match (&new_tls, &config.proxy.tls) {
            (Some(bound), Some(t)) => Some(local_addr(&bound.listener, t.listen)),
            (None, Some(_)) => previous.tls,
            (_, None) => None,
        };
        self.shared.token.store(admin_token.map(Arc::new));
        self.shared
            .metrics_require_token
            .store(config.admin.metrics_require_token, Ordering::Relaxed);
        let server_config = listener_tls.as_ref().map(|t| Arc::clone(&t.server_config));
        self.shared
            .certificates
            .store(listener_tls.map(|t| t.certificates));
        if let Some(certificates) = self.shared.certificates.load_full() {
            super::announce_certificates(control.metrics(), &certificates);
        }
        if let Some(watcher) = live.file_watcher.take() {
            watcher.abort();
        }
        live.file_watcher = watch_certificates(&config, &self.shared);
        self.accepting.serving.store(Arc::new(serving(
            &config,
            &control,
            access_log.clone(),
            server_config,
            tls_addr,
        )));
        self.resize_limit(&mut live, config.proxy.max_connections);

        let mut listen = ListenAddrs {
            tls: tls_addr,
            ..previous
        };
        let mut closing = Vec::new();
        if let Some(bound) = new_plain {
            listen.proxy = local_addr(&bound.listener, bound.configured);
            let next = Bound::accepting(
                bound.configured,
                bound.listener,
                ListenerKind::Plain,
                &self.accepting,
            );
            closing.push((bound.what, std::mem::replace(&mut live.plain, next).close()));
        }
        if let Some(bound) = new_tls {
            let next = Bound::accepting(
                bound.configured,
                bound.listener,
                ListenerKind::Tls,
                &self.accepting,
            );
            if let Some(old) = live.tls.replace(next) {
                closing.push((bound.what, old.close()));
            }
        } else if config.proxy.tls.is_none() {
            if let Some(old) = live.tls.take() {
                closing.push(("proxy.tls.listen", old.close()));
            }
        }
        if let Some(bound) = new_admin {
            listen.admin = local_addr(&bound.listener, bound.configured);
            let next = Bound::admin(bound.configured, bound.listener, &self.shared);
            closing.push((bound.what, std::mem::replace(&mut live.admin, next).close()));
        }
        self.shared.listen.store(Arc::new(listen));
        for (what, task) in closing {
            tracing::info!(
                what,
                "listener moved: the old socket is closed, its connections finish"
            );
            // The admin listener's old loop waits for its open connections (this very
            // call among them), so it is not awaited here.
            tokio::spawn(async move {
                if tokio::time::timeout(Duration::from_secs(3600), task)
                    .await
                    .is_err()
                {
                    tracing::warn!(what, "an old listener is still draining after an hour");
                }
            });
        }
        live.access_log = access_log;
        // The same config the control plane now holds, not a second copy of it.
        live.config = control.config();
        Ok(reloaded)
    }

    /// Grows or shrinks the connection limit to `wanted`. Shrinking takes only the free
    /// permits at once; connections over the new limit finish normally.
    fn resize_limit(&self, live: &mut Live, wanted: usize) {
        let limit = &self.accepting.limit;
        if wanted > live.max_connections {
            limit.add_permits(wanted - live.max_connections);
            live.max_connections = wanted;
        } else if wanted < live.max_connections {
            let taken = limit.forget_permits(live.max_connections - wanted);
            live.max_connections -= taken;
        }
    }
}

impl Lifecycle for Runtime {
    fn reload(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Reloaded, ConfigReloadError>> + Send + '_>> {
        Box::pin(self.reload_now())
    }

    fn upgrade(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Upgraded, UpgradeRefusal>> + Send + '_>> {
        Box::pin(self.upgrade_now())
    }
}
