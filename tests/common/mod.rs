//! Shared test helpers: real upstream app servers on 127.0.0.1:0, a switchyard started
//! in-process or as the real binary, and a real hyper client.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

pub mod tls;

pub type TestBody = BoxBody<Bytes, std::io::Error>;

// ------------------------------------------------------------------------------------
// Upstream app servers.

/// A real HTTP app server. Paths:
/// - `/` and anything else: 200, body = the server's name, header `x-upstream: name`
/// - `/echo...`: 200, JSON of method, path-and-query, headers and version as seen here
/// - `/status/N`: status N, no body
/// - `/slow/MS`: waits MS milliseconds, then 200 with the name
/// - `/hang`: never answers
/// - `/download/BYTES`: streams BYTES bytes in 64 KiB chunks
/// - `/upload`: reads the whole body, answers `sha256hex length`
/// - `/chunked`: answers with a chunked (unknown length) body of three parts
/// - `/ws`: WebSocket echo
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
    pub health: Arc<HealthEndpoint>,
    kill: watch::Sender<bool>,
}

/// The upstream's `GET /health`: the status it answers (0 = never answers) and how
/// many checks it has served.
pub struct HealthEndpoint {
    pub status: std::sync::atomic::AtomicU16,
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

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Upstream::serve_on(name, listener)
    }

    /// Serves on an already-bound listener (for restarting on the same address).
    pub fn serve_on(name: &str, listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let health = Arc::new(HealthEndpoint {
            status: std::sync::atomic::AtomicU16::new(200),
            checks: AtomicU64::new(0),
        });
        let (kill, killed) = watch::channel(false);
        let name_bytes = Bytes::from(name.to_string());
        tokio::spawn(accept(
            listener,
            name_bytes,
            hits.clone(),
            connections.clone(),
            health.clone(),
            killed,
        ));
        Upstream {
            name: name.to_string(),
            addr,
            hits,
            connections,
            health,
            kill,
        }
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

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn accept(
    listener: TcpListener,
    name: Bytes,
    hits: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    health: Arc<HealthEndpoint>,
    mut killed: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = killed.wait_for(|k| *k) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let name = name.clone();
        let hits = hits.clone();
        let connections = connections.clone();
        let health = health.clone();
        let mut killed = killed.clone();
        // Health checks (GET /health, bare TCP connects) are not counted: tests count
        // the traffic the proxy forwarded.
        let counted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                if req.uri().path() != "/health" {
                    hits.fetch_add(1, Ordering::SeqCst);
                    if !counted.swap(true, Ordering::SeqCst) {
                        connections.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let name = name.clone();
                let health = health.clone();
                async move {
                    if req.uri().path() == "/health" {
                        health.checks.fetch_add(1, Ordering::SeqCst);
                        let status = health.status.load(Ordering::SeqCst);
                        if status == 0 {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        let mut response = Response::new(empty());
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        return Ok::<_, Infallible>(response);
                    }
                    Ok::<_, Infallible>(app(req, name).await)
                }
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

async fn app(mut req: Request<Incoming>, name: Bytes) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    let named = |status: StatusCode, body: TestBody| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        r.headers_mut()
            .insert("x-upstream", http::HeaderValue::from_bytes(&name).unwrap());
        r
    };
    if path.starts_with("/echo") {
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
        let mut r = named(StatusCode::OK, full(echo.to_string()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r.headers_mut().append("set-cookie", "a=1".parse().unwrap());
        r.headers_mut().append("set-cookie", "b=2".parse().unwrap());
        r.headers_mut()
            .insert("x-app-header", "kept".parse().unwrap());
        return r;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        return named(status, empty());
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        return named(StatusCode::OK, full(name.clone()));
    }
    if path == "/hang" {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if let Some(bytes) = path.strip_prefix("/download/") {
        let total: u64 = bytes.parse().unwrap();
        let mut r = named(StatusCode::OK, Repeat::new(total).boxed());
        r.headers_mut().insert("content-length", total.into());
        return r;
    }
    if path == "/upload" {
        let mut hasher = Sha256::new();
        let mut length = 0u64;
        let body = req.body_mut();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return named(StatusCode::BAD_REQUEST, full("body error"));
            };
            if let Some(data) = frame.data_ref() {
                hasher.update(data);
                length += data.len() as u64;
            }
        }
        return named(
            StatusCode::OK,
            full(format!("{} {length}", hex(&hasher.finalize()))),
        );
    }
    if path == "/chunked" {
        let parts = futures_util::stream::iter(
            ["one,", "two,", "three"]
                .map(|p| Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(p.as_bytes())))),
        );
        return named(
            StatusCode::OK,
            BodyExt::boxed(http_body_util::StreamBody::new(parts)),
        );
    }
    if path == "/ws" {
        let key = req.headers().get("sec-websocket-key").cloned();
        let Some(key) = key else {
            return named(StatusCode::BAD_REQUEST, full("no key"));
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    break;
                }
                if ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut r = named(StatusCode::SWITCHING_PROTOCOLS, empty());
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        r.headers_mut()
            .insert("sec-websocket-accept", accept.parse().unwrap());
        return r;
    }
    named(StatusCode::OK, full(name.clone()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of `remaining` bytes made on the fly, so neither side holds it in memory.
pub struct Repeat {
    remaining: u64,
    chunk: Bytes,
}

impl Repeat {
    pub fn new(total: u64) -> Repeat {
        Repeat {
            remaining: total,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
    }
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

// ------------------------------------------------------------------------------------
// The proxy under test.

/// A config with both listeners on port 0, one service `app` on pool `blue`, and
/// `extra` appended (more pools, services or `[proxy]` keys via `proxy_keys`).
pub fn config_text(proxy_keys: &str, pools: &[(&str, &[SocketAddr])], extra: &str) -> String {
    config_with_admin(proxy_keys, "", pools, extra)
}

/// What `switchyard check` says of a config text: validated, and the files it names
/// loaded.
pub fn check(config: &str) -> Result<switchyard::setup::Setup, switchyard::config::ConfigError> {
    let config = switchyard::config::Config::parse(config, Path::new("t.toml"))?;
    switchyard::setup::Setup::new(config)
}

/// A fresh directory for one test's state file, never shared with another test.
pub fn state_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Under target/tmp (cargo's scratch space for integration tests), not /tmp.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "state-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `[state] path` of a config made by `config_text`.
pub fn state_path_of(config: &str) -> PathBuf {
    config
        .lines()
        .find_map(|l| l.strip_prefix("path = \""))
        .map(|p| p.trim_end_matches('"').into())
        .unwrap()
}

/// As `config_text`, with extra `[admin]` keys; the state file goes to a fresh directory.
pub fn config_with_admin(
    proxy_keys: &str,
    admin_keys: &str,
    pools: &[(&str, &[SocketAddr])],
    extra: &str,
) -> String {
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy_keys}\n[admin]\nlisten = \"127.0.0.1:0\"\n{admin_keys}\n[state]\npath = \"{}\"\n\n",
        state_dir().join("state.json").display()
    );
    for (name, addrs) in pools {
        let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        text.push_str(&format!(
            "[pools.{name}]\nbackends = [{}]\n\n",
            list.join(", ")
        ));
    }
    if !extra.contains("[services.app]") {
        text.push_str(&format!("[services.app]\nactive = \"{}\"\n", pools[0].0));
    }
    text.push_str(extra);
    text
}

pub async fn start_proxy(config: &str) -> switchyard::server::Running {
    let config = switchyard::config::Config::parse(config, Path::new("test.toml")).unwrap();
    switchyard::server::start(config).await.unwrap()
}

/// The real `switchyard run` binary, with its config written to a temporary directory.
pub struct ProxyProcess {
    pub child: Child,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl ProxyProcess {
    pub fn start(config: &str) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchyard.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(binary())
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[switchyard] {line}");
                if !sent && line.contains("switchyard listening") {
                    let _ = tx.send(line);
                    sent = true;
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("switchyard did not report its listeners within 30 s");
        ProxyProcess {
            proxy_addr: listen_field(&line, "proxy_addr"),
            admin_addr: listen_field(&line, "admin_addr"),
            tls_addr: (!line.contains("tls_addr=off")).then(|| listen_field(&line, "tls_addr")),
            child,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Peak resident memory (VmHWM) in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "switchyard did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

// ------------------------------------------------------------------------------------
// Client side.

pub type TestClient = Client<HttpConnector, TestBody>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn get(addr: SocketAddr, path: &str) -> Request<TestBody> {
    Request::get(format!("http://{addr}{path}"))
        .body(empty())
        .unwrap()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

pub async fn send(client: &TestClient, req: Request<TestBody>) -> Answer {
    let response = client.request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Polls `condition` every 10 ms until it holds or `limit` passes.
pub async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends raw bytes on a new connection and returns everything read until the server
/// closes or `limit` passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ------------------------------------------------------------------------------------
// Sustained load and the admin API.

/// What one request of a load run saw.
#[derive(Debug, Clone)]
pub struct Record {
    pub started: Instant,
    pub finished: Instant,
    pub status: u16,
    /// `x-upstream` of the answer: which app server served it.
    pub upstream: String,
    pub error: Option<String>,
}

impl Record {
    pub fn failed(&self) -> bool {
        self.error.is_some() || self.status != 200
    }
}

/// `workers` keep-alive clients sending GET `path` back to back until `finish`.
pub struct LoadRun {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Record>>>,
}

impl LoadRun {
    pub fn start(addr: SocketAddr, path: &str, workers: usize) -> LoadRun {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let tasks = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                let sent = sent.clone();
                let path = path.to_string();
                tokio::spawn(async move {
                    let client = client();
                    let mut records = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        sent.fetch_add(1, Ordering::SeqCst);
                        let record = match client.request(get(addr, &path)).await {
                            Ok(response) => {
                                let status = response.status().as_u16();
                                let upstream = response
                                    .headers()
                                    .get("x-upstream")
                                    .map(|v| v.to_str().unwrap_or("").to_string())
                                    .unwrap_or_default();
                                let error = response
                                    .into_body()
                                    .collect()
                                    .await
                                    .err()
                                    .map(|e| e.to_string());
                                Record {
                                    started,
                                    finished: Instant::now(),
                                    status,
                                    upstream,
                                    error,
                                }
                            }
                            Err(e) => Record {
                                started,
                                finished: Instant::now(),
                                status: 0,
                                upstream: String::new(),
                                error: Some(format!("{e:?}")),
                            },
                        };
                        records.push(record);
                    }
                    records
                })
            })
            .collect();
        LoadRun { stop, sent, tasks }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits until at least `more` further requests have been sent.
    pub async fn wait_for(&self, more: u64) {
        let target = self.sent() + more;
        eventually(
            Duration::from_secs(60),
            &format!("{more} more requests"),
            || self.sent() >= target,
        )
        .await;
    }

    pub async fn finish(self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_by_key(|r| r.started);
        all
    }
}

/// Fails the test listing the first failures, if any request failed.
pub fn assert_no_failures(records: &[Record]) {
    let failed: Vec<&Record> = records.iter().filter(|r| r.failed()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failed.len(),
        records.len(),
        &failed[..failed.len().min(5)]
    );
}

/// Share of `records` served by upstreams whose name starts with `prefix`.
pub fn share(records: &[Record], prefix: &str) -> f64 {
    if records.is_empty() {
        return 0.0;
    }
    records
        .iter()
        .filter(|r| r.upstream.starts_with(prefix))
        .count() as f64
        / records.len() as f64
}

/// One admin API call: (status, JSON body).
pub async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let body = match body {
        Some(value) => full(value.to_string()),
        None => empty(),
    };
    let answer = send(&client(), request.body(body).unwrap()).await;
    let json = serde_json::from_slice(&answer.body).unwrap_or(serde_json::Value::Null);
    (answer.status, json)
}

/// As `admin`, with a raw body (for malformed input).
pub async fn admin_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap();
    let answer = send(&client(), request).await;
    (
        answer.status,
        serde_json::from_slice(&answer.body).unwrap_or(serde_json::Value::Null),
    )
}

/// Blue and green pools of `per_pool` named app servers each, and a proxy with service
/// `app` on blue.
pub struct BlueGreen {
    pub blue: Vec<Upstream>,
    pub green: Vec<Upstream>,
    pub proxy: switchyard::server::Running,
}

impl BlueGreen {
    pub async fn start(per_pool: usize, proxy_keys: &str, admin_keys: &str) -> BlueGreen {
        let mut blue = Vec::new();
        let mut green = Vec::new();
        for i in 1..=per_pool {
            blue.push(Upstream::start(&format!("blue-{i}")).await);
            green.push(Upstream::start(&format!("green-{i}")).await);
        }
        let blue_addrs: Vec<SocketAddr> = blue.iter().map(|u| u.addr).collect();
        let green_addrs: Vec<SocketAddr> = green.iter().map(|u| u.addr).collect();
        let config = config_with_admin(
            proxy_keys,
            admin_keys,
            &[("blue", &blue_addrs), ("green", &green_addrs)],
            "",
        );
        let config = switchyard::config::Config::parse(&config, Path::new("test.toml")).unwrap();
        let proxy = switchyard::server::start(config).await.unwrap();
        let control = std::sync::Arc::clone(&proxy.shared.control);
        eventually(Duration::from_secs(20), "first health-check round", || {
            control.first_round_done()
        })
        .await;
        BlueGreen { blue, green, proxy }
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.proxy_addr
    }

    pub fn admin(&self) -> SocketAddr {
        self.proxy.admin_addr
    }
}

/// Polls `/readyz` until it answers 200 (the first health-check round is done).
pub async fn wait_ready(admin: SocketAddr) {
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = client.request(get(admin, "/readyz")).await {
            if response.status() == StatusCode::OK {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not turn 200 within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An address from switchyard's "switchyard listening proxy_addr=... admin_addr=..." line.
pub fn listen_field(line: &str, name: &str) -> SocketAddr {
    let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Has the server side of the loopback connection `client` → `server` read everything
/// sent to it? True once the kernel shows that socket with an empty receive queue
/// (`/proc/net/tcp`), so a test knows a request was taken in without sleeping on it.
/// Call it only after the bytes were written.
pub fn server_has_read(server: SocketAddr, client: SocketAddr) -> bool {
    fn hex(addr: SocketAddr) -> String {
        let std::net::IpAddr::V4(ip) = addr.ip() else {
            panic!("IPv4 loopback only: {addr}");
        };
        let o = ip.octets();
        format!(
            "{:02X}{:02X}{:02X}{:02X}:{:04X}",
            o[3],
            o[2],
            o[1],
            o[0],
            addr.port()
        )
    }
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 4
            && fields[1] == local
            && fields[2] == remote
            && fields[4].split(':').nth(1) == Some("00000000")
    })
}
