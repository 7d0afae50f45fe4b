//! The admin listener: liveness, readiness and the traffic-control API. Handlers only
//! translate HTTP to `Control` calls; every change is made (and persisted) there.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::control::{BackendView, CanaryRequest, ControlError, PoolView, ServiceView};
use crate::state::{BackendMode, MemberSpec};

mod shared;

pub use shared::{
    record_reload, ConfigReloadError, Lifecycle, ListenAddrs, ProcessInfo, ReloadError, Shared,
    UpgradeRefusal, Upgraded,
};

/// Longest `wait-drained` long poll.
const MAX_WAIT: Duration = Duration::from_secs(600);

pub fn app(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/api/v1/state", get(state))
        .route("/api/v1/services/{service}/switch", post(switch))
        .route(
            "/api/v1/services/{service}/canary",
            axum::routing::put(set_canary).delete(abort_canary),
        )
        .route("/api/v1/services/{service}/promote", post(promote))
        .route("/api/v1/services/{service}/rollback", post(rollback))
        .route("/api/v1/services/{service}/history", get(history))
        .route("/api/v1/pools/{pool}/backends/{addr}/drain", post(drain))
        .route(
            "/api/v1/pools/{pool}/backends/{addr}/disable",
            post(disable),
        )
        .route("/api/v1/pools/{pool}/backends/{addr}/enable", post(enable))
        .route(
            "/api/v1/pools/{pool}/backends/{addr}/wait-drained",
            get(wait_drained),
        )
        .route("/api/v1/pools/{pool}", get(pool_view))
        .route("/api/v1/tls", get(tls_view))
        .route("/api/v1/config/reload", post(config_reload))
        .route("/api/v1/info", get(info))
        .route("/api/v1/upgrade", post(upgrade))
        .route("/api/v1/cluster", get(cluster_view))
        .route("/api/v1/cluster/converged", get(cluster_converged))
        .route("/api/v1/tls/reload", post(tls_reload))
        .route(
            "/api/v1/pools/{pool}/backends",
            axum::routing::put(set_members).post(add_member),
        )
        .route(
            "/api/v1/pools/{pool}/backends/{addr}",
            axum::routing::delete(remove_member),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            wait_converged,
        ))
        // `layer`, not `route_layer`: unknown paths need the token too, so the API's
        // shape is not revealed to callers without it.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            require_token,
        ));
    // Whether `/metrics` needs the token is read per scrape: a reload may change it.
    let metrics =
        Router::new()
            .route("/metrics", get(metrics))
            .route_layer(middleware::from_fn_with_state(
                Arc::clone(&shared),
                require_token_for_metrics,
            ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(metrics)
        .merge(api)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            close_when_stopping,
        ))
        .layer(middleware::map_response(errors_as_json))
        .with_state(shared)
}

/// Largest admin request body: a full pool of `max_backends_per_pool` weighted
/// backends fits many times over.
const MAX_BODY: usize = 1 << 20;

/// axum's own rejections (a body over the limit, a path that does not decode, a
/// wrong content type) answer in plain text; every error of this API is
/// `{"error", "code"}`, so those are rewritten here, with the same status.
async fn errors_as_json(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let text = match axum::body::to_bytes(response.into_body(), 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError::new(status, code, message).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    // Rendering walks every series: at thousands of backends, milliseconds that must
    // not be taken from a worker serving requests.
    let metrics = Arc::clone(shared.control.metrics());
    let body = tokio::task::spawn_blocking(move || metrics.render())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if !shared.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !shared.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "first health-check round not finished\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// `{"error", "code"}` with the status the contract gives each case.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<(&'static str, serde_json::Value)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!("admin change failed: {e}");
        }
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.message, "code": self.code });
        if let Some((key, value)) = self.extra {
            body[key] = value;
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.code == "cluster-unavailable" {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[derive(Serialize)]
struct CertificateView {
    cert_file: String,
    names: Vec<String>,
    /// RFC 3339, UTC.
    not_after: Option<String>,
}

fn certificate_views(certs: &[crate::tls::CertificateInfo]) -> serde_json::Value {
    let views: Vec<CertificateView> = certs
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
    serde_json::json!({ "certificates": views })
}

fn tls_not_configured() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no [proxy.tls] listener is configured",
    )
}

/// The certificates the HTTPS listener is using now.
async fn tls_view(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let certificates = shared
        .certificates
        .load_full()
        .ok_or_else(tls_not_configured)?;
    Ok(Json(certificate_views(&certificates.current().info)).into_response())
}

/// Reads the certificate files again. A bad file is refused with 400 and the reason,
/// and the certificates in use stay.
async fn tls_reload(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    match shared.reload_tls().await {
        Ok(info) => Ok(Json(certificate_views(&info)).into_response()),
        Err(ReloadError::NotConfigured) => Err(tls_not_configured()),
        Err(ReloadError::Refused(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "tls_reload_refused",
            format!("{e}; the previous certificates stay in use"),
        )),
    }
}

/// Re-reads the whole config file: 200 `{"generation", "changes"}`, or 400 with the
/// same text as `switchyard check` and nothing changed.
async fn config_reload(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    // Its own task, as for every change: a client hanging up must not cut it in half.
    let reloaded = tokio::spawn(async move { shared.reload_config().await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match reloaded {
        Ok(reloaded) => Ok(answer(reloaded.generation, &reloaded)),
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

/// Hands the listeners to a new process started from this one's executable path; 200
/// once the new process serves, with both pids. This process then drains and exits.
async fn upgrade(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let upgraded = tokio::spawn(async move { shared.upgrade().await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match upgraded {
        Ok(done) => Ok(Json(done).into_response()),
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

/// `GET /api/v1/cluster`: this instance's connectivity and the live members.
async fn cluster_view(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let cluster = shared.control.cluster().ok_or_else(no_cluster)?;
    Ok(Json(cluster_json(&shared, cluster).await).into_response())
}

async fn cluster_json(shared: &Shared, cluster: &crate::cluster::Cluster) -> serde_json::Value {
    let members = cluster.members().await.unwrap_or_default();
    serde_json::json!({
        "name": cluster.name(),
        "connected": cluster.is_connected(),
        "generation": shared.control.generation().await,
        "members": members,
    })
}

#[derive(Deserialize)]
struct ConvergedQuery {
    generation: u64,
    #[serde(default)]
    timeout: Option<String>,
}

/// How long `converged` and `?wait=converged` wait: `timeout=`, default 10s, at most 10m.
fn converge_timeout(text: Option<&str>) -> Result<Duration, ApiError> {
    match text {
        None => Ok(Duration::from_secs(10)),
        Some(text) => humantime::parse_duration(text)
            .map(|d| d.min(Duration::from_secs(600)))
            .map_err(|e| ApiError::bad_request(format!("timeout `{text}`: {e}"))),
    }
}

/// `GET /api/v1/cluster/converged?generation=N&timeout=10s`: 200 once every live
/// member has applied N, 504 naming the laggards.
async fn cluster_converged(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<ConvergedQuery>,
) -> Result<Response, ApiError> {
    let cluster = shared.control.cluster().ok_or_else(no_cluster)?;
    let timeout = converge_timeout(query.timeout.as_deref())?;
    converged_answer(cluster, query.generation, timeout).await
}

async fn converged_answer(
    cluster: &crate::cluster::Cluster,
    generation: u64,
    timeout: Duration,
) -> Result<Response, ApiError> {
    match cluster.converged(generation, timeout).await {
        Ok(()) => Ok(
            Json(serde_json::json!({ "generation": generation, "converged": true }))
                .into_response(),
        ),
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

/// `?wait=converged` on a change: answer once every live member has applied it (504,
/// naming the laggards, if that takes longer than `timeout`; the change stands).
async fn wait_converged(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let query = request.uri().query().unwrap_or("").to_string();
    let waits = request.method() != axum::http::Method::GET
        && query.split('&').any(|kv| kv == "wait=converged");
    if !waits {
        return next.run(request).await;
    }
    let timeout = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("timeout="))
        .map(str::to_string);
    let response = next.run(request).await;
    let Some(cluster) = shared.control.cluster() else {
        return response;
    };
    if !response.status().is_success() {
        return response;
    }
    let generation = shared.control.generation().await;
    let timeout = match converge_timeout(timeout.as_deref()) {
        Ok(timeout) => timeout,
        Err(e) => return e.into_response(),
    };
    match converged_answer(cluster, generation, timeout).await {
        Ok(_) => response,
        Err(e) => e.into_response(),
    }
}

/// This process: version, pid, start time, config file, generation and listeners.
async fn info(State(shared): State<Arc<Shared>>) -> Response {
    let generation = shared.control.generation().await;
    let info = &shared.info;
    let listen = **shared.listen.load();
    Json(serde_json::json!({
        "version": info.version,
        "pid": info.pid,
        "started_at": info.started_at,
        "config_path": info.config_path,
        "generation": generation,
        "listen": listen,
        "cluster": match shared.control.cluster() {
            Some(cluster) => cluster_json(&shared, cluster).await,
            None => serde_json::Value::Null,
        },
    }))
    .into_response()
}

/// A successful answer: the JSON view, with its generation also as `ETag`.
fn answer<T: Serialize>(generation: u64, value: &T) -> Response {
    let mut response = Json(value).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{generation}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// Once the process is stopping or has handed over, every answer says
/// `Connection: close`: the client reconnects (to the new process, after an upgrade)
/// instead of reusing a connection this process will close.
async fn close_when_stopping(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    if !shared.ready.load(Ordering::SeqCst) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn require_token_for_metrics(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    if shared.metrics_require_token.load(Ordering::Relaxed) {
        require_token(State(shared), request, next).await
    } else {
        next.run(request).await
    }
}

async fn require_token(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let token = shared.token.load_full();
    let Some(token) = token.as_deref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong bearer token",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this admin API needs \"Authorization: Bearer <token>\"",
        )
        .into_response(),
    }
}

/// Compares without an early exit, so the time taken does not reveal how much of a
/// guessed token was right. (The length is not secret.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method (see docs/admin-api.md)",
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersBody {
    backends: Vec<MemberEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a backend: \"IP:port\" or {\"addr\": \"IP:port\", \"weight\": N}"
)]
enum MemberEntry {
    Addr(String),
    Weighted(MemberSpec),
}

impl From<MemberEntry> for MemberSpec {
    fn from(entry: MemberEntry) -> MemberSpec {
        match entry {
            MemberEntry::Addr(addr) => MemberSpec { addr, weight: 1 },
            MemberEntry::Weighted(spec) => spec,
        }
    }
}

impl Default for MemberSpec {
    fn default() -> Self {
        MemberSpec {
            addr: String::new(),
            weight: 1,
        }
    }
}

fn drain_timeout(
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Duration, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let timeout = match query.timeout.as_deref() {
        None => Duration::from_secs(30),
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            ApiError::bad_request(format!("timeout `{text}`: {e} (use e.g. \"30s\")"))
        })?,
    };
    if timeout > MAX_WAIT {
        return Err(ApiError::bad_request("timeout must be at most 10m"));
    }
    Ok(timeout)
}

async fn pool_view(
    State(shared): State<Arc<Shared>>,
    Path(pool): Path<String>,
) -> Result<Response, ApiError> {
    let view = shared.control.pool_view(&pool).await?;
    Ok(answer(view.generation(), &view))
}

async fn set_members(
    State(shared): State<Arc<Shared>>,
    Path(pool): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let timeout = drain_timeout(query)?;
    change(
        &headers,
        &body,
        Body::Required,
        |body: MembersBody, expected| async move {
            let members = body.backends.into_iter().map(MemberSpec::from).collect();
            Ok(shared
                .control
                .set_members(&pool, members, timeout, expected)
                .await?)
        },
    )
    .await
}

async fn add_member(
    State(shared): State<Arc<Shared>>,
    Path(pool): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    change(
        &headers,
        &body,
        Body::Required,
        |member: MemberSpec, expected| async move {
            Ok(shared.control.add_member(&pool, member, expected).await?)
        },
    )
    .await
}

async fn remove_member(
    State(shared): State<Arc<Shared>>,
    Path((pool, addr)): Path<(String, String)>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let timeout = drain_timeout(query)?;
    change(
        &headers,
        &Bytes::new(),
        Body::Ignored,
        |(): (), expected| async move {
            Ok(shared
                .control
                .remove_member(&pool, &addr, timeout, expected)
                .await?)
        },
    )
    .await
}

/// The generation a change's answer carries as its `ETag`.
trait Generation {
    fn generation(&self) -> u64;
}

impl Generation for ServiceView {
    fn generation(&self) -> u64 {
        self.generation
    }
}

impl Generation for BackendView {
    fn generation(&self) -> u64 {
        self.generation
    }
}

impl Generation for PoolView {
    fn generation(&self) -> u64 {
        self.backends.first().map_or(0, |b| b.generation)
    }
}

/// What a change takes as its body.
#[derive(Clone, Copy)]
enum Body {
    /// A JSON object.
    Required,
    /// A JSON object, or nothing (the type's default).
    Optional,
    /// Whatever is sent is not read (DELETE).
    Ignored,
}

/// Every change has this shape: `If-Match`, the body parsed strictly, one `Control`
/// call, and the new view with its generation as `ETag`.
async fn change<B, V, Fut>(
    headers: &HeaderMap,
    body: &Bytes,
    kind: Body,
    call: impl FnOnce(B, Option<u64>) -> Fut,
) -> Result<Response, ApiError>
where
    B: DeserializeOwned + Default,
    V: Serialize + Generation + Send + 'static,
    Fut: std::future::Future<Output = Result<V, ApiError>> + Send + 'static,
{
    let expected = if_match(headers)?;
    let body = match kind {
        Body::Required => parse_body(body, false)?,
        Body::Optional => parse_body(body, true)?,
        Body::Ignored => B::default(),
    };
    // On a task of its own: a client that hangs up mid-change drops this handler, and a
    // change cut off between its save and its swap would be on disk but not in force.
    let view = tokio::spawn(call(body, expected)).await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    })??;
    Ok(answer(view.generation(), &view))
}

/// `If-Match: 5` or `If-Match: "5"`; absent means unconditional.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse().map(Some).map_err(|_| {
        ApiError::bad_request(format!(
            "If-Match must be a generation number, got `{text}`"
        ))
    })
}

/// Parses a JSON body strictly (unknown fields and wrong types are errors); an empty
/// body means the type's default when `optional`.
fn parse_body<T: DeserializeOwned + Default>(body: &Bytes, optional: bool) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return if optional {
            Ok(T::default())
        } else {
            Err(ApiError::bad_request("a JSON body is required"))
        };
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    // serde would also take a struct from an array of its fields; the API takes objects.
    if !value.is_object() {
        return Err(ApiError::bad_request("the JSON body must be an object"));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

async fn state(State(shared): State<Arc<Shared>>) -> Response {
    let view = shared.control.view().await;
    answer(view.generation, &view)
}

async fn history(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
) -> Result<Response, ApiError> {
    let view = shared.control.history(&service).await?;
    Ok(answer(view.generation, &view))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchBody {
    to: String,
    #[serde(default)]
    force: bool,
}

async fn switch(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    change(
        &headers,
        &body,
        Body::Required,
        |body: SwitchBody, expected| async move {
            if body.to.is_empty() {
                return Err(ApiError::bad_request("`to` must name a pool"));
            }
            Ok(shared
                .control
                .switch(&service, &body.to, body.force, expected)
                .await?)
        },
    )
    .await
}

impl Default for CanaryRequest {
    fn default() -> Self {
        CanaryRequest {
            pool: String::new(),
            weight: f64::NAN,
            header: None,
            cookie: None,
            sticky: None,
            force: false,
        }
    }
}

async fn set_canary(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    change(
        &headers,
        &body,
        Body::Required,
        |body: CanaryRequest, expected| async move {
            Ok(shared.control.set_canary(&service, body, expected).await?)
        },
    )
    .await
}

async fn abort_canary(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    change(&headers, &Bytes::new(), Body::Ignored, |(): (), expected| async move {
        Ok(shared.control.abort_canary(&service, expected).await?)
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceBody {
    #[serde(default)]
    force: bool,
}

async fn promote(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    change(
        &headers,
        &body,
        Body::Optional,
        |body: ForceBody, expected| async move {
            Ok(shared
                .control
                .promote(&service, body.force, expected)
                .await?)
        },
    )
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

async fn rollback(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    change(&headers, &body, Body::Optional, |_: EmptyBody, expected| async move {
        Ok(shared.control.rollback(&service, expected).await?)
    })
    .await
}

/// `drain`, `disable` and `enable` differ only in the mode they set.
macro_rules! backend_mode_handler {
    ($name:ident, $mode:expr) => {
        async fn $name(
            State(shared): State<Arc<Shared>>,
            Path((pool, addr)): Path<(String, String)>,
            headers: HeaderMap,
            body: Bytes,
        ) -> Result<Response, ApiError> {
            change(
                &headers,
                &body,
                Body::Optional,
                |_: EmptyBody, expected| async move {
                    Ok(shared
                        .control
                        .set_backend_mode(&pool, &addr, $mode, expected)
                        .await?)
                },
            )
            .await
        }
    };
}

backend_mode_handler!(drain, Some(BackendMode::Draining));
backend_mode_handler!(disable, Some(BackendMode::Disabled));
backend_mode_handler!(enable, None);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    timeout: Option<String>,
}

/// Long poll until the backend has nothing in flight (200), or `timeout` (default 30s)
/// passes (408 with the count still in flight).
async fn wait_drained(
    State(shared): State<Arc<Shared>>,
    Path((pool, addr)): Path<(String, String)>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let timeout = drain_timeout(query)?;
    let backend = shared.control.find_backend(&pool, &addr)?;
    let deadline = Instant::now() + timeout;
    // In a fleet, the drain must have reached, and emptied, every instance.
    let drained_at = shared.control.generation().await;
    loop {
        let in_flight = backend.in_flight();
        if in_flight == 0 {
            if let Some(cluster) = shared.control.cluster() {
                let key = format!("{pool}/{}", backend.name);
                let until = tokio::time::Instant::from_std(deadline);
                if let Err(busy) = cluster.drained_elsewhere(&key, drained_at, until).await {
                    let names: Vec<String> = busy
                        .iter()
                        .map(|m| {
                            format!(
                                "{} ({} in flight)",
                                m.name,
                                m.in_flight.get(&key).copied().unwrap_or(0)
                            )
                        })
                        .collect();
                    let mut error = ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!(
                            "{} still busy on other instances after {timeout:?}: {}",
                            backend.name,
                            if names.is_empty() {
                                "etcd unreachable".to_string()
                            } else {
                                names.join(", ")
                            }
                        ),
                    );
                    let total: u64 = busy.iter().filter_map(|m| m.in_flight.get(&key)).sum();
                    error.extra = Some(("in_flight", serde_json::json!(total)));
                    return Err(error);
                }
            }
            let generation = shared.control.generation().await;
            return Ok(answer(
                generation,
                &serde_json::json!({
                    "pool": pool, "addr": backend.name.as_ref(), "in_flight": 0,
                    "state": backend.admin_state().as_str(),
                }),
            ));
        }
        if Instant::now() >= deadline {
            let mut error = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "{in_flight} requests still in flight on {} after {timeout:?}",
                    backend.name
                ),
            );
            error.extra = Some(("in_flight", serde_json::json!(in_flight)));
            return Err(error);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::control::Control;
    use axum::body::Body;
    use std::sync::atomic::AtomicBool;
    use tower::ServiceExt;

    fn shared(dir: &std::path::Path, token: Option<&str>) -> Arc<Shared> {
        let src = format!(
            "[state]\npath = \"{}/state.json\"\n[pools.p]\nbackends=[\"127.0.0.1:1\"]\n[pools.q]\nbackends=[\"127.0.0.1:2\"]\n[services.s]\nactive=\"p\"\n",
            dir.display()
        );
        let config = Config::parse(&src, std::path::Path::new("t.toml")).unwrap();
        Arc::new(Shared {
            control: Arc::new(Control::start(config, Default::default()).unwrap()),
            ready: AtomicBool::new(true),
            token: arc_swap::ArcSwapOption::from_pointee(token.map(String::from)),
            metrics_require_token: AtomicBool::new(false),
            certificates: arc_swap::ArcSwapOption::empty(),
            info: ProcessInfo::now(std::path::Path::new("t.toml")),
            listen: arc_swap::ArcSwap::from_pointee(ListenAddrs {
                proxy: "127.0.0.1:1".parse().unwrap(),
                tls: None,
                admin: "127.0.0.1:2".parse().unwrap(),
            }),
            lifecycle: std::sync::OnceLock::new(),
            handed_over: tokio::sync::Notify::new(),
            stop_admin_accepting: tokio::sync::watch::channel(false).0,
        })
    }

    async fn call(
        app: Router,
        request: axum::http::Request<Body>,
    ) -> (StatusCode, serde_json::Value) {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    fn get(path: &str) -> axum::http::Request<Body> {
        axum::http::Request::get(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn readyz_turns_503_when_shutdown_begins() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path(), None);
        let status = |s| async move { app(s).oneshot(get("/readyz")).await.unwrap().status() };
        assert_eq!(
            status(Arc::clone(&shared)).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready before the first health-check round"
        );
        for pool in &shared.table().load().pools {
            for backend in &pool.backends {
                backend.set_health(crate::backend::Health::Unhealthy);
            }
        }
        assert_eq!(status(Arc::clone(&shared)).await, StatusCode::OK);
        shared.ready.store(false, Ordering::SeqCst);
        assert_eq!(
            status(Arc::clone(&shared)).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            app(shared).oneshot(get("/healthz")).await.unwrap().status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn api_calls_need_the_token_but_probes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path(), Some("t0ken"));
        let (status, body) = call(app(Arc::clone(&shared)), get("/api/v1/state")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["code"], "unauthorized");
        let wrong = axum::http::Request::get("/api/v1/state")
            .header("authorization", "Bearer t0kex")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            call(app(Arc::clone(&shared)), wrong).await.0,
            StatusCode::UNAUTHORIZED
        );
        let right = axum::http::Request::get("/api/v1/state")
            .header("authorization", "Bearer t0ken")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            call(app(Arc::clone(&shared)), right).await.0,
            StatusCode::OK
        );
        assert_eq!(
            app(shared).oneshot(get("/healthz")).await.unwrap().status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn unknown_endpoints_answer_json_404() {
        let dir = tempfile::tempdir().unwrap();
        let (status, body) = call(app(shared(dir.path(), None)), get("/api/v1/nope")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["code"], "not_found");
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
