//! The admin listener: liveness and readiness now; the traffic-control API joins here.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::server::Shared;

pub fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if shared.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::routing::RoutingTable;
    use arc_swap::ArcSwap;
    use std::sync::atomic::AtomicBool;

    async fn status_of(app: Router, path: &str) -> StatusCode {
        use tower_service_oneshot::oneshot;
        oneshot(app, path).await
    }

    mod tower_service_oneshot {
        use axum::body::Body;
        use axum::http::{Request, StatusCode};
        use axum::Router;
        use tower::ServiceExt;

        pub async fn oneshot(app: Router, path: &str) -> StatusCode {
            let request = Request::get(path).body(Body::empty()).unwrap();
            app.oneshot(request).await.unwrap().status()
        }
    }

    fn shared() -> Arc<Shared> {
        let config = Config::parse(
            "[pools.p]\nbackends=[\"127.0.0.1:1\"]\n[services.s]\nactive=\"p\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        Arc::new(Shared {
            table: Arc::new(ArcSwap::from_pointee(RoutingTable::build(&config, None))),
            ready: AtomicBool::new(true),
        })
    }

    #[tokio::test]
    async fn readyz_turns_503_when_shutdown_begins() {
        let shared = shared();
        assert_eq!(
            status_of(app(Arc::clone(&shared)), "/readyz").await,
            StatusCode::OK
        );
        shared.ready.store(false, Ordering::SeqCst);
        assert_eq!(
            status_of(app(Arc::clone(&shared)), "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status_of(app(shared), "/healthz").await, StatusCode::OK);
    }
}
