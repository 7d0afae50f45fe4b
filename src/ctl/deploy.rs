//! The deploys as one command each: `ctl roll` (a rolling restart of a pool, backend by
//! backend), `ctl release` (deploy the idle pool, test it through the proxy's preview
//! route, switch), and `wait-healthy`. Every wait is on switchyard's own view: a
//! backend is healthy again when a health check that ran after its restart passed.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{segment, Api, CtlError};

/// `ctl roll`'s settings.
pub(super) struct Roll<'a> {
    pub(super) pool: &'a str,
    pub(super) exec: &'a str,
    pub(super) max_unavailable: usize,
    pub(super) drain_timeout: Duration,
    pub(super) health_timeout: Duration,
    pub(super) start_at: Option<&'a str>,
    pub(super) json: bool,
}

/// Progress, as a line on a terminal or one JSON event per line.
struct Progress {
    json: bool,
    started: Instant,
}

impl Progress {
    fn event(&self, event: &str, backend: Option<&str>, detail: &str) {
        let elapsed = self.started.elapsed();
        let line = if self.json {
            json!({
                "event": event,
                "backend": backend,
                "detail": detail,
                "elapsed_ms": elapsed.as_millis() as u64,
            })
            .to_string()
        } else {
            format!(
                "[{:>6.1}s] {:<9} {}{}",
                elapsed.as_secs_f64(),
                event,
                backend.map(|b| format!("{b} ")).unwrap_or_default(),
                detail
            )
        };
        // A closed stdout must not stop a deploy half-way.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), format!("{line}\n").as_bytes());
    }
}

/// A backend as the pool view shows it.
#[derive(Debug, Clone)]
struct BackendState {
    addr: String,
    health: String,
    state: String,
    checks: u64,
    last_check_ok: bool,
}

async fn backends(api: &Api, pool: &str) -> Result<Vec<BackendState>, CtlError> {
    let view = api
        .call(
            Method::GET,
            &format!("/api/v1/pools/{}", segment(pool)),
            None,
        )
        .await?;
    Ok(view["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| BackendState {
            addr: b["addr"].as_str().unwrap_or_default().to_string(),
            health: b["health"].as_str().unwrap_or_default().to_string(),
            state: b["state"].as_str().unwrap_or_default().to_string(),
            checks: b["checks"].as_u64().unwrap_or(0),
            last_check_ok: b["last_check_ok"].as_bool().unwrap_or(false),
        })
        .collect())
}

fn backend_path(pool: &str, addr: &str, action: &str) -> String {
    format!(
        "/api/v1/pools/{}/backends/{}/{action}",
        segment(pool),
        segment(addr)
    )
}

/// Waits until every backend of `addrs` is healthy by a check that ran after
/// `checks_before` (its count then), or `timeout` passes.
async fn wait_healthy_after(
    api: &Api,
    pool: &str,
    checks_before: &[(String, u64)],
    timeout: Duration,
) -> Result<(), CtlError> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = backends(api, pool).await?;
        let pending: Vec<&str> = checks_before
            .iter()
            .filter(|(addr, before)| {
                !now.iter().any(|b| {
                    b.addr == *addr
                        && b.checks > *before
                        && b.last_check_ok
                        && b.health == "healthy"
                })
            })
            .map(|(addr, _)| addr.as_str())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CtlError::Usage(format!(
                "health timeout: {} not healthy after {}",
                pending.join(", "),
                humantime::format_duration(timeout)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The check counts of `addrs` now.
async fn checks_now(
    api: &Api,
    pool: &str,
    addrs: &[String],
) -> Result<Vec<(String, u64)>, CtlError> {
    let now = backends(api, pool).await?;
    Ok(addrs
        .iter()
        .map(|addr| {
            let checks = now.iter().find(|b| b.addr == *addr).map_or(0, |b| b.checks);
            (addr.clone(), checks)
        })
        .collect())
}

/// `ctl wait-healthy` and `enable --wait-healthy`: healthy by a check that ran after
/// the call.
pub(super) async fn wait_healthy(
    api: &Api,
    pool: &str,
    backend: &str,
    timeout: Duration,
) -> Result<Value, CtlError> {
    let before = checks_now(api, pool, &[backend.to_string()]).await?;
    wait_healthy_after(api, pool, &before, timeout).await?;
    let now = backends(api, pool).await?;
    let found = now.iter().find(|b| b.addr == backend);
    Ok(json!({
        "pool": pool,
        "addr": backend,
        "health": found.map(|b| b.health.clone()),
        "state": found.map(|b| b.state.clone()),
    }))
}

/// Runs `sh -c command` with `env`, passing its output through prefixed by `prefix`
/// (to stderr in JSON mode, so stdout stays one event per line).
async fn run_command(
    command: &str,
    env: &[(&str, String)],
    prefix: &str,
    json: bool,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run `sh -c {command}`: {e}"))?;
    let pass = |stream: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>, to_stderr: bool| {
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let Some(stream) = stream else { return };
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let text = format!("  {prefix} | {line}\n");
                if to_stderr {
                    let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
                } else {
                    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
                }
            }
        })
    };
    type Stream = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
    let out = pass(child.stdout.take().map(|s| Box::new(s) as Stream), json);
    let err = pass(child.stderr.take().map(|s| Box::new(s) as Stream), true);
    let status = child
        .wait()
        .await
        .map_err(|e| format!("`{command}` could not be waited for: {e}"))?;
    let _ = out.await;
    let _ = err.await;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{command}` exited with {status}"))
    }
}

/// Ctrl-C during a roll: the first stops after the backends in hand are back in
/// rotation, the second exits at once, leaving them drained.
struct Interrupt {
    presses: Arc<AtomicU8>,
}

impl Interrupt {
    fn watch(in_hand: Arc<Mutex<Vec<String>>>, pool: String) -> Interrupt {
        let presses = Arc::new(AtomicU8::new(0));
        let counter = Arc::clone(&presses);
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    eprintln!(
                        "interrupted: stopping once the backends in hand are back (Ctrl-C again to leave them drained)"
                    );
                    continue;
                }
                let left = in_hand.lock().map(|l| l.join(", ")).unwrap_or_default();
                eprintln!(
                    "interrupted again: {left} left drained in pool {pool}; `switchyard ctl enable {pool} ADDR` returns one"
                );
                std::process::exit(130);
            }
        });
        Interrupt { presses }
    }

    fn requested(&self) -> bool {
        self.presses.load(Ordering::SeqCst) > 0
    }
}

/// `ctl roll`: drain, wait for nothing in flight, run the command, wait healthy,
/// enable, for each backend of the pool (`max_unavailable` at a time). Stops at the
/// first failure, leaving that batch drained and the rest untouched.
pub(super) async fn roll(api: &Api, roll: &Roll<'_>) -> Result<String, CtlError> {
    let progress = Progress {
        json: roll.json,
        started: Instant::now(),
    };
    let all = backends(api, roll.pool).await?;
    if all.is_empty() {
        return Err(CtlError::Usage(format!(
            "pool {} has no backends",
            roll.pool
        )));
    }
    let start = match roll.start_at {
        None => 0,
        Some(addr) => all.iter().position(|b| b.addr == addr).ok_or_else(|| {
            CtlError::Usage(format!(
                "--start-at {addr}: not a backend of pool {}",
                roll.pool
            ))
        })?,
    };
    let order: Vec<String> = all[start..].iter().map(|b| b.addr.clone()).collect();
    let in_hand = Arc::new(Mutex::new(Vec::new()));
    let interrupt = Interrupt::watch(Arc::clone(&in_hand), roll.pool.to_string());
    let mut done = Vec::new();
    progress.event(
        "start",
        None,
        &format!(
            "rolling {} backends of pool {}, {} at a time",
            order.len(),
            roll.pool,
            roll.max_unavailable
        ),
    );
    for batch in order.chunks(roll.max_unavailable.max(1)) {
        if interrupt.requested() {
            let rest: Vec<&str> = order[done.len()..].iter().map(String::as_str).collect();
            return Err(CtlError::Usage(format!(
                "interrupted: rolled {}; not reached: {} (all in rotation). Resume with --start-at {}",
                done.join(", "),
                rest.join(", "),
                rest.first().copied().unwrap_or("-")
            )));
        }
        let outcome = roll_batch(api, roll, batch, &progress, &in_hand).await;
        if let Err(reason) = outcome {
            let untouched: Vec<&str> = order[done.len() + batch.len()..]
                .iter()
                .map(String::as_str)
                .collect();
            progress.event("failed", None, &reason);
            return Err(CtlError::Usage(format!(
                "roll stopped: {reason}. {} stays drained (out of rotation); not reached, untouched: {}. \
                 Fix it, then `switchyard ctl enable {pool} ADDR`, or resume the roll with --start-at {}",
                batch.join(", "),
                if untouched.is_empty() { "none".to_string() } else { untouched.join(", ") },
                batch[0],
                pool = roll.pool,
            )));
        }
        done.extend(batch.iter().cloned());
    }
    progress.event("done", None, &format!("{} backends rolled", done.len()));
    Ok(String::new())
}

async fn roll_batch(
    api: &Api,
    roll: &Roll<'_>,
    batch: &[String],
    progress: &Progress,
    in_hand: &Mutex<Vec<String>>,
) -> Result<(), String> {
    let pool = roll.pool;
    let text = |e: CtlError| e.to_string();
    // The pool must keep a healthy backend in rotation while this batch is out.
    let now = backends(api, pool).await.map_err(text)?;
    let serving = now
        .iter()
        .filter(|b| !batch.contains(&b.addr) && b.state == "active" && b.health == "healthy")
        .count();
    if serving == 0 {
        return Err(format!(
            "refusing to drain {}: no other backend of pool {pool} is healthy and active",
            batch.join(", ")
        ));
    }
    if let Ok(mut hand) = in_hand.lock() {
        *hand = batch.to_vec();
    }
    for addr in batch {
        progress.event("drain", Some(addr), "");
        api.call(Method::POST, &backend_path(pool, addr, "drain"), None)
            .await
            .map_err(text)?;
    }
    let timeout = humantime::format_duration(roll.drain_timeout)
        .to_string()
        .replace(' ', "");
    for addr in batch {
        api.call(
            Method::GET,
            &format!(
                "{}?timeout={timeout}",
                backend_path(pool, addr, "wait-drained")
            ),
            None,
        )
        .await
        .map_err(|e| format!("drain timeout on {addr}: {e}"))?;
        progress.event("drained", Some(addr), "nothing in flight");
    }
    let mut runs = Vec::new();
    for addr in batch {
        progress.event("exec", Some(addr), roll.exec);
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
        let env = vec![
            ("SWITCHYARD_POOL", pool.to_string()),
            ("SWITCHYARD_BACKEND", addr.clone()),
            (
                "SWITCHYARD_BACKEND_HOST",
                host.trim_matches(['[', ']']).to_string(),
            ),
            ("SWITCHYARD_BACKEND_PORT", port.to_string()),
        ];
        let exec = roll.exec.to_string();
        let addr = addr.clone();
        let json = roll.json;
        // The batch's commands run side by side.
        runs.push(tokio::spawn(async move {
            run_command(&exec, &env, &addr, json)
                .await
                .map_err(|e| format!("{addr}: {e}"))
        }));
    }
    let mut failed = None;
    for run in runs {
        let result = run.await.unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = result {
            failed.get_or_insert(e);
        }
    }
    if let Some(failed) = failed {
        return Err(failed);
    }
    let before = checks_now(api, pool, batch).await.map_err(text)?;
    progress.event(
        "health",
        None,
        &format!("waiting for {} to pass a fresh check", batch.join(", ")),
    );
    wait_healthy_after(api, pool, &before, roll.health_timeout)
        .await
        .map_err(text)?;
    for addr in batch {
        api.call(Method::POST, &backend_path(pool, addr, "enable"), None)
            .await
            .map_err(text)?;
        progress.event("enabled", Some(addr), "back in rotation");
    }
    if let Ok(mut hand) = in_hand.lock() {
        hand.clear();
    }
    Ok(())
}

/// `ctl release`'s settings.
pub(super) struct Release<'a> {
    pub(super) service: &'a str,
    pub(super) to: &'a str,
    pub(super) exec: Option<&'a str>,
    pub(super) test: Option<&'a str>,
    pub(super) health_timeout: Duration,
    pub(super) json: bool,
}

/// `ctl release`: deploy the idle pool, wait until it is all healthy, test it through
/// the proxy's preview route, switch. A failed step switches nothing.
pub(super) async fn release(api: &Api, release: &Release<'_>) -> Result<String, CtlError> {
    let progress = Progress {
        json: release.json,
        started: Instant::now(),
    };
    let state = api.call(Method::GET, "/api/v1/state", None).await?;
    let view = state["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == release.service)
        .cloned()
        .ok_or_else(|| CtlError::Usage(format!("unknown service `{}`", release.service)))?;
    let previous = view["active"].as_str().unwrap_or_default().to_string();
    if previous == release.to {
        return Err(CtlError::Usage(format!(
            "{} already sends its traffic to {}: nothing to release",
            release.service, release.to
        )));
    }
    let fail = |step: &str, reason: String| {
        progress.event("failed", None, &format!("{step}: {reason}"));
        CtlError::Usage(format!(
            "release stopped at {step}: {reason}; nothing switched, {} still serves {}",
            previous, release.service
        ))
    };
    let env_base = vec![
        ("SWITCHYARD_SERVICE", release.service.to_string()),
        ("SWITCHYARD_POOL", release.to.to_string()),
    ];
    if let Some(exec) = release.exec {
        progress.event("exec", Some(release.to), exec);
        run_command(exec, &env_base, release.to, release.json)
            .await
            .map_err(|e| fail("exec", e))?;
    }
    let addrs: Vec<String> = backends(api, release.to)
        .await?
        .into_iter()
        .map(|b| b.addr)
        .collect();
    let before = checks_now(api, release.to, &addrs).await?;
    progress.event(
        "health",
        Some(release.to),
        "waiting for every backend to pass a fresh check",
    );
    wait_healthy_after(api, release.to, &before, release.health_timeout)
        .await
        .map_err(|e| fail("health", e.to_string()))?;
    if let Some(test) = release.test {
        let info = api.call(Method::GET, "/api/v1/info", None).await?;
        let proxy = info["listen"]["proxy"].as_str().unwrap_or_default();
        // A wildcard listen address is reached on loopback from here.
        let proxy = proxy
            .replace("0.0.0.0:", "127.0.0.1:")
            .replace("[::]:", "[::1]:");
        let mut env = env_base.clone();
        env.push(("SWITCHYARD_PROXY", format!("http://{proxy}")));
        let preview = &view["preview"];
        let previews_pool = preview["pools"]
            .as_array()
            .is_some_and(|p| p.iter().any(|name| name == release.to));
        if let (true, Some(header)) = (previews_pool, preview["header"].as_str()) {
            env.push((
                "SWITCHYARD_PREVIEW_HEADER",
                format!("{header}: {}", release.to),
            ));
        } else {
            progress.event(
                "warning",
                None,
                &format!(
                    "service {} has no preview route to {}: the test reaches the proxy without SWITCHYARD_PREVIEW_HEADER",
                    release.service, release.to
                ),
            );
        }
        progress.event("test", Some(release.to), test);
        run_command(test, &env, "test", release.json)
            .await
            .map_err(|e| fail("test", e))?;
    }
    api.call(
        Method::POST,
        &format!("/api/v1/services/{}/switch", segment(release.service)),
        Some(json!({ "to": release.to })),
    )
    .await
    .map_err(|e| fail("switch", e.to_string()))?;
    progress.event(
        "switched",
        Some(release.to),
        &format!(
            "{} now serves {}; to roll back: switchyard ctl switch {} {previous}",
            release.to, release.service, release.service
        ),
    );
    Ok(String::new())
}
