//! The stand-in app server: a real HTTP/1.1 and HTTP/2 (h2c) server answering as a
//! named app instance, for `switchyard demo`, `switchyard stand-in`, the deploy
//! rehearsal and the integration tests. Paths:
//! - `/` and anything else: 200, body = the greeting (by default the name), header
//!   `x-upstream: NAME`
//! - `/health`: the status set on [`HealthEndpoint`] (0: never answers), or 503 while
//!   the health file exists
//! - `/echo...`: 200, JSON of method, URI, headers and version as seen here
//! - `/status/N`: status N, no body
//! - `/slow/MS`: waits MS milliseconds, then 200 with the greeting
//! - `/hang`: never answers
//! - `/download/BYTES`: streams BYTES bytes in 64 KiB chunks
//! - `/chunked`: a body of three parts with no length
//! - with the `test-paths` feature, `/upload` (reads the body, answers
//!   `sha256hex length`) and `/ws` (WebSocket echo)

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::{empty, full, AnyBody, Parts, Repeat};

/// How a stand-in introduces itself.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub name: String,
    /// The body of `/`; the name when `None`.
    pub greeting: Option<Bytes>,
    /// `/health` answers 503 while this file exists (a maintenance switch a script or
    /// another process can flip).
    pub health_file: Option<PathBuf>,
}

impl Identity {
    pub fn named(name: &str) -> Identity {
        Identity {
            name: name.to_string(),
            ..Identity::default()
        }
    }
}

/// A running stand-in; dropping it stops it like `kill`.
pub struct AppServer {
    pub name: String,
    pub addr: SocketAddr,
    /// Requests served, health checks not counted: what the proxy forwarded.
    pub hits: Arc<AtomicU64>,
    /// Connections that carried at least one counted request.
    pub connections: Arc<AtomicU64>,
    pub health: Arc<HealthEndpoint>,
    kill: watch::Sender<bool>,
}

/// The server's `GET /health`: the status it answers (0 = never answers) and how
/// many checks it has served.
pub struct HealthEndpoint {
    pub status: AtomicU16,
    pub checks: AtomicU64,
}

impl HealthEndpoint {
    pub fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::SeqCst)
    }
}

impl AppServer {
    /// A stand-in named `name` on a fresh port of 127.0.0.1.
    pub async fn start(name: &str) -> AppServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("no free port on 127.0.0.1");
        AppServer::serve_on(name, listener)
    }

    /// Serves on an already-bound listener (for restarting on the same address).
    pub fn serve_on(name: &str, listener: TcpListener) -> AppServer {
        AppServer::serve(Identity::named(name), listener)
    }

    pub fn serve(identity: Identity, listener: TcpListener) -> AppServer {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let health = Arc::new(HealthEndpoint {
            status: AtomicU16::new(200),
            checks: AtomicU64::new(0),
        });
        let (kill, killed) = watch::channel(false);
        let shared = Arc::new(Shared {
            name: HeaderValue::from_str(&identity.name)
                .unwrap_or_else(|_| HeaderValue::from_static("stand-in")),
            greeting: identity
                .greeting
                .unwrap_or_else(|| Bytes::from(identity.name.clone())),
            health_file: identity.health_file,
            hits: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicU64::new(0)),
            health: Arc::clone(&health),
        });
        let server = AppServer {
            name: identity.name,
            addr,
            hits: Arc::clone(&shared.hits),
            connections: Arc::clone(&shared.connections),
            health,
            kill,
        };
        tokio::spawn(accept(listener, shared, killed));
        server
    }

    /// Stops the server at once: the listener and every open connection are dropped,
    /// as when the process is killed.
    pub fn kill(&self) {
        let _ = self.kill.send(true);
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Shared {
    name: HeaderValue,
    greeting: Bytes,
    health_file: Option<PathBuf>,
    hits: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    health: Arc<HealthEndpoint>,
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, mut killed: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            _ = killed.wait_for(|k| *k) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = Arc::clone(&shared);
        let mut killed = killed.clone();
        // Health checks (GET /health, bare TCP connects) are not counted: tests count
        // the traffic the proxy forwarded.
        let counted = Arc::new(AtomicBool::new(false));
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let shared = Arc::clone(&shared);
                if req.uri().path() != "/health" {
                    shared.hits.fetch_add(1, Ordering::SeqCst);
                    if !counted.swap(true, Ordering::SeqCst) {
                        shared.connections.fetch_add(1, Ordering::SeqCst);
                    }
                }
                async move { Ok::<_, Infallible>(answer(req, &shared).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = killed.wait_for(|k| *k) => {}
            }
        });
    }
}

fn status_only(status: StatusCode) -> Response<AnyBody> {
    let mut response = Response::new(empty());
    *response.status_mut() = status;
    response
}

async fn answer(req: Request<Incoming>, shared: &Shared) -> Response<AnyBody> {
    if req.uri().path() == "/health" {
        shared.health.checks.fetch_add(1, Ordering::SeqCst);
        if shared.health_file.as_ref().is_some_and(|f| f.exists()) {
            return status_only(StatusCode::SERVICE_UNAVAILABLE);
        }
        let status = shared.health.status.load(Ordering::SeqCst);
        if status == 0 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        return status_only(StatusCode::from_u16(status).unwrap_or(StatusCode::OK));
    }
    let mut response = app(req, shared).await;
    response
        .headers_mut()
        .insert("x-upstream", shared.name.clone());
    response
}

async fn app(req: Request<Incoming>, shared: &Shared) -> Response<AnyBody> {
    let path = req.uri().path();
    let ok = |body: AnyBody| Response::new(body);
    if path.starts_with("/echo") {
        return echo(&req);
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return match code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
            Some(status) => status_only(status),
            None => status_only(StatusCode::BAD_REQUEST),
        };
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return ok(full(shared.greeting.clone()));
    }
    if path == "/hang" {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if let Some(bytes) = path.strip_prefix("/download/") {
        let total: u64 = bytes.parse().unwrap_or(0);
        let mut response = ok(Repeat::new(total).boxed());
        response
            .headers_mut()
            .insert("content-length", total.into());
        return response;
    }
    if path == "/chunked" {
        let parts = [&b"one,"[..], b"two,", b"three"].map(Bytes::from_static);
        return ok(Parts::new(parts).boxed());
    }
    #[cfg(feature = "test-paths")]
    if path == "/upload" {
        return crate::test_paths::upload(req).await;
    }
    #[cfg(feature = "test-paths")]
    if path == "/ws" {
        return crate::test_paths::websocket_echo(req);
    }
    ok(full(shared.greeting.clone()))
}

fn echo(req: &Request<Incoming>) -> Response<AnyBody> {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let echo = serde_json::json!({
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    let mut response = Response::new(full(echo.to_string()));
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("set-cookie", HeaderValue::from_static("a=1"));
    headers.append("set-cookie", HeaderValue::from_static("b=2"));
    headers.insert("x-app-header", HeaderValue::from_static("kept"));
    response
}
