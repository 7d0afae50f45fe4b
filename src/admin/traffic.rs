//! Services: the whole state, one service's history, and the changes of where its
//! traffic goes (switch, canary, promote, rollback), plus the recent traffic per pool.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::change::{answer, change, Body, ChangeRequest};
use super::error::{ApiError, AuthErrors, ChangeErrors, LookupErrors};
use super::openapi::ChangeQuery;
use super::Shared;
use crate::control::{CanaryRequest, HistoryView, ServiceView, StateView};
use crate::stats::RecentTrafficView;

/// Every service, pool and backend, with the generation.
#[utoipa::path(get, path = "/api/v1/state", tag = "traffic",
    responses((status = 200, body = StateView, headers(("ETag" = String, description = "the generation, quoted"))), AuthErrors))]
pub(super) async fn state(State(shared): State<Arc<Shared>>) -> Response {
    let view = shared.control.view().await;
    answer(view.generation, &view)
}

/// The last changes of a service's traffic, newest last.
#[utoipa::path(get, path = "/api/v1/services/{service}/history", tag = "traffic",
    params(("service" = String, Path)),
    responses((status = 200, body = HistoryView, headers(("ETag" = String))), LookupErrors, AuthErrors))]
pub(super) async fn history(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
) -> Result<Response, ApiError> {
    let view = shared.control.history(&service).await?;
    Ok(answer(view.generation, &view))
}

/// Request rate, error rate and p99 per pool over the last five minutes, from the
/// metrics' counters read every two seconds (what the status page charts).
#[utoipa::path(get, path = "/api/v1/traffic", tag = "traffic",
    responses((status = 200, body = RecentTrafficView), AuthErrors))]
pub(super) async fn recent_traffic(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.recent.view()).into_response()
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SwitchBody {
    /// The pool to make active.
    to: String,
    /// Switch even if the pool has no healthy backend.
    #[serde(default)]
    force: bool,
}

/// Blue-green: all of the service's traffic to another pool, at once; a canary ends.
#[utoipa::path(post, path = "/api/v1/services/{service}/switch", tag = "traffic",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header, description = "only if the generation is still this one"), ChangeQuery),
    request_body = SwitchBody,
    responses((status = 200, body = ServiceView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn switch(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
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

/// Sends `weight` percent of the service's traffic (or the requests matching a header
/// or cookie) to another pool.
#[utoipa::path(put, path = "/api/v1/services/{service}/canary", tag = "traffic",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    request_body = CanaryRequest,
    responses((status = 200, body = ServiceView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn set_canary(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
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
        |body: CanaryRequest, expected| async move {
            Ok(shared.control.set_canary(&service, body, expected).await?)
        },
    )
    .await
}

/// Ends the canary: all traffic back to the active pool.
#[utoipa::path(delete, path = "/api/v1/services/{service}/canary", tag = "traffic",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    responses((status = 200, body = ServiceView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn abort_canary(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    change(
        ChangeRequest {
            shared: Arc::clone(&shared),
            uri: &uri,
            headers: &headers,
        }, &Bytes::new(), Body::Ignored, |(): (), expected| async move {
        Ok(shared.control.abort_canary(&service, expected).await?)
    })
    .await
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ForceBody {
    /// Promote even if the canary pool has no healthy backend.
    #[serde(default)]
    force: bool,
}

/// The canary pool becomes the active pool.
#[utoipa::path(post, path = "/api/v1/services/{service}/promote", tag = "traffic",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    request_body(content = Option<ForceBody>, description = "optional"),
    responses((status = 200, body = ServiceView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn promote(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
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
        |body: ForceBody, expected| async move {
            Ok(shared
                .control
                .promote(&service, body.force, expected)
                .await?)
        },
    )
    .await
}

/// An empty JSON object: the body of a change that takes no arguments.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmptyBody {}

/// Back to the previous active pool.
#[utoipa::path(post, path = "/api/v1/services/{service}/rollback", tag = "traffic",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    request_body(content = Option<EmptyBody>, description = "optional"),
    responses((status = 200, body = ServiceView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn rollback(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    change(
        ChangeRequest {
            shared: Arc::clone(&shared),
            uri: &uri,
            headers: &headers,
        }, &body, Body::Optional, |_: EmptyBody, expected| async move {
        Ok(shared.control.rollback(&service, expected).await?)
    })
    .await
}
