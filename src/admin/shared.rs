//! What the admin API and the lifecycle share with the data plane: the control plane,
//! readiness, the token, and the HTTPS listener's certificates (reloaded from here).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::control::Control;
use crate::metrics::Metrics;
use crate::routing::RoutingTable;
use crate::tls::{CertStore, CertificateInfo, Certificates};

/// What the admin API and the lifecycle share with the data plane.
pub struct Shared {
    pub control: Arc<Control>,
    /// False once shutdown has begun: `/readyz` answers 503.
    pub ready: AtomicBool,
    pub token: Option<String>,
    pub metrics_require_token: bool,
    /// The HTTPS listener's certificates, when there is one.
    pub certificates: Option<Arc<Certificates>>,
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
        let certificates = self
            .certificates
            .as_ref()
            .ok_or(ReloadError::NotConfigured)?;
        let certs = Arc::clone(certificates);
        let result = tokio::task::spawn_blocking(move || certs.reload())
            .await
            .unwrap_or_else(|e| Err(crate::tls::TlsError::Rustls(e.to_string())));
        self.record_reload(&result);
        Ok(result?.info.clone())
    }

    fn record_reload(&self, result: &Result<Arc<CertStore>, crate::tls::TlsError>) {
        record_reload(self.control.metrics(), result);
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
