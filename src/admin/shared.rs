//! What the admin API and the lifecycle share with the data plane: the control plane,
//! readiness, the token, the HTTPS listener's certificates (reloaded from here), what
//! `/api/v1/info` tells, and the hook a config reload goes through (the lifecycle owns
//! the listeners, so it does the reload; the API and SIGHUP only ask for it).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::ConfigError;
use crate::control::{Control, ControlError, Reloaded};
use crate::metrics::Metrics;
use crate::routing::RoutingTable;
use crate::tls::{CertStore, CertificateInfo, Certificates};

/// What the admin API and the lifecycle share with the data plane.
pub struct Shared {
    pub control: Arc<Control>,
    /// False once shutdown has begun: `/readyz` answers 503.
    pub ready: AtomicBool,
    pub token: ArcSwapOption<String>,
    pub metrics_require_token: AtomicBool,
    /// The HTTPS listener's certificates, when there is one.
    pub certificates: ArcSwapOption<Certificates>,
    pub info: ProcessInfo,
    /// The addresses listened on now (a reload may move them).
    pub listen: ArcSwap<ListenAddrs>,
    /// Set once the lifecycle runs; a reload or upgrade asked for before that is
    /// refused.
    pub lifecycle: OnceLock<Arc<dyn Lifecycle>>,
    /// Notified when a binary upgrade has handed over: the process drains and exits.
    pub handed_over: tokio::sync::Notify,
    /// Set at a handover: the admin listener stops accepting (the new process has the
    /// same socket) but keeps the connections it has.
    pub stop_admin_accepting: tokio::sync::watch::Sender<bool>,
    /// Recent request rate, error rate and p99 per pool, for the status page.
    pub recent: Arc<crate::stats::RecentTraffic>,
}

/// What does not change while the process runs.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ProcessInfo {
    pub version: &'static str,
    pub pid: u32,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub config_path: String,
    /// The path this process was started from: an upgrade starts what is there now.
    #[serde(skip)]
    pub executable: std::path::PathBuf,
    #[serde(skip)]
    pub args: Vec<std::ffi::OsString>,
}

impl ProcessInfo {
    pub fn now(config_path: &std::path::Path) -> ProcessInfo {
        ProcessInfo {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            started_at: crate::state::now_rfc3339(),
            config_path: config_path.display().to_string(),
            executable: std::env::current_exe().unwrap_or_default(),
            args: std::env::args_os().skip(1).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
pub struct ListenAddrs {
    #[schema(value_type = String)]
    pub proxy: SocketAddr,
    #[schema(value_type = Option<String>)]
    pub tls: Option<SocketAddr>,
    #[schema(value_type = String)]
    pub admin: SocketAddr,
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the admin API asks of whoever owns the listeners.
pub trait Lifecycle: Send + Sync {
    /// Re-reads the whole config file.
    fn reload(&self) -> Boxed<'_, Result<Reloaded, ConfigReloadError>>;
    /// Hands the listeners to a new process started from this one's executable path.
    fn upgrade(&self) -> Boxed<'_, Result<Upgraded, UpgradeRefusal>>;
}

/// A binary upgrade that has handed over: this process now drains and exits.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Upgraded {
    pub old_pid: u32,
    pub new_pid: u32,
    pub executable: String,
}

/// Why an upgrade did not happen; this process keeps serving.
#[derive(Debug, Clone)]
pub struct UpgradeRefusal {
    /// `upgrade_in_progress` (409), `upgrade_failed` (500), `not_running` (503).
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigReloadError {
    /// The file (or a file it names) is wrong: the same text as `switchyard check`.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}; nothing changed")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("shutting down: no reload")]
    ShuttingDown,
    #[error("the server is still starting: no reload yet")]
    NotRunning,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no [proxy.tls] listener is configured")]
    NotConfigured,
    #[error("{0}")]
    Refused(#[from] crate::tls::TlsError),
}

impl Shared {
    pub fn table(&self) -> &Arc<ArcSwap<RoutingTable>> {
        self.control.table()
    }

    /// Reads the certificate files again and swaps them in for new handshakes; on any
    /// error the certificates in use stay. Open connections are never touched.
    pub async fn reload_tls(&self) -> Result<Vec<CertificateInfo>, ReloadError> {
        let certs = self
            .certificates
            .load_full()
            .ok_or(ReloadError::NotConfigured)?;
        let result = tokio::task::spawn_blocking(move || certs.reload())
            .await
            .unwrap_or_else(|e| Err(crate::tls::TlsError::Rustls(e.to_string())));
        self.record_reload(&result);
        Ok(result?.info.clone())
    }

    fn record_reload(&self, result: &Result<Arc<CertStore>, crate::tls::TlsError>) {
        record_reload(self.control.metrics(), result);
    }

    /// Re-reads the whole config file (see `Lifecycle::reload`); on any error nothing
    /// changes, and the log says why.
    pub async fn reload_config(&self) -> Result<Reloaded, ConfigReloadError> {
        let lifecycle = self.lifecycle.get().ok_or(ConfigReloadError::NotRunning)?;
        let result = lifecycle.reload().await;
        if let Err(e) = &result {
            tracing::error!("config reload refused, nothing changed: {e}");
        }
        result
    }

    /// Starts a binary upgrade (see `Lifecycle::upgrade`); on failure the log says why.
    pub async fn upgrade(&self) -> Result<Upgraded, UpgradeRefusal> {
        let lifecycle = self.lifecycle.get().ok_or(UpgradeRefusal {
            code: "not_running",
            message: "the server is still starting: no upgrade yet".into(),
        })?;
        let result = lifecycle.upgrade().await;
        match &result {
            Ok(done) => tracing::info!(
                new_pid = done.new_pid,
                executable = %done.executable,
                "upgrade: the new process serves now; this one drains and exits"
            ),
            Err(e) => tracing::error!("upgrade refused, this process keeps serving: {}", e.message),
        }
        result
    }

    /// Ready to take traffic: not shutting down, and every backend checked once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.control.first_round_done()
    }
}

/// Counts and logs a certificate reload, whatever triggered it.
pub fn record_reload(metrics: &Metrics, result: &Result<Arc<CertStore>, crate::tls::TlsError>) {
    match result {
        Ok(store) => {
            metrics.tls_reloads.with_label_values(&["success"]).inc();
            metrics.set_certificates(&store.info);
            tracing::info!(
                certificates = store.info.len(),
                "certificates reloaded; new handshakes use them"
            );
        }
        Err(e) => {
            metrics.tls_reloads.with_label_values(&["failure"]).inc();
            tracing::error!(
                "certificate reload refused, the previous certificates stay in use: {e}"
            );
        }
    }
}
