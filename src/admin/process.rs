//! The process and its surroundings: what it runs, its certificates, a config reload, a
//! binary upgrade, and the fleet it belongs to.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::change::{answer, converge, convergence};
use super::error::{ApiError, AuthErrors, ErrorBody};
use super::openapi::ChangeQuery;
use super::shared::{ConfigReloadError, ListenAddrs, ProcessInfo, ReloadError, Upgraded};
use super::Shared;
use crate::cluster::{Cluster, Member};
use crate::control::Reloaded;

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct CertificateView {
    cert_file: String,
    names: Vec<String>,
    /// RFC 3339, UTC.
    not_after: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct CertificatesView {
    certificates: Vec<CertificateView>,
}

fn certificate_views(certs: &[crate::tls::CertificateInfo]) -> CertificatesView {
    let certificates = certs
        .iter()
        .map(|c| CertificateView {
            cert_file: c.cert_file.display().to_string(),
            names: c.names.clone(),
            not_after: c.not_after.and_then(|t| {
                let time = std::time::UNIX_EPOCH
                    .checked_add(std::time::Duration::from_secs(u64::try_from(t).ok()?))?;
                Some(humantime::format_rfc3339_seconds(time).to_string())
            }),
        })
        .collect();
    CertificatesView { certificates }
}

fn tls_not_configured() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no [proxy.tls] listener is configured",
    )
}

/// No HTTPS listener (`[proxy.tls]`) is configured.
#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
#[response(status = 404)]
pub(super) struct NoTls(ErrorBody);

/// The certificates the HTTPS listener is using now.
#[utoipa::path(get, path = "/api/v1/tls", tag = "process",
    responses((status = 200, body = CertificatesView), NoTls, AuthErrors))]
pub(super) async fn tls_view(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let certificates = shared
        .certificates
        .load_full()
        .ok_or_else(tls_not_configured)?;
    Ok(Json(certificate_views(&certificates.current().info)).into_response())
}

#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
pub(super) enum TlsRefused {
    /// A certificate file that does not load (the previous certificates stay in use),
    /// or a `wait`/`timeout` that is not valid.
    #[response(status = 400)]
    Refused(ErrorBody),
    /// `?wait=converged`: the fleet did not converge in time.
    #[response(status = 504)]
    NotConverged(ErrorBody),
}

/// Reads the certificate files again. A bad file is refused with 400 and the reason,
/// and the certificates in use stay.
#[utoipa::path(post, path = "/api/v1/tls/reload", tag = "process",
    params(ChangeQuery),
    responses((status = 200, body = CertificatesView), TlsRefused, NoTls, AuthErrors))]
pub(super) async fn tls_reload(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let wait = convergence(&uri)?;
    match shared.reload_tls().await {
        Ok(info) => {
            // Certificates are this instance's; the wait is for the state it serves.
            converge(&shared, shared.control.generation().await, wait).await?;
            Ok(Json(certificate_views(&info)).into_response())
        }
        Err(ReloadError::NotConfigured) => Err(tls_not_configured()),
        Err(ReloadError::Refused(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "tls_reload_refused",
            format!("{e}; the previous certificates stay in use"),
        )),
    }
}

#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
pub(super) enum ReloadErrors {
    /// `invalid_config`: the file does not pass `switchyard check`; nothing changed.
    #[response(status = 400)]
    Invalid(ErrorBody),
    /// `stale_generation` or `conflict`: the new topology does not fit the traffic
    /// state; nothing changed.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// `bind_failed` (a new listen address could not be bound) or `persist_failed`.
    #[response(status = 500)]
    Failed(ErrorBody),
    /// `not_running` (shutting down or still starting) or `cluster-unavailable`.
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// `?wait=converged`: not every fleet member applied it in time; it stands.
    #[response(status = 504)]
    NotConverged(ErrorBody),
}

/// Re-reads the whole config file: 200 `{"generation", "changes"}`, or 400 with the
/// same text as `switchyard check` and nothing changed.
#[utoipa::path(post, path = "/api/v1/config/reload", tag = "process",
    params(ChangeQuery),
    responses((status = 200, body = Reloaded, headers(("ETag" = String))), ReloadErrors, AuthErrors))]
pub(super) async fn config_reload(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let wait = convergence(&uri)?;
    // Its own task, as for every change: a client hanging up must not cut it in half.
    let reloading = Arc::clone(&shared);
    let reloaded = tokio::spawn(async move { reloading.reload_config().await })
        .await
        .map_err(ApiError::internal)?;
    match reloaded {
        Ok(reloaded) => {
            converge(&shared, reloaded.generation, wait).await?;
            Ok(answer(reloaded.generation, &reloaded))
        }
        Err(ConfigReloadError::Invalid(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_config",
            format!("{e}; nothing changed"),
        )),
        Err(ConfigReloadError::Control(e)) => Err(e.into()),
        Err(e @ ConfigReloadError::Bind { .. }) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "bind_failed",
            e.to_string(),
        )),
        Err(e @ (ConfigReloadError::ShuttingDown | ConfigReloadError::NotRunning)) => {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_running",
                e.to_string(),
            ))
        }
    }
}

#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
pub(super) enum UpgradeErrors {
    /// `upgrade_in_progress`.
    #[response(status = 409)]
    InProgress(ErrorBody),
    /// `upgrade_failed`: the new process did not start or did not get ready; this one
    /// keeps serving.
    #[response(status = 500)]
    Failed(ErrorBody),
    /// `not_running`.
    #[response(status = 503)]
    NotRunning(ErrorBody),
    /// A `wait` or `timeout` that is not valid; no upgrade was started.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `?wait=converged`: the fleet did not converge in time (the upgrade stands).
    #[response(status = 504)]
    NotConverged(ErrorBody),
}

/// Hands the listeners to a new process started from this one's executable path; 200
/// once the new process serves, with both pids. This process then drains and exits.
#[utoipa::path(post, path = "/api/v1/upgrade", tag = "process",
    params(ChangeQuery),
    responses((status = 200, body = Upgraded), UpgradeErrors, AuthErrors))]
pub(super) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let wait = convergence(&uri)?;
    let upgrading = Arc::clone(&shared);
    let upgraded = tokio::spawn(async move { upgrading.upgrade().await })
        .await
        .map_err(ApiError::internal)?;
    match upgraded {
        Ok(done) => {
            converge(&shared, shared.control.generation().await, wait).await?;
            Ok(Json(done).into_response())
        }
        Err(refusal) => {
            let status = match refusal.code {
                "upgrade_in_progress" => StatusCode::CONFLICT,
                "not_running" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(ApiError::new(status, refusal.code, refusal.message))
        }
    }
}

fn no_cluster() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no [cluster] is configured",
    )
}

/// No `[cluster]` is configured.
#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
#[response(status = 404)]
pub(super) struct NoCluster(ErrorBody);

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ClusterView {
    /// This instance's member name.
    name: String,
    /// Whether etcd answers.
    connected: bool,
    /// The generation applied here.
    generation: u64,
    /// The live members (empty when etcd does not answer).
    members: Vec<Member>,
}

/// This instance's connectivity and the live members.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses((status = 200, body = ClusterView), NoCluster, AuthErrors))]
pub(super) async fn cluster_view(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let cluster = shared.control.cluster().ok_or_else(no_cluster)?;
    Ok(Json(cluster_json(&shared, cluster).await).into_response())
}

async fn cluster_json(shared: &Shared, cluster: &Cluster) -> ClusterView {
    ClusterView {
        name: cluster.name().to_string(),
        connected: cluster.is_connected(),
        generation: shared.control.generation().await,
        members: cluster.members().await.unwrap_or_default(),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ConvergedQuery {
    /// The generation every member must have applied.
    generation: u64,
    /// How long to wait, e.g. `10s` (the default); at most `10m`.
    #[serde(default)]
    timeout: Option<String>,
}

/// How long `converged` and `?wait=converged` wait: `timeout=`, default 10s, at most 10m.
pub(super) fn converge_timeout(text: Option<&str>) -> Result<Duration, ApiError> {
    match text {
        None => Ok(Duration::from_secs(10)),
        Some(text) => humantime::parse_duration(text)
            .map(|d| d.min(Duration::from_secs(600)))
            .map_err(|e| ApiError::bad_request(format!("timeout `{text}`: {e}"))),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ConvergedView {
    generation: u64,
    converged: bool,
}

#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
pub(super) enum ConvergedErrors {
    /// A `generation` or `timeout` that does not parse.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Not every member applied it in time; `laggards` names them.
    #[response(status = 504)]
    NotConverged(ErrorBody),
}

/// 200 once every live member has applied `generation`, 504 naming the laggards.
#[utoipa::path(get, path = "/api/v1/cluster/converged", tag = "cluster",
    params(ConvergedQuery),
    responses((status = 200, body = ConvergedView), ConvergedErrors, NoCluster, AuthErrors))]
pub(super) async fn cluster_converged(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<ConvergedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let cluster = shared.control.cluster().ok_or_else(no_cluster)?;
    let timeout = converge_timeout(query.timeout.as_deref())?;
    converged_answer(cluster, query.generation, timeout).await
}

pub(super) async fn converged_answer(
    cluster: &Cluster,
    generation: u64,
    timeout: Duration,
) -> Result<Response, ApiError> {
    match cluster.converged(generation, timeout).await {
        Ok(()) => Ok(Json(ConvergedView {
            generation,
            converged: true,
        })
        .into_response()),
        Err(laggards) => {
            let names: Vec<&str> = laggards.iter().map(|m| m.name.as_str()).collect();
            let mut error = ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "not every member applied generation {generation} within {}: {}",
                    humantime::format_duration(timeout),
                    if names.is_empty() {
                        "etcd unreachable".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            );
            error.extra = Some(("laggards", serde_json::json!(laggards)));
            Err(error)
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct InfoView {
    #[serde(flatten)]
    process: ProcessInfo,
    generation: u64,
    listen: ListenAddrs,
    /// Absent without `[cluster]`.
    cluster: Option<ClusterView>,
}

/// This process: version, pid, start time, config file, generation and listeners.
#[utoipa::path(get, path = "/api/v1/info", tag = "process",
    responses((status = 200, body = InfoView), AuthErrors))]
pub(super) async fn info(State(shared): State<Arc<Shared>>) -> Response {
    let cluster = match shared.control.cluster() {
        Some(cluster) => Some(cluster_json(&shared, cluster).await),
        None => None,
    };
    Json(InfoView {
        process: shared.info.clone(),
        generation: shared.control.generation().await,
        listen: **shared.listen.load(),
        cluster,
    })
    .into_response()
}
