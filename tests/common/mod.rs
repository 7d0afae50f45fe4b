//! Shared test helpers: real upstream app servers on 127.0.0.1:0, a switchyard started
//! in-process or as the real binary, and a real hyper client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

pub mod etcd;
pub mod tls;

// ------------------------------------------------------------------------------------
// Upstream app servers: the stand-ins the demo and the rehearsal use too (see the
// `app` module of switchyard-standins for the paths they answer).

// Each test file uses some of these; the others are not "unused".
#[allow(unused_imports)]
pub use switchyard_standins::app::{AppServer as Upstream, HealthEndpoint};
#[allow(unused_imports)]
pub use switchyard_standins::body::{empty, full, AnyBody as TestBody, Repeat};
#[allow(unused_imports)]
pub use switchyard_standins::process::Switchyard;
#[allow(unused_imports)]
pub use switchyard_standins::test_paths::hex;

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
    // A test process of an earlier run may have had the same process id, and its
    // directories stay: what it left there would be this test's starting state.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `[admin]` keys for an admin token `token`, written to a fresh file readable by its
/// owner only.
pub fn admin_token_keys(token: &str) -> String {
    let file = state_dir().join("admin.token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let mut permissions = std::fs::metadata(&file).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o600);
    std::fs::set_permissions(&file, permissions).unwrap();
    format!("token_file = \"{}\"\n", file.display())
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
    /// Its log lines (stderr), as they come.
    pub log: switchyard_standins::process::Log,
}

impl ProxyProcess {
    pub fn start(config: &str) -> ProxyProcess {
        ProxyProcess::start_binary(&binary(), config)
    }

    /// As `start`, running the executable at `executable`.
    pub fn start_binary(executable: &Path, config: &str) -> ProxyProcess {
        ProxyProcess::try_start_binary(executable, config).unwrap()
    }

    /// As `start`, with why it did not start (its last log line, as the start saw it).
    pub fn try_start(config: &str) -> Result<ProxyProcess, String> {
        ProxyProcess::try_start_binary(&binary(), config)
    }

    fn try_start_binary(executable: &Path, config: &str) -> Result<ProxyProcess, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchyard.toml");
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(executable);
        command
            .args(["run", "--config"])
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("SWITCHYARD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null());
        let Switchyard {
            child,
            proxy_addr,
            admin_addr,
            tls_addr,
            log,
        } = Switchyard::start(command, true)?;
        Ok(ProxyProcess {
            proxy_addr,
            admin_addr,
            tls_addr,
            child,
            dir,
            log,
        })
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

#[allow(unused_imports)]
pub use switchyard_standins::load::{client, get, HttpClient as TestClient, LoadRun, Record};

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

/// An upstream on 127.0.0.1:0 that hands each connection it accepts to `serve`, in a
/// task of its own: for upstreams that must misbehave in ways a real server will not.
pub async fn raw_upstream<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(stream));
        }
    });
    addr
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

/// Puts a weight-0 canary on service `app` that takes only requests with
/// `x-canary: 1` (see `canary_request`) to `pool`.
pub async fn set_header_canary(admin_addr: SocketAddr, pool: &str) {
    let canary = serde_json::json!({"pool": pool, "weight": 0, "header": {"name": "x-canary", "value": "1"}});
    let (status, answer) = admin(
        admin_addr,
        "PUT",
        "/api/v1/services/app/canary",
        Some(canary),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// A GET of `path` that the header canary takes.
pub fn canary_request(proxy: SocketAddr, path: &str) -> Request<TestBody> {
    Request::get(format!("http://{proxy}{path}"))
        .header("x-canary", "1")
        .body(empty())
        .unwrap()
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
    switchyard_standins::process::listen_field(line, name)
        .unwrap_or_else(|| panic!("no {name} in `{line}`"))
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
