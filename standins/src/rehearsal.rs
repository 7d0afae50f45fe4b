//! A full deploy rehearsal under load: a real switchyard process in front of stand-in
//! app server processes for a blue and a green pool, 16 keep-alive clients sending
//! requests the whole time, and the choreography a deploy pipeline runs (canary steps,
//! promote, rollback, blue-green switches, a rolling restart, a SIGKILLed backend, a
//! backend whose health check starts failing). Every response is recorded and each
//! phase's traffic split checked. Used by `tests/deploy_under_load.rs` and by the
//! hidden `switchyard deploy-demo` command.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::load::{LoadRun, Record};
use crate::process::Switchyard;

/// Keep-alive client connections kept busy for the whole rehearsal.
pub const CLIENTS: usize = 16;

#[derive(Debug)]
pub struct RehearsalError(String);

impl std::fmt::Display for RehearsalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "deploy rehearsal: {}", self.0)
    }
}

impl std::error::Error for RehearsalError {}

fn fail(message: impl Into<String>) -> RehearsalError {
    RehearsalError(message.into())
}

pub struct Options {
    /// The switchyard binary to run (proxy and stand-ins).
    pub binary: PathBuf,
    /// Backends per pool.
    pub backends: usize,
    /// Requests to see in each phase before moving on.
    pub requests_per_phase: u64,
}

#[derive(Debug, Clone)]
pub struct PhaseReport {
    pub name: String,
    pub requests: u64,
    pub failed: u64,
    pub blue: f64,
    pub green: f64,
    /// Expected share of green, in percent.
    pub expected_green: f64,
    pub tolerance: f64,
}

impl PhaseReport {
    pub fn split_ok(&self) -> bool {
        self.requests > 0 && (self.green * 100.0 - self.expected_green).abs() <= self.tolerance
    }
}

pub struct Report {
    pub phases: Vec<PhaseReport>,
    pub requests: u64,
    pub failed: u64,
    pub failures: Vec<String>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| phase | requests | failed | blue | green | expected green |\n|---|---:|---:|---:|---:|---:|"
        );
        for p in &self.phases {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1}% | {:.1}% | {}{} |",
                p.name,
                p.requests,
                p.failed,
                p.blue * 100.0,
                p.green * 100.0,
                p.expected_green,
                if p.split_ok() { "%" } else { "% (OFF)" }
            );
        }
        let _ = writeln!(
            out,
            "| **all** | **{}** | **{}** | | | |",
            self.requests, self.failed
        );
        out
    }
}

struct StandIn {
    addr: SocketAddr,
    name: String,
    health_file: PathBuf,
    child: Child,
}

struct Rig {
    binary: PathBuf,
    /// Removed when the rig is dropped.
    dir: PathBuf,
    blue: Vec<StandIn>,
    green: Vec<StandIn>,
    proxy: Child,
    /// The processes a binary upgrade started (not children of this one).
    upgraded_to: Vec<u32>,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
        for pid in &self.upgraded_to {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        for s in self.blue.iter_mut().chain(self.green.iter_mut()) {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<SocketAddr, RehearsalError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| fail(format!("no free port: {e}")))?;
    listener.local_addr().map_err(|e| fail(e.to_string()))
}

fn spawn_stand_in(
    binary: &Path,
    addr: SocketAddr,
    name: &str,
    health_file: &Path,
) -> Result<Child, RehearsalError> {
    Command::new(binary)
        .args([
            "stand-in",
            "--listen",
            &addr.to_string(),
            "--name",
            name,
            "--health-file",
        ])
        .arg(health_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot start stand-in {name}: {e}")))
}

/// Waits until something accepts connections on `addr`.
async fn wait_listening(addr: SocketAddr) -> Result<(), RehearsalError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(fail(format!("nothing listens on {addr}")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

impl Rig {
    async fn start(options: &Options) -> Result<Rig, RehearsalError> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "switchyard-rehearsal-{}-{stamp}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        let mut pools: [Vec<StandIn>; 2] = [Vec::new(), Vec::new()];
        for (p, pool) in ["blue", "green"].iter().enumerate() {
            for i in 1..=options.backends {
                let addr = free_port()?;
                let name = format!("{pool}-{i}");
                let health_file = dir.join(format!("{name}.fail"));
                let child = spawn_stand_in(&options.binary, addr, &name, &health_file)?;
                pools[p].push(StandIn {
                    addr,
                    name,
                    health_file,
                    child,
                });
            }
        }
        for s in pools.iter().flatten() {
            wait_listening(s.addr).await?;
        }
        let list = |pool: &[StandIn]| {
            pool.iter()
                .map(|s| format!("\"{}\"", s.addr))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [state]\npath = \"{state}\"\n\
             [pools.blue]\nbackends = [{blue}]\npassive = {{ ejection_time = \"2s\" }}\n\
             [pools.blue.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n\
             [pools.green]\nbackends = [{green}]\n\
             [pools.green.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n\
             [services.app]\nactive = \"blue\"\n",
            state = dir.join("state.json").display(),
            blue = list(&pools[0]),
            green = list(&pools[1]),
        );
        let config_path = dir.join("switchyard.toml");
        std::fs::write(&config_path, config).map_err(|e| fail(e.to_string()))?;
        let mut command = Command::new(&options.binary);
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn,switchyard=info")
            .stdout(Stdio::null());
        let proxy = tokio::task::spawn_blocking(move || Switchyard::start(command, false))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(fail)?;
        let [blue, green] = pools;
        let rig = Rig {
            binary: options.binary.clone(),
            proxy_addr: proxy.proxy_addr,
            admin_addr: proxy.admin_addr,
            dir,
            blue,
            green,
            proxy: proxy.child,
            upgraded_to: Vec::new(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        rig.wait_ready().await?;
        Ok(rig)
    }

    async fn wait_ready(&self) -> Result<(), RehearsalError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = self.call("GET", "/readyz", None).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(fail("switchyard never became ready"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), RehearsalError> {
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.admin_addr))
            .body(Full::new(
                body.map(|b| Bytes::from(b.to_string())).unwrap_or_default(),
            ))
            .map_err(|e| fail(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| fail(format!("admin call: {e}")))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// An admin call that must succeed.
    async fn change(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, RehearsalError> {
        let (status, answer) = self.call(method, path, body).await?;
        if !(200..300).contains(&status) {
            return Err(fail(format!("{method} {path}: {status} {answer}")));
        }
        Ok(answer)
    }

    async fn backend_field(&self, addr: SocketAddr, field: &str) -> Result<String, RehearsalError> {
        let (_, state) = self.call("GET", "/api/v1/state", None).await?;
        let addr = addr.to_string();
        state["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["backends"].as_array().into_iter().flatten())
            .find(|b| b["addr"] == addr.as_str())
            .and_then(|b| b[field].as_str().map(String::from))
            .ok_or_else(|| fail(format!("backend {addr} not in the state")))
    }

    async fn wait_health(&self, addr: SocketAddr, want: &str) -> Result<(), RehearsalError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.backend_field(addr, "health").await? != want {
            if Instant::now() > deadline {
                return Err(fail(format!("{addr} never became {want}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Drain, wait for nothing in flight, stop, start again, wait healthy, enable.
    async fn restart(&mut self, index: usize) -> Result<(), RehearsalError> {
        let addr = self.blue[index].addr;
        let base = format!("/api/v1/pools/blue/backends/{addr}");
        self.change("POST", &format!("{base}/drain"), None).await?;
        self.change("GET", &format!("{base}/wait-drained?timeout=30s"), None)
            .await?;
        let stand_in = &mut self.blue[index];
        let _ = stand_in.child.kill();
        let _ = stand_in.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The old process's port is free again once it is gone.
            if TcpListener::bind(addr).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(fail(format!("{addr} still taken after the stop")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stand_in.child = spawn_stand_in(&self.binary, addr, &stand_in.name, &stand_in.health_file)?;
        wait_listening(addr).await?;
        self.wait_health(addr, "healthy").await?;
        self.change("POST", &format!("{base}/enable"), None).await?;
        Ok(())
    }
}

/// One step of the choreography: when its call was sent and returned, and the green
/// share expected while it holds.
struct Mark {
    name: String,
    sent: Instant,
    returned: Instant,
    expected_green: f64,
    /// The split holds while the step runs too (restarts, kills): count from `sent`.
    during: bool,
}

pub async fn run(options: Options) -> Result<Report, RehearsalError> {
    let mut rig = Rig::start(&options).await?;
    let load = Load(LoadRun::start(rig.proxy_addr, "/", CLIENTS));
    let per_phase = options.requests_per_phase;
    let mut marks: Vec<Mark> = Vec::new();
    let started = Instant::now();
    marks.push(Mark {
        name: "baseline: blue active".into(),
        sent: started,
        returned: started,
        expected_green: 0.0,
        during: true,
    });
    load.wait_for(per_phase).await?;

    macro_rules! step {
        ($name:expr, $green:expr, $during:expr, $action:expr) => {{
            let sent = Instant::now();
            $action;
            marks.push(Mark {
                name: $name.to_string(),
                sent,
                returned: Instant::now(),
                expected_green: $green,
                during: $during,
            });
            load.wait_for(per_phase).await?;
        }};
    }

    for weight in [5.0, 25.0, 50.0] {
        step!(format!("canary {weight}% to green"), weight, false, {
            rig.change(
                "PUT",
                "/api/v1/services/app/canary",
                Some(json!({"pool": "green", "weight": weight})),
            )
            .await?
        });
    }
    step!(
        "promote green",
        100.0,
        false,
        rig.change("POST", "/api/v1/services/app/promote", None)
            .await?
    );
    step!(
        "rollback to blue",
        0.0,
        false,
        rig.change("POST", "/api/v1/services/app/rollback", None)
            .await?
    );
    step!("switch to green", 100.0, false, {
        rig.change(
            "POST",
            "/api/v1/services/app/switch",
            Some(json!({"to": "green"})),
        )
        .await?
    });
    step!("switch back to blue", 0.0, false, {
        rig.change(
            "POST",
            "/api/v1/services/app/switch",
            Some(json!({"to": "blue"})),
        )
        .await?
    });
    step!("config reload (a service added)", 0.0, false, {
        let path = rig.dir.join("switchyard.toml");
        let mut config = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
        config.push_str("[services.preview]\npath_prefix = \"/preview\"\nactive = \"green\"\n");
        std::fs::write(&path, config).map_err(|e| fail(e.to_string()))?;
        rig.change("POST", "/api/v1/config/reload", None).await?
    });
    step!("binary upgrade", 0.0, true, {
        let answer = rig.change("POST", "/api/v1/upgrade", None).await?;
        let new_pid = answer["new_pid"]
            .as_u64()
            .ok_or_else(|| fail(format!("upgrade answered {answer}")))?;
        rig.upgraded_to.push(new_pid as u32);
        // The old process drains and exits 0; the new one answers from here on.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rig.proxy.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => {
                    return Err(fail(format!("the old process exited with {status}")))
                }
                _ if Instant::now() > deadline => return Err(fail("the old process did not exit")),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        answer
    });
    step!("rolling restart of blue", 0.0, true, {
        for i in 0..rig.blue.len() {
            rig.restart(i).await?;
            load.wait_for(per_phase / 4).await?;
        }
    });
    step!("SIGKILL of blue-1", 0.0, true, {
        let victim = &mut rig.blue[0];
        let _ = victim.child.kill();
        let _ = victim.child.wait();
        let addr = victim.addr;
        rig.wait_health(addr, "unhealthy").await?;
    });
    // Bring blue-1 back, outside any phase's window, for the last phase.
    let sent = Instant::now();
    {
        let stand_in = &mut rig.blue[0];
        stand_in.child = spawn_stand_in(
            &rig.binary,
            stand_in.addr,
            &stand_in.name,
            &stand_in.health_file,
        )?;
        let addr = stand_in.addr;
        wait_listening(addr).await?;
        rig.wait_health(addr, "healthy").await?;
    }
    marks.push(Mark {
        name: "(blue-1 restarted)".into(),
        sent,
        returned: Instant::now(),
        expected_green: 0.0,
        during: false,
    });
    load.wait_for(per_phase / 2).await?;
    step!("blue-2 health check failing", 0.0, true, {
        let target = rig.blue.get(1).unwrap_or(&rig.blue[0]);
        std::fs::write(&target.health_file, b"fail").map_err(|e| fail(e.to_string()))?;
        rig.wait_health(target.addr, "unhealthy").await?;
    });
    let ended = Instant::now();
    let samples = load.0.finish().await;
    let _ = std::fs::remove_dir_all(rig.dir.join("unused"));
    drop(rig);

    let mut phases = Vec::new();
    for (i, mark) in marks.iter().enumerate() {
        if mark.name.starts_with('(') {
            continue;
        }
        let window_end = marks.get(i + 1).map_or(ended, |next| next.sent);
        // Requests routed after the call returned and answered before the next began;
        // failures count in the phase they started in, wherever they fall.
        let settled: Vec<&Record> = samples
            .iter()
            .filter(|s| {
                let from = if mark.during {
                    mark.sent
                } else {
                    mark.returned
                };
                s.started >= from && s.finished <= window_end && !failed(s)
            })
            .collect();
        let failed_here = samples
            .iter()
            .filter(|s| failed(s) && s.started >= mark.sent && s.started < window_end)
            .count() as u64;
        let green = settled
            .iter()
            .filter(|s| pool_of(s) == Some("green"))
            .count() as f64;
        let blue = settled
            .iter()
            .filter(|s| pool_of(s) == Some("blue"))
            .count() as f64;
        let n = settled.len().max(1) as f64;
        let p = mark.expected_green / 100.0;
        // Exact phases must be exact; split phases within 4 standard deviations + 1 point.
        let tolerance = if p == 0.0 || p == 1.0 {
            0.0
        } else {
            4.0 * (p * (1.0 - p) / n).sqrt() * 100.0 + 1.0
        };
        phases.push(PhaseReport {
            name: mark.name.clone(),
            requests: settled.len() as u64 + failed_here,
            failed: failed_here,
            blue: blue / n,
            green: green / n,
            expected_green: mark.expected_green,
            tolerance,
        });
    }
    let failures: Vec<String> = samples
        .iter()
        .filter(|s| failed(s))
        .filter_map(|s| {
            s.failure()
                .or_else(|| Some(format!("served by `{}`", s.upstream)))
        })
        .take(10)
        .collect();
    Ok(Report {
        requests: samples.len() as u64,
        failed: samples.iter().filter(|s| failed(s)).count() as u64,
        phases,
        failures,
    })
}

/// The load of the whole rehearsal.
struct Load(LoadRun);

impl Load {
    /// Waits for `more` requests; two minutes without them means the clients are stuck
    /// behind the proxy, which fails the rehearsal rather than hanging it.
    async fn wait_for(&self, more: u64) -> Result<(), RehearsalError> {
        if self.0.sent_more(more, Duration::from_secs(120)).await {
            Ok(())
        } else {
            Err(fail(format!(
                "the clients sent fewer than {more} requests in 2 minutes"
            )))
        }
    }
}

/// `blue` or `green`: the pool of the stand-in that answered (`blue-1`, `green-2` ...).
fn pool_of(record: &Record) -> Option<&'static str> {
    let name = record.upstream.as_str();
    if name.starts_with("blue-") {
        Some("blue")
    } else if name.starts_with("green-") {
        Some("green")
    } else {
        None
    }
}

/// A failure to the clients: an error, a status other than 200, or an answer from
/// something that is not one of the stand-ins.
fn failed(record: &Record) -> bool {
    record.failed() || pool_of(record).is_none()
}
