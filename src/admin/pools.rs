//! Pools and their backends: a pool's view, taking a backend out of rotation and back,
//! waiting for it to drain, and changing the membership.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use serde::Deserialize;

use super::change::{answer, change, Body, ChangeRequest, Generation};
use super::error::{ApiError, AuthErrors, ChangeErrors, DrainErrors, LookupErrors};
use super::openapi::{ChangeQuery, WaitFor};
use super::traffic::EmptyBody;
use super::Shared;
use crate::control::{BackendView, PoolView};
use crate::state::{BackendMode, MemberSpec};

/// Longest `wait-drained` long poll.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// A pool's backends with their health, state, weight and requests in flight.
#[utoipa::path(get, path = "/api/v1/pools/{pool}", tag = "pools",
    params(("pool" = String, Path)),
    responses((status = 200, body = PoolView, headers(("ETag" = String))), LookupErrors, AuthErrors))]
pub(super) async fn pool_view(
    State(shared): State<Arc<Shared>>,
    Path(pool): Path<String>,
) -> Result<Response, ApiError> {
    let view = shared.control.pool_view(&pool).await?;
    Ok(answer(view.generation(), &view))
}

/// `drain`, `disable` and `enable` differ only in the mode they set.
macro_rules! backend_mode_handler {
    ($name:ident, $path:literal, $mode:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "pools",
            params(("pool" = String, Path), ("addr" = String, Path, description = "the backend, IP:port"),
                ("If-Match" = Option<String>, Header), ChangeQuery),
            request_body(content = Option<EmptyBody>, description = "optional"),
            responses((status = 200, body = BackendView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
        pub(super) async fn $name(
            State(shared): State<Arc<Shared>>,
            Path((pool, addr)): Path<(String, String)>,
            uri: Uri,
    headers: HeaderMap,
            body: Bytes,
        ) -> Result<Response, ApiError> {
            change(
        ChangeRequest {
            shared: Arc::clone(&shared),
            uri: &uri,
            headers: &headers,
        },
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

backend_mode_handler!(
    drain,
    "/api/v1/pools/{pool}/backends/{addr}/drain",
    Some(BackendMode::Draining),
    "No new requests to this backend; those in flight finish."
);
backend_mode_handler!(
    disable,
    "/api/v1/pools/{pool}/backends/{addr}/disable",
    Some(BackendMode::Disabled),
    "Out of rotation, as for maintenance."
);
backend_mode_handler!(
    enable,
    "/api/v1/pools/{pool}/backends/{addr}/enable",
    None,
    "Back in rotation (health checks permitting)."
);

/// `timeout` of a wait for a backend to drain; `wait` belongs to the fleet-wide wait
/// of a change (see `ChangeQuery`).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct DrainQuery {
    /// How long to wait for requests in flight to finish, e.g. `30s` (the default);
    /// at most `10m`.
    timeout: Option<String>,
    /// `converged`: answer once every fleet member applied the change.
    #[allow(dead_code)]
    #[param(inline)]
    wait: Option<WaitFor>,
}

fn drain_timeout(
    query: Result<Query<DrainQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Duration, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    parse_timeout(query.timeout.as_deref())
}

fn parse_timeout(text: Option<&str>) -> Result<Duration, ApiError> {
    let timeout = match text {
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

/// `wait-drained` takes only its `timeout`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitDrainedQuery {
    /// How long to wait, e.g. `30s` (the default); at most `10m`.
    timeout: Option<String>,
}

/// What `wait-drained` answers once the backend is idle.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct DrainedView {
    pool: String,
    addr: String,
    in_flight: u64,
    state: &'static str,
}

/// Long poll until the backend has nothing in flight (200) here and, in a fleet, on
/// every member, or `timeout` (default 30s) passes (408 with the count still in flight).
#[utoipa::path(get, path = "/api/v1/pools/{pool}/backends/{addr}/wait-drained", tag = "pools",
    params(("pool" = String, Path), ("addr" = String, Path), WaitDrainedQuery),
    responses((status = 200, body = DrainedView, headers(("ETag" = String))), DrainErrors, LookupErrors, AuthErrors))]
pub(super) async fn wait_drained(
    State(shared): State<Arc<Shared>>,
    Path((pool, addr)): Path<(String, String)>,
    query: Result<Query<WaitDrainedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let timeout = parse_timeout(query.timeout.as_deref())?;
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
                &DrainedView {
                    pool,
                    addr: backend.name.to_string(),
                    in_flight: 0,
                    state: backend.admin_state().as_str(),
                },
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

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct MembersBody {
    backends: Vec<MemberEntry>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(
    untagged,
    expecting = "a backend: \"IP:port\" or {\"addr\": \"IP:port\", \"weight\": N}"
)]
pub(super) enum MemberEntry {
    /// `IP:port` (or `host:port`), weight 1.
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

/// Replaces the pool's backends: new ones join once healthy, removed ones drain first
/// (up to `timeout`).
#[utoipa::path(put, path = "/api/v1/pools/{pool}/backends", tag = "pools",
    params(("pool" = String, Path), ("If-Match" = Option<String>, Header), DrainQuery),
    request_body = MembersBody,
    responses((status = 200, body = PoolView, headers(("ETag" = String))), ChangeErrors, DrainErrors, AuthErrors))]
pub(super) async fn set_members(
    State(shared): State<Arc<Shared>>,
    Path(pool): Path<String>,
    query: Result<Query<DrainQuery>, axum::extract::rejection::QueryRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let timeout = drain_timeout(query)?;
    change(
        ChangeRequest {
            shared: Arc::clone(&shared),
            uri: &uri,
            headers: &headers,
        },
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

/// Adds one backend to the pool.
#[utoipa::path(post, path = "/api/v1/pools/{pool}/backends", tag = "pools",
    params(("pool" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    request_body = MemberSpec,
    responses((status = 200, body = PoolView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn add_member(
    State(shared): State<Arc<Shared>>,
    Path(pool): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    change(
        ChangeRequest {
            shared: Arc::clone(&shared),
            uri: &uri,
            headers: &headers,
        },
        &body,
        Body::Required,
        |member: MemberSpec, expected| async move {
            Ok(shared.control.add_member(&pool, member, expected).await?)
        },
    )
    .await
}

/// Drains one backend (up to `timeout`) and removes it from the pool.
#[utoipa::path(delete, path = "/api/v1/pools/{pool}/backends/{addr}", tag = "pools",
    params(("pool" = String, Path), ("addr" = String, Path), ("If-Match" = Option<String>, Header), DrainQuery),
    responses((status = 200, body = PoolView, headers(("ETag" = String))), ChangeErrors, DrainErrors, AuthErrors))]
pub(super) async fn remove_member(
    State(shared): State<Arc<Shared>>,
    Path((pool, addr)): Path<(String, String)>,
    query: Result<Query<DrainQuery>, axum::extract::rejection::QueryRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let timeout = drain_timeout(query)?;
    change(
        ChangeRequest {
            shared: Arc::clone(&shared),
            uri: &uri,
            headers: &headers,
        },
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
