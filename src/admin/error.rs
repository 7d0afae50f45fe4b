//! The one error shape of the admin API, `{"error", "code"}`, and the sets of error
//! answers each kind of endpoint documents in the OpenAPI description.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::control::ControlError;

/// `{"error", "code"}` with the status the contract gives each case.
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) extra: Option<(&'static str, serde_json::Value)>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(super) fn internal(message: impl ToString) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            message.to_string(),
        )
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

/// What every error answer looks like (the schema of `ApiError`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// For people: what went wrong and, where it helps, what to do.
    pub error: String,
    /// For scripts: `bad_request`, `unauthorized`, `not_found`, `unknown_service`,
    /// `unknown_pool`, `unknown_backend`, `stale_generation`, `no_healthy_backend`,
    /// `conflict`, `timeout`, `too_many_backends`, `body_too_large`, `persist_failed`,
    /// `upgrading`, `cluster-unavailable`, `invalid_config`, `internal`, ...
    pub code: String,
    /// Members that had not applied the generation (504 of a fleet-wide wait).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub laggards: Option<Vec<crate::cluster::Member>>,
    /// Requests still in flight (408 of a drain wait).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
}

/// Every `/api/v1` endpoint: the bearer token, when one is configured.
#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
pub enum AuthErrors {
    /// No token, or the wrong one (`unauthorized`).
    #[response(status = 401, headers(("WWW-Authenticate" = String)))]
    Unauthorized(ErrorBody),
}

/// A view of something named in the path.
#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
pub enum LookupErrors {
    /// A path parameter that does not decode.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No such service, pool or backend.
    #[response(status = 404)]
    NotFound(ErrorBody),
}

/// Every change of the traffic state.
#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
pub enum ChangeErrors {
    /// A body, path, query or `If-Match` that is not valid; nothing changed.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No such service, pool or backend; nothing changed.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `stale_generation` (the `If-Match` generation is not the current one),
    /// `no_healthy_backend` (without `force`) or `conflict`; nothing changed.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// A body over 1 MiB, or more backends than `max_backends_per_pool`.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// `persist_failed`: the state could not be saved, so nothing changed.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `upgrading` (a binary upgrade is handing over) or `cluster-unavailable` (etcd
    /// does not answer; `Retry-After` says when to try again).
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// `?wait=converged`: not every fleet member applied the change in time; the
    /// change stands.
    #[response(status = 504)]
    NotConverged(ErrorBody),
}

/// Changes that may wait for a backend to drain.
#[allow(dead_code)] // only described (in the OpenAPI document), never built
#[derive(utoipa::IntoResponses)]
pub enum DrainErrors {
    /// The backend still had requests in flight when the timeout passed; it stays out
    /// of rotation.
    #[response(status = 408)]
    Timeout(ErrorBody),
}
