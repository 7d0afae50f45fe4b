//! Rollouts (step canaries the proxy judges and moves itself) and mirroring.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use serde::Deserialize;

use super::change::{answer, change, Body, ChangeRequest, Generation};
use super::error::{ApiError, AuthErrors, ChangeErrors, LookupErrors};
use super::openapi::ChangeQuery;
use super::traffic::EmptyBody;
use super::Shared;
use crate::control::{RolloutView, ServiceView};
use crate::rollout::RolloutRequest;

impl Generation for RolloutView {
    fn generation(&self) -> u64 {
        self.generation
    }
}

/// Starts a rollout: the first step's weight goes to the canary pool now, and each
/// step moves on once it has held with every analysis window passing; the last one
/// promotes. A failure past `failure_limit` rolls back (or pauses) at once.
#[utoipa::path(post, path = "/api/v1/services/{service}/rollout", tag = "rollouts",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    request_body = RolloutRequest,
    responses((status = 200, body = RolloutView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn start_rollout(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = ChangeRequest {
        shared: Arc::clone(&shared),
        uri: &uri,
        headers: &headers,
    };
    change(
        request,
        &body,
        Body::Required,
        |body: RolloutRequest, expected| async move {
            Ok(shared
                .control
                .start_rollout(&service, body, expected)
                .await?)
        },
    )
    .await
}

/// The service's last rollout: status, step, weight, the reason it is where it is, and
/// the last analysis windows (requests, error rates and p99 of both pools).
#[utoipa::path(get, path = "/api/v1/services/{service}/rollout", tag = "rollouts",
    params(("service" = String, Path)),
    responses((status = 200, body = RolloutView, headers(("ETag" = String))), LookupErrors, AuthErrors))]
pub(super) async fn rollout(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
) -> Result<Response, ApiError> {
    let view = shared.control.rollout_view(&service).await?;
    Ok(answer(view.generation, &view))
}

/// Holds the rollout where it is (the canary keeps its weight) until resumed.
#[utoipa::path(post, path = "/api/v1/services/{service}/rollout/pause", tag = "rollouts",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    request_body(content = Option<EmptyBody>, description = "optional"),
    responses((status = 200, body = RolloutView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn pause(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = ChangeRequest {
        shared: Arc::clone(&shared),
        uri: &uri,
        headers: &headers,
    };
    change(
        request,
        &body,
        Body::Optional,
        |_: EmptyBody, expected| async move {
            Ok(shared.control.pause_rollout(&service, expected).await?)
        },
    )
    .await
}

/// Goes on: past a `"pause"` step to the next one, or, after a pause by hand or by
/// failures, the current step again with its hold restarted and no failures counted.
#[utoipa::path(post, path = "/api/v1/services/{service}/rollout/resume", tag = "rollouts",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    request_body(content = Option<EmptyBody>, description = "optional"),
    responses((status = 200, body = RolloutView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn resume(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = ChangeRequest {
        shared: Arc::clone(&shared),
        uri: &uri,
        headers: &headers,
    };
    change(
        request,
        &body,
        Body::Optional,
        |_: EmptyBody, expected| async move {
            Ok(shared.control.resume_rollout(&service, expected).await?)
        },
    )
    .await
}

/// Ends the rollout: back to the stable pool, weight 0, canary removed.
#[utoipa::path(post, path = "/api/v1/services/{service}/rollout/abort", tag = "rollouts",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    request_body(content = Option<EmptyBody>, description = "optional"),
    responses((status = 200, body = RolloutView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn abort(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = ChangeRequest {
        shared: Arc::clone(&shared),
        uri: &uri,
        headers: &headers,
    };
    change(
        request,
        &body,
        Body::Optional,
        |_: EmptyBody, expected| async move {
            Ok(shared.control.abort_rollout(&service, expected).await?)
        },
    )
    .await
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct MirrorBody {
    /// The pool that gets the copies (not the service's active pool).
    pool: String,
    /// Percent of the service's requests copied, above 0 and at most 100.
    #[schema(minimum = 0, maximum = 100)]
    percent: f64,
}

/// Sends copies of `percent` of the service's requests to `pool` and discards its
/// answers: a client never waits for a copy, and a slow or dead mirror pool costs it
/// nothing. Bodies over `proxy.mirror_max_body` are not copied (and counted).
#[utoipa::path(put, path = "/api/v1/services/{service}/mirror", tag = "rollouts",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    request_body = MirrorBody,
    responses((status = 200, body = ServiceView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn set_mirror(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = ChangeRequest {
        shared: Arc::clone(&shared),
        uri: &uri,
        headers: &headers,
    };
    change(
        request,
        &body,
        Body::Required,
        |body: MirrorBody, expected| async move {
            Ok(shared
                .control
                .set_mirror(&service, &body.pool, body.percent, expected)
                .await?)
        },
    )
    .await
}

/// Stops mirroring the service's requests.
#[utoipa::path(delete, path = "/api/v1/services/{service}/mirror", tag = "rollouts",
    params(("service" = String, Path), ("If-Match" = Option<String>, Header), ChangeQuery),
    responses((status = 200, body = ServiceView, headers(("ETag" = String))), ChangeErrors, AuthErrors))]
pub(super) async fn stop_mirror(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let request = ChangeRequest {
        shared: Arc::clone(&shared),
        uri: &uri,
        headers: &headers,
    };
    change(
        request,
        &Bytes::new(),
        Body::Ignored,
        |(): (), expected| async move { Ok(shared.control.stop_mirror(&service, expected).await?) },
    )
    .await
}
