//! The admin listener: liveness, readiness, the status page, the traffic-control API
//! and its OpenAPI description. Handlers only translate HTTP to `Control` calls; every
//! change is made (and persisted) there.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod change;
mod error;
mod openapi;
mod page;
mod pools;
mod process;
mod rollout;
mod shared;
mod traffic;

pub use error::ApiError;
pub use shared::{
    record_reload, ConfigReloadError, Lifecycle, ListenAddrs, ProcessInfo, ReloadError, Shared,
    UpgradeRefusal, Upgraded,
};

/// The OpenAPI description, rendered once when the router is built.
#[derive(Clone)]
struct Description(Arc<str>);

pub fn app(shared: Arc<Shared>) -> Router {
    let (api, api_doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(traffic::state))
        .routes(routes!(traffic::history))
        .routes(routes!(traffic::recent_traffic))
        .routes(routes!(traffic::switch))
        .routes(routes!(traffic::set_canary, traffic::abort_canary))
        .routes(routes!(traffic::promote))
        .routes(routes!(traffic::rollback))
        .routes(routes!(rollout::start_rollout, rollout::rollout))
        .routes(routes!(rollout::pause))
        .routes(routes!(rollout::resume))
        .routes(routes!(rollout::abort))
        .routes(routes!(rollout::set_mirror, rollout::stop_mirror))
        .routes(routes!(pools::pool_view))
        .routes(routes!(pools::drain))
        .routes(routes!(pools::disable))
        .routes(routes!(pools::enable))
        .routes(routes!(pools::wait_drained))
        .routes(routes!(pools::set_members, pools::add_member))
        .routes(routes!(pools::remove_member))
        .routes(routes!(process::tls_view))
        .routes(routes!(process::tls_reload))
        .routes(routes!(process::config_reload))
        .routes(routes!(process::info))
        .routes(routes!(process::upgrade))
        .routes(routes!(process::cluster_view))
        .routes(routes!(process::cluster_converged))
        .routes(routes!(openapi_json))
        .split_for_parts();
    let (probes, probe_doc) = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(page::status_page))
        .routes(routes!(page::script))
        .routes(routes!(page::style))
        .split_for_parts();
    let (metrics, metrics_doc) = OpenApiRouter::new()
        .routes(routes!(metrics))
        .split_for_parts();
    let mut doc = api_doc;
    doc.merge(probe_doc);
    doc.merge(metrics_doc);
    let description = Description(Arc::from(doc.to_json().unwrap_or_default()));

    let api = api
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(description))
        // `layer`, not `route_layer`: unknown paths need the token too, so the API's
        // shape is not revealed to callers without it.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            require_token,
        ));
    // Whether `/metrics` needs the token is read per scrape: a reload may change it.
    let metrics = metrics.route_layer(middleware::from_fn_with_state(
        Arc::clone(&shared),
        require_token_for_metrics,
    ));
    probes
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

/// This API as OpenAPI 3, made from the handlers themselves.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "process",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object), error::AuthErrors))]
async fn openapi_json(Extension(description): Extension<Description>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        description.0.to_string(),
    )
        .into_response()
}

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
    // `Allow` (405) and `Connection: close` (stopping) stay; the body's own go.
    let mut headers = response.headers().clone();
    headers.remove(header::CONTENT_TYPE);
    headers.remove(header::CONTENT_LENGTH);
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
    let mut rewritten = ApiError::new(status, code, message).into_response();
    for (name, value) in &headers {
        rewritten.headers_mut().append(name, value.clone());
    }
    rewritten
}

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "probes", security(()),
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// The Prometheus text exposition. Needs the token only with
/// `[admin] metrics_require_token = true`.
#[utoipa::path(get, path = "/metrics", tag = "probes", security((), ("bearer" = [])),
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String), error::AuthErrors))]
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

/// Readiness: 200 once the first health-check round is done, 503 (`not_ready`) before
/// that and from the moment shutdown begins.
#[utoipa::path(get, path = "/readyz", tag = "probes", security(()),
    responses((status = 200, description = "`ready`", content_type = "text/plain", body = String),
        (status = 503, description = "starting or shutting down", body = error::ErrorBody)))]
async fn readyz(State(shared): State<Arc<Shared>>) -> Result<&'static str, ApiError> {
    let not_ready = |why| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why);
    if !shared.ready.load(Ordering::SeqCst) {
        Err(not_ready("shutting down"))
    } else if !shared.is_ready() {
        Err(not_ready("first health-check round not finished"))
    } else {
        Ok("ready\n")
    }
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
            recent: Arc::default(),
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

    fn post(path: &str, body: &str) -> axum::http::Request<Body> {
        axum::http::Request::post(path)
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    #[tokio::test]
    async fn a_wrong_wait_or_timeout_is_refused_before_anything_changes() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path(), None);
        for query in ["?wait=soon", "?wait=converged&timeout=forever"] {
            let (status, body) = call(
                app(Arc::clone(&shared)),
                post(
                    &format!("/api/v1/services/s/switch{query}"),
                    r#"{"to": "q", "force": true}"#,
                ),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
            assert_eq!(
                shared.control.generation().await,
                0,
                "{query} changed the state"
            );
        }
        // Without a cluster there is nothing to wait for: the change is made at once.
        let (status, body) = call(
            app(Arc::clone(&shared)),
            post(
                "/api/v1/services/s/switch?wait=converged",
                r#"{"to": "q", "force": true}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["active"], "q");
    }

    #[tokio::test]
    async fn an_optional_body_may_be_empty_or_null_but_not_another_value() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path(), None);
        let drain = "/api/v1/pools/p/backends/127.0.0.1:1/drain";
        for body in ["", "null", "{}"] {
            let (status, answer) = call(app(Arc::clone(&shared)), post(drain, body)).await;
            assert_eq!(status, StatusCode::OK, "{body:?}: {answer}");
        }
        for body in ["[]", "1", "{\"x\": 1}"] {
            let (status, _) = call(app(Arc::clone(&shared)), post(drain, body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        }
    }

    #[tokio::test]
    async fn the_openapi_description_describes_the_router_it_was_built_with() {
        let dir = tempfile::tempdir().unwrap();
        let (status, spec) = call(app(shared(dir.path(), None)), get("/api/v1/openapi.json")).await;
        assert_eq!(status, StatusCode::OK);
        let paths = spec["paths"].as_object().unwrap();
        // Every operation it describes is routed: none answers "no such endpoint" or
        // "method not allowed" (a GET would wait, so each is sent with a bad If-Match
        // or a bad query where it takes one).
        for (path, operations) in paths {
            for method in operations.as_object().unwrap().keys() {
                if path == "/api/v1/upgrade" {
                    continue;
                }
                let uri = path
                    .replace("{service}", "s")
                    .replace("{pool}", "p")
                    .replace("{addr}", "127.0.0.1:1")
                    + "?timeout=x&generation=x";
                let request = axum::http::Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(uri)
                    .header("if-match", "x")
                    .body(Body::empty())
                    .unwrap();
                let (status, body) = call(app(shared(dir.path(), None)), request).await;
                assert!(
                    status != StatusCode::METHOD_NOT_ALLOWED
                        && body["error"] != "no such admin endpoint",
                    "{method} {path}: {status} {body}"
                );
            }
        }
        assert!(paths.len() >= 28, "{} paths", paths.len());
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
