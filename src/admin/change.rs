//! The shape every change shares: `If-Match`, a strictly parsed body, one `Control`
//! call on a task of its own, the new view with its generation as `ETag`, and, with
//! `?wait=converged`, an answer only once the whole fleet applied it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Query;
use axum::http::{header, HeaderMap, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::ApiError;
use super::process::{converge_timeout, converged_answer};
use super::Shared;
use crate::control::{BackendView, PoolView, ServiceView};

/// A successful answer: the JSON view, with its generation also as `ETag`.
pub(super) fn answer<T: Serialize>(generation: u64, value: &T) -> Response {
    let mut response = Json(value).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{generation}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// The generation a change's answer carries as its `ETag`.
pub(super) trait Generation {
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
pub(super) enum Body {
    /// A JSON object.
    Required,
    /// A JSON object, or nothing (the type's default).
    Optional,
    /// Whatever is sent is not read (DELETE).
    Ignored,
}

/// The request a change is made from: what `change` reads besides the body.
pub(super) struct ChangeRequest<'a> {
    pub shared: Arc<Shared>,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

pub(super) async fn change<B, V, Fut>(
    request: ChangeRequest<'_>,
    body: &Bytes,
    kind: Body,
    call: impl FnOnce(B, Option<u64>) -> Fut,
) -> Result<Response, ApiError>
where
    B: DeserializeOwned + Default,
    V: Serialize + Generation + Send + 'static,
    Fut: std::future::Future<Output = Result<V, ApiError>> + Send + 'static,
{
    let wait = convergence(request.uri)?;
    let expected = if_match(request.headers)?;
    let body = match kind {
        Body::Required => parse_body(body, false)?,
        Body::Optional => parse_body(body, true)?,
        Body::Ignored => B::default(),
    };
    // On a task of its own: a client that hangs up mid-change drops this handler, and a
    // change cut off between its save and its swap would be on disk but not in force.
    let view = tokio::spawn(call(body, expected))
        .await
        .map_err(ApiError::internal)??;
    converge(&request.shared, view.generation(), wait).await?;
    Ok(answer(view.generation(), &view))
}

#[derive(serde::Deserialize)]
struct WaitParams {
    wait: Option<String>,
    timeout: Option<String>,
}

/// `?wait=converged[&timeout=10s]`: how long to wait for the fleet after the change.
/// Read, and refused if wrong, before anything changes.
pub(super) fn convergence(uri: &Uri) -> Result<Option<Duration>, ApiError> {
    let Query(params) =
        Query::<WaitParams>::try_from_uri(uri).map_err(|e| ApiError::bad_request(e.body_text()))?;
    match params.wait.as_deref() {
        None => Ok(None),
        Some("converged") => converge_timeout(params.timeout.as_deref()).map(Some),
        Some(other) => Err(ApiError::bad_request(format!(
            "wait=`{other}`: the only thing a change can wait for is `converged`"
        ))),
    }
}

/// With `[cluster]` and `wait`: returns once every live member applied `generation`,
/// or 504 naming the laggards (the change stands). Without a cluster there is nothing
/// to wait for.
pub(super) async fn converge(
    shared: &Shared,
    generation: u64,
    wait: Option<Duration>,
) -> Result<(), ApiError> {
    match (wait, shared.control.cluster()) {
        (Some(timeout), Some(cluster)) => converged_answer(cluster, generation, timeout)
            .await
            .map(|_| ()),
        _ => Ok(()),
    }
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
/// body, or `null`, means the type's default when `optional`.
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
    if optional && value.is_null() {
        return Ok(T::default());
    }
    // serde would also take a struct from an array of its fields; the API takes objects.
    if !value.is_object() {
        return Err(ApiError::bad_request("the JSON body must be an object"));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}
