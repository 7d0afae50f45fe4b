//! Rollouts judged and moved by the proxy, and mirroring, under real load: real app
//! servers that can be made to fail a share of requests or to answer slowly, a real
//! client, and the proxy's admin API.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

/// An app server whose failures and latency the test sets: every `fail_every`-th
/// request (0: none) answers 500, each answer waits `delay_ms`, and it keeps the
/// bodies it was sent.
struct ShapedApp {
    addr: SocketAddr,
    fail_every: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    hits: Arc<AtomicU64>,
    bodies: Arc<Mutex<Vec<(String, Bytes, bool)>>>,
    task: tokio::task::JoinHandle<()>,
    /// Its connections, closed with it: a dropped app is a dead one.
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl ShapedApp {
    async fn start(name: &'static str) -> ShapedApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fail_every = Arc::new(AtomicU64::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let hits = Arc::new(AtomicU64::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let shared = (
            Arc::clone(&fail_every),
            Arc::clone(&delay_ms),
            Arc::clone(&hits),
            Arc::clone(&bodies),
        );
        let connections = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (fail_every, delay_ms, hits, bodies) = shared.clone();
                let connection = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (fail_every, delay_ms, hits, bodies) = (
                            fail_every.clone(),
                            delay_ms.clone(),
                            hits.clone(),
                            bodies.clone(),
                        );
                        async move {
                            if req.uri().path() == "/health" {
                                return Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())));
                            }
                            let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                            let path = req.uri().path().to_string();
                            let mirrored = req.headers().contains_key("x-switchyard-mirror");
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            bodies.lock().unwrap().push((path, body, mirrored));
                            let delay = delay_ms.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let every = fail_every.load(Ordering::SeqCst);
                            let status = if every > 0 && n % every == 0 {
                                500
                            } else {
                                200
                            };
                            let mut response = Response::new(Full::new(Bytes::from(name)));
                            *response.status_mut() = StatusCode::from_u16(status).unwrap();
                            response
                                .headers_mut()
                                .insert("x-upstream", name.parse().unwrap());
                            Ok(response)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                open.lock().unwrap().push(connection.abort_handle());
            }
        });
        ShapedApp {
            addr,
            fail_every,
            delay_ms,
            hits,
            bodies,
            task,
            connections,
        }
    }
}

impl Drop for ShapedApp {
    fn drop(&mut self) {
        self.task.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

/// Service `app` on `blue`, with `green` (and `mirror`, when given) as other pools.
fn config(
    blue: SocketAddr,
    green: SocketAddr,
    mirror: Option<SocketAddr>,
    state: &std::path::Path,
) -> String {
    let health =
        "[pools.{}.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\n";
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream_header_timeout = \"2s\"\nmirror_max_body = \"1KiB\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n\
         [pools.blue]\nbackends = [\"{blue}\"]\n{}\
         [pools.green]\nbackends = [\"{green}\"]\n{}",
        state.display(),
        health.replace("{}", "blue"),
        health.replace("{}", "green"),
    );
    if let Some(mirror) = mirror {
        text.push_str(&format!("[pools.shadow]\nbackends = [\"{mirror}\"]\n"));
    }
    text.push_str("[services.app]\nactive = \"blue\"\n");
    text
}

async fn rollout_of(proxy: &switchyard::server::Running) -> Value {
    admin(
        proxy.admin_addr,
        "GET",
        "/api/v1/services/app/rollout",
        None,
        &[],
    )
    .await
    .1
}

/// Polls the rollout until `done` says so; returns the last view.
async fn rollout_until(
    proxy: &switchyard::server::Running,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let view = rollout_of(proxy).await;
        if done(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; rollout: {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn status_is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |v: &Value| v["status"] == status
}

async fn start(proxy: &switchyard::server::Running, body: Value) -> (StatusCode, Value) {
    admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/rollout",
        Some(body),
        &[],
    )
    .await
}

async fn ready(proxy: &switchyard::server::Running) {
    eventually(Duration::from_secs(10), "first health round", || {
        proxy.shared.control.first_round_done()
    })
    .await;
}

/// Blue and green app servers, and a proxy in front of them (state in a temporary
/// directory) that has done its first round of health checks.
async fn blue_green_proxy() -> (
    ShapedApp,
    ShapedApp,
    tempfile::TempDir,
    switchyard::server::Running,
) {
    let (blue, green) = (
        ShapedApp::start("blue").await,
        ShapedApp::start("green").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&config(
        blue.addr,
        green.addr,
        None,
        &dir.path().join("state.json"),
    ))
    .await;
    ready(&proxy).await;
    (blue, green, dir, proxy)
}

fn history_kinds(history: &Value) -> Vec<String> {
    history["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_30_percent_is_rolled_back_within_two_windows() {
    let (blue, green) = (
        ShapedApp::start("blue").await,
        ShapedApp::start("green").await,
    );
    green.fail_every.store(3, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&config(
        blue.addr,
        green.addr,
        None,
        &dir.path().join("state.json"),
    ))
    .await;
    ready(&proxy).await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(50).await;
    let (status, started) = start(
        &proxy,
        json!({
            "pool": "green", "steps": [20, 50, 100], "hold": "3s",
            "analysis": {"interval": "400ms", "min_requests": 20, "max_error_rate": 0.05}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!(started["status"], "progressing");
    assert_eq!(started["weight"], 20.0);
    let ended = rollout_until(
        &proxy,
        Duration::from_secs(15),
        "the rollback",
        status_is("rolled_back"),
    )
    .await;
    let rolled_back_at = Instant::now();
    load.wait_for(200).await;
    let records = load.finish().await;

    // Judged on the windows, and at the first failing one (failure_limit 0).
    let results = ended["results"].as_array().unwrap();
    assert!(
        results.len() <= 2,
        "{} windows before the rollback: {ended:#}",
        results.len()
    );
    assert_eq!(results.last().unwrap()["verdict"], "fail");
    let reason = ended["reason"].as_str().unwrap();
    assert!(
        reason.contains("error rate") && reason.contains("above max_error_rate 5.00%"),
        "{reason}"
    );
    assert_eq!(ended["verdict"]["verdict"], "fail");
    assert!(ended["verdict"]["canary"]["errors"].as_u64().unwrap() > 0);
    assert_eq!(ended["weight"], 0.0);
    assert_eq!(ended["step"], 1, "never went past the first step");

    let (_, service) = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert!(service["services"][0]["canary"].is_null(), "{service}");
    assert_eq!(service["services"][0]["active"], "blue");
    let (_, history) = admin(
        proxy.admin_addr,
        "GET",
        "/api/v1/services/app/history",
        None,
        &[],
    )
    .await;
    let kinds = history_kinds(&history);
    assert!(
        kinds.ends_with(&["rollout_start".into(), "rollout_rollback".into()]),
        "{kinds:?}"
    );
    let recorded = history["history"].as_array().unwrap().last().unwrap()["reason"].clone();
    assert!(
        recorded
            .as_str()
            .is_some_and(|r| r.contains("above max_error_rate 5.00%")),
        "the reason, with its numbers, is in the history: {history}"
    );

    let failed: Vec<&Record> = records.iter().filter(|r| r.failed()).collect();
    eprintln!(
        "failed client requests: {} of {} ({} windows judged)",
        failed.len(),
        records.len(),
        results.len()
    );
    assert!(
        failed.iter().all(|r| r.upstream == "green"),
        "only the canary failed"
    );
    // Every failure came from before the rollback took effect.
    assert!(
        failed.iter().all(|r| r.started < rolled_back_at),
        "a failure after the rollback"
    );
    let after: Vec<&Record> = records
        .iter()
        .filter(|r| r.started > rolled_back_at)
        .collect();
    assert!(after.len() >= 100 && after.iter().all(|r| r.upstream == "blue"));

    let metrics = send(&client(), get(proxy.admin_addr, "/metrics"))
        .await
        .text();
    assert!(
        metrics.contains("switchyard_rollout_analysis_total{result=\"fail\",service=\"app\"} 1"),
        "{metrics}"
    );
    assert!(metrics
        .contains("switchyard_traffic_changes_total{kind=\"rollout_rollback\",service=\"app\"} 1"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_walks_10_50_100_and_is_promoted_with_no_failed_request() {
    let (_blue, _green, _dir, proxy) = blue_green_proxy().await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(50).await;
    let (status, started) = start(
        &proxy,
        json!({
            "pool": "green", "steps": [10, 50, 100], "hold": "600ms", "sticky": "header:x-user",
            "analysis": {"interval": "300ms", "min_requests": 10, "max_error_rate": 0.01,
                         "max_error_rate_increase": 0.01, "max_p99_ratio": 3}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let mut weights_seen = vec![];
    let deadline = Instant::now() + Duration::from_secs(20);
    let ended = loop {
        let view = rollout_of(&proxy).await;
        let weight = view["weight"].as_f64().unwrap();
        if weights_seen.last() != Some(&weight) {
            weights_seen.push(weight);
        }
        if view["status"] != "progressing" {
            break view;
        }
        assert!(Instant::now() < deadline, "not promoted: {view:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    load.wait_for(100).await;
    let records = load.finish().await;
    assert_eq!(ended["status"], "promoted", "{ended:#}");
    assert_no_failures(&records);
    assert_eq!(weights_seen[..3], [10.0, 50.0, 100.0], "{weights_seen:?}");
    assert!(ended["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["verdict"] == "pass" || w["verdict"] == "inconclusive"));
    let (_, state) = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(state["services"][0]["active"], "green");
    assert_eq!(state["services"][0]["previous_active"], "blue");
    assert!(state["services"][0]["canary"].is_null());
    let (_, history) = admin(
        proxy.admin_addr,
        "GET",
        "/api/v1/services/app/history",
        None,
        &[],
    )
    .await;
    let kinds = history_kinds(&history);
    assert!(
        kinds.ends_with(&[
            "rollout_start".into(),
            "rollout_step".into(),
            "rollout_step".into(),
            "rollout_promote".into()
        ]),
        "{kinds:?}"
    );
    let last = records.last().unwrap();
    assert_eq!(last.upstream, "green");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_is_only_slower_is_rolled_back_on_its_p99() {
    let (blue, green) = (
        ShapedApp::start("blue").await,
        ShapedApp::start("green").await,
    );
    // p99 x3, nothing else: 8 ms against 24 ms.
    blue.delay_ms.store(8, Ordering::SeqCst);
    green.delay_ms.store(24, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&config(
        blue.addr,
        green.addr,
        None,
        &dir.path().join("state.json"),
    ))
    .await;
    ready(&proxy).await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 8);
    load.wait_for(50).await;
    let (status, body) = start(
        &proxy,
        json!({
            "pool": "green", "steps": [30, 100], "hold": "5s",
            "analysis": {"interval": "600ms", "min_requests": 10, "max_p99_ratio": 1.5}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ended = rollout_until(&proxy, Duration::from_secs(15), "the rollback", |v| {
        v["status"] != "progressing"
    })
    .await;
    let records = load.finish().await;
    assert_eq!(ended["status"], "rolled_back", "{ended:#}");
    let reason = ended["reason"].as_str().unwrap();
    assert!(
        reason.contains("p99") && reason.contains("max_p99_ratio 1.5"),
        "{reason}"
    );
    assert_no_failures(&records);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_traffic_stays_inconclusive_and_does_not_advance() {
    let (_blue, _green, _dir, proxy) = blue_green_proxy().await;
    let (status, body) = start(
        &proxy,
        json!({
            "pool": "green", "steps": [50, 100], "hold": "200ms",
            "analysis": {"interval": "200ms", "min_requests": 50}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A trickle: a few requests a window, far under min_requests.
    let client = client();
    let view = {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            send(&client, get(proxy.proxy_addr, "/")).await;
            let view = rollout_of(&proxy).await;
            if view["results"].as_array().is_some_and(|r| r.len() >= 4) {
                break view;
            }
            assert!(Instant::now() < deadline, "{view:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(view["status"], "progressing");
    assert_eq!(view["step"], 1);
    assert_eq!(view["weight"], 50.0);
    for window in view["results"].as_array().unwrap() {
        assert_eq!(window["verdict"], "inconclusive", "{window}");
        assert!(window["reasons"][0]
            .as_str()
            .unwrap()
            .contains("fewer than min_requests 50"));
    }
    let metrics = send(&client, get(proxy.admin_addr, "/metrics"))
        .await
        .text();
    assert!(
        metrics.contains("switchyard_rollout_step{service=\"app\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_rollout_weight{service=\"app\"} 50"),
        "{metrics}"
    );
    assert!(metrics
        .contains("switchyard_rollout_analysis_total{result=\"inconclusive\",service=\"app\"}"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_steps_pause_resume_abort_and_a_manual_change_end_it_as_asked() {
    let (_blue, _green, _dir, proxy) = blue_green_proxy().await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 2);
    let steps = json!({"pool": "green", "steps": [20, "pause", 60, 100], "hold": "300ms",
        "analysis": {"interval": "150ms", "min_requests": 5}});
    assert_eq!(start(&proxy, steps.clone()).await.0, StatusCode::OK);
    // Refused while one is live.
    let (status, body) = start(&proxy, steps.clone()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict")),
        "{body}"
    );
    let paused = rollout_until(
        &proxy,
        Duration::from_secs(10),
        "the pause step",
        status_is("paused"),
    )
    .await;
    assert_eq!(
        (paused["step"].as_u64(), paused["weight"].as_f64()),
        (Some(2), Some(20.0)),
        "{paused:#}"
    );
    assert!(paused["reason"].as_str().unwrap().contains("resume"));

    let (status, resumed) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/rollout/resume",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(
        (resumed["step"].as_u64(), resumed["weight"].as_f64()),
        (Some(3), Some(60.0)),
        "{resumed:#}"
    );
    let (_, held) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/rollout/pause",
        None,
        &[],
    )
    .await;
    assert_eq!(
        (held["status"].as_str(), held["weight"].as_f64()),
        (Some("paused"), Some(60.0)),
        "{held:#}"
    );
    // A paused rollout stays where it is.
    load.wait_for(100).await;
    assert_eq!(rollout_of(&proxy).await["step"], 3);
    let (status, aborted) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/rollout/abort",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (aborted["status"].as_str(), aborted["weight"].as_f64()),
        (Some("aborted"), Some(0.0))
    );
    let mark = load.sent();
    load.wait_for(100).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    assert!(
        records[mark as usize + 20..]
            .iter()
            .all(|r| r.upstream == "blue"),
        "weight 0 after the abort"
    );

    // A manual canary change ends a live rollout.
    assert_eq!(start(&proxy, steps).await.0, StatusCode::OK);
    let (status, _) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/services/app/canary",
        Some(json!({"pool": "green", "weight": 5})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let view = rollout_of(&proxy).await;
    assert_eq!(view["status"], "aborted");
    assert_eq!(view["reason"], "ended by a manual `canary`");
    assert_eq!(view["weight"], 5.0, "the manual canary stands");
    let (status, _) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/rollout/resume",
        None,
        &[],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "an ended rollout cannot be resumed"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn bad_rollouts_are_refused_and_nothing_starts() {
    let (_blue, green, _dir, proxy) = blue_green_proxy().await;
    let generation = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[])
        .await
        .1["generation"]
        .clone();
    for (body, says) in [
        (json!({"pool": "green", "steps": [50, 10]}), "must rise"),
        (json!({"pool": "green", "steps": [50, 120]}), "at most 100"),
        (
            json!({"pool": "green", "steps": [50], "analysis": {"interval": "0s"}}),
            "interval",
        ),
        (json!({"pool": "purple", "steps": [50]}), "unknown pool"),
        (json!({"pool": "blue", "steps": [50]}), "active pool"),
        (
            json!({"pool": "green", "steps": [50], "analysis": {"max_error_rate": 2}}),
            "between 0 and 1",
        ),
        (
            json!({"pool": "green", "steps": [50], "gates": {"pre_step": "https://x/y"}}),
            "http://",
        ),
        (
            json!({"pool": "green", "steps": [50], "speed": "fast"}),
            "unknown field",
        ),
    ] {
        let (status, answer) = start(&proxy, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(says),
            "{body}: {answer}"
        );
    }
    let (status, answer) = rollout_until_missing(&proxy).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_rollout"))
    );
    let (_, state) = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(state["generation"], generation, "nothing changed");
    // A canary pool with no healthy backend is never given weight.
    drop(green);
    eventually(Duration::from_secs(10), "green down", || {
        proxy.shared.table().load().pool("green").unwrap().backends[0].health()
            == switchyard::backend::Health::Unhealthy
    })
    .await;
    let (status, answer) = start(&proxy, json!({"pool": "green", "steps": [50]})).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::CONFLICT, Some("no_healthy_backend")),
        "{answer}"
    );
    proxy.shutdown().await;
}

async fn rollout_until_missing(proxy: &switchyard::server::Running) -> (StatusCode, Value) {
    admin(
        proxy.admin_addr,
        "GET",
        "/api/v1/services/app/rollout",
        None,
        &[],
    )
    .await
}

/// A gate server: answers `status` to every POST and keeps what it was sent.
async fn gate(status: u16) -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&calls);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let kept = Arc::clone(&kept);
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        kept.lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_must_answer_2xx_and_a_refusing_pre_promote_rolls_back() {
    let (_blue, _green, _dir, proxy) = blue_green_proxy().await;
    let (refusing, _) = gate(503).await;
    let (open, opened) = gate(204).await;
    let (status, body) = start(&proxy, json!({"pool": "green", "steps": [50], "gates": {"pre_step": format!("http://{refusing}/gate")}})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("answered 503"),
        "{body}"
    );
    assert_eq!(
        rollout_until_missing(&proxy).await.0,
        StatusCode::NOT_FOUND,
        "nothing started"
    );

    let load = LoadRun::start(proxy.proxy_addr, "/", 2);
    let (status, body) = start(&proxy, json!({
        "pool": "green", "steps": [50, 100], "hold": "300ms",
        "analysis": {"interval": "150ms", "min_requests": 5, "failure_limit": 1},
        "gates": {"pre_step": format!("http://{open}/step"), "pre_promote": format!("http://{refusing}/promote")}
    })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ended = rollout_until(&proxy, Duration::from_secs(15), "the end", |v| {
        v["status"] != "progressing"
    })
    .await;
    let records = load.finish().await;
    assert_eq!(ended["status"], "rolled_back", "{ended:#}");
    let reason = ended["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("2 failures, past failure_limit 1")
            && reason.contains("pre_promote gate refused"),
        "{reason}"
    );
    let calls = opened.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["gate"], "pre_step");
    assert_eq!(
        (calls[1]["step"].as_u64(), calls[1]["weight"].as_f64()),
        (Some(2), Some(100.0))
    );
    assert_no_failures(&records);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_rollout_resumes_it_where_it_was() {
    let (blue, green) = (
        ShapedApp::start("blue").await,
        ShapedApp::start("green").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let config = config(blue.addr, green.addr, None, &dir.path().join("state.json"));
    let proxy = start_proxy(&config).await;
    ready(&proxy).await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 2);
    let (status, body) = start(
        &proxy,
        json!({
            "pool": "green", "steps": [10, 40, 100], "hold": "1s",
            "analysis": {"interval": "200ms", "min_requests": 5}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    rollout_until(&proxy, Duration::from_secs(15), "step 2", |v| {
        v["step"] == 2
    })
    .await;
    load.finish().await;
    proxy.shutdown().await;

    let proxy = start_proxy(&config).await;
    let resumed = rollout_of(&proxy).await;
    assert_eq!(
        (
            resumed["status"].as_str(),
            resumed["step"].as_u64(),
            resumed["weight"].as_f64()
        ),
        (Some("progressing"), Some(2), Some(40.0)),
        "{resumed:#}"
    );
    ready(&proxy).await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 2);
    let ended = rollout_until(&proxy, Duration::from_secs(15), "the promotion", |v| {
        v["status"] != "progressing"
    })
    .await;
    let records = load.finish().await;
    assert_eq!(ended["status"], "promoted", "{ended:#}");
    assert!(
        !ended["results"].as_array().unwrap().is_empty(),
        "re-judged after the restart"
    );
    assert_no_failures(&records);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_copies_reach_the_mirror_pool_and_a_dead_or_slow_one_costs_clients_nothing() {
    let (blue, green, shadow) = (
        ShapedApp::start("blue").await,
        ShapedApp::start("green").await,
        ShapedApp::start("shadow").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&config(
        blue.addr,
        green.addr,
        Some(shadow.addr),
        &dir.path().join("state.json"),
    ))
    .await;
    ready(&proxy).await;
    let (status, view) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/services/app/mirror",
        Some(json!({"pool": "shadow", "percent": 100})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["mirror"], json!({"pool": "shadow", "percent": 100.0}));

    // Every request is answered by blue; a copy of each, body and all, reaches shadow.
    let client = client();
    for i in 0..20 {
        let request = Request::post(format!("http://{}/orders/{i}", proxy.proxy_addr))
            .body(full(format!("order {i}")))
            .unwrap();
        let answer = send(&client, request).await;
        assert_eq!(
            (answer.status, answer.header("x-upstream")),
            (StatusCode::OK, Some("blue"))
        );
    }
    let large = Request::post(format!("http://{}/large", proxy.proxy_addr))
        .body(full(vec![b'x'; 4096]))
        .unwrap();
    assert_eq!(send(&client, large).await.status, StatusCode::OK);
    eventually(Duration::from_secs(10), "20 copies", || {
        shadow.hits.load(Ordering::SeqCst) >= 20
    })
    .await;
    {
        let bodies = shadow.bodies.lock().unwrap();
        for i in 0..20 {
            let path = format!("/orders/{i}");
            assert!(
                bodies.iter().any(|(p, b, mirrored)| *p == path
                    && b == format!("order {i}").as_bytes()
                    && *mirrored),
                "copy of {path} missing: {bodies:?}"
            );
        }
        assert!(
            !bodies.iter().any(|(p, _, _)| p == "/large"),
            "over mirror_max_body: not copied"
        );
    }
    let metrics = send(&client, get(proxy.admin_addr, "/metrics"))
        .await
        .text();
    for line in [
        "switchyard_mirror_requests_total{outcome=\"sent\",pool=\"shadow\",service=\"app\"} 20",
        "switchyard_mirror_requests_total{outcome=\"too_large\",pool=\"shadow\",service=\"app\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    // Copies count as the mirror pool's answers, so it can be judged before a user.
    assert!(
        metrics.contains("switchyard_requests_total{backend=\"")
            && metrics.contains("pool=\"shadow\",service=\"app\"} 20")
    );

    // A slow mirror pool: clients do not wait for it.
    shadow.delay_ms.store(1500, Ordering::SeqCst);
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(2000).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    let slowest = records
        .iter()
        .map(|r| r.finished - r.started)
        .max()
        .unwrap();
    assert!(
        slowest < Duration::from_millis(700),
        "a client waited {slowest:?} with the mirror answering after 1.5 s"
    );
    // A dead one: the same.
    drop(shadow);
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(500).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    assert!(records.iter().all(|r| r.upstream == "blue"));
    let metrics = send(&client, get(proxy.admin_addr, "/metrics"))
        .await
        .text();
    let failed = sample(
        &metrics,
        "switchyard_mirror_requests_total{outcome=\"failed\",pool=\"shadow\",service=\"app\"}",
    );
    let dropped = sample(
        &metrics,
        "switchyard_mirror_requests_total{outcome=\"dropped\",pool=\"shadow\",service=\"app\"}",
    );
    eprintln!("slow then dead mirror: {failed} copies failed, {dropped} dropped from a full queue");
    assert!(failed > 0.0, "{metrics}");

    let (status, view) = admin(
        proxy.admin_addr,
        "DELETE",
        "/api/v1/services/app/mirror",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(view["mirror"].is_null());
    let (status, answer) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/services/app/mirror",
        Some(json!({"pool": "blue", "percent": 10})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "the active pool: {answer}");
    let (status, _) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/services/app/mirror",
        Some(json!({"pool": "green", "percent": 0})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    drop(green);
    drop(blue);
    proxy.shutdown().await;
}

fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_only_move_into_the_canary_as_the_steps_rise() {
    let (_blue, _green, _dir, proxy) = blue_green_proxy().await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 2);
    let (status, body) = start(
        &proxy,
        json!({
            "pool": "green", "steps": [10, "pause", 50, "pause", 100], "hold": "200ms",
            "sticky": "header:x-user", "analysis": {"interval": "150ms", "min_requests": 5}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let client = client();
    let on_green = |step: u64| {
        let client = client.clone();
        let proxy_addr = proxy.proxy_addr;
        async move {
            let mut users = std::collections::BTreeSet::new();
            for user in 0..300 {
                let request = Request::get(format!("http://{proxy_addr}/"))
                    .header("x-user", format!("user-{user}"))
                    .body(empty())
                    .unwrap();
                if send(&client, request).await.header("x-upstream") == Some("green") {
                    users.insert(user);
                }
            }
            (step, users)
        }
    };
    rollout_until(&proxy, Duration::from_secs(10), "the first pause", |v| {
        v["step"] == 2 && v["status"] == "paused"
    })
    .await;
    let (_, at_10) = on_green(2).await;
    let (status, _) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/rollout/resume",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    rollout_until(&proxy, Duration::from_secs(10), "the second pause", |v| {
        v["step"] == 4 && v["status"] == "paused"
    })
    .await;
    let (_, at_50) = on_green(4).await;
    load.finish().await;
    assert!(
        (10..=60).contains(&at_10.len()),
        "{} of 300 users on green at 10%",
        at_10.len()
    );
    assert!(
        (110..=190).contains(&at_50.len()),
        "{} of 300 users on green at 50%",
        at_50.len()
    );
    let moved_back: Vec<_> = at_10.difference(&at_50).collect();
    assert!(
        moved_back.is_empty(),
        "users back on blue as the weight rose: {moved_back:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_manual_switch_to_a_third_pool_ends_the_rollout_and_its_canary() {
    let (blue, green, shadow) = (
        ShapedApp::start("blue").await,
        ShapedApp::start("green").await,
        ShapedApp::start("shadow").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&config(
        blue.addr,
        green.addr,
        Some(shadow.addr),
        &dir.path().join("state.json"),
    ))
    .await;
    ready(&proxy).await;
    let (status, body) = start(&proxy, json!({"pool": "green", "steps": [30, 100]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, view) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/switch",
        Some(json!({"to": "shadow"})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert!(
        view["canary"].is_null(),
        "nothing left driving a canary: {view}"
    );
    assert_eq!(view["rollout"]["status"], "aborted");
    assert_eq!(
        rollout_of(&proxy).await["reason"],
        "ended by a manual `switch`"
    );
    // A mirror onto the pool that becomes active ends: that pool gets the requests.
    let (status, _) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/services/app/mirror",
        Some(json!({"pool": "green", "percent": 50})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, view) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/switch",
        Some(json!({"to": "green"})),
        &[],
    )
    .await;
    assert!(view["mirror"].is_null(), "{view}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_paused_on_failure_with_its_canary_pool_down_gives_it_no_weight() {
    let (_blue, green, _dir, proxy) = blue_green_proxy().await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    let (status, body) = start(
        &proxy,
        json!({"pool": "green", "steps": [40, 100], "hold": "1m", "on_failure": "pause",
            "analysis": {"interval": "300ms", "min_requests": 5}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    load.wait_for(100).await;
    drop(green);
    let paused = rollout_until(
        &proxy,
        Duration::from_secs(10),
        "the weight withheld",
        |v| v["status"] == "paused" && v["weight"] == 0.0,
    )
    .await;
    load.finish().await;
    let reason = paused["reason"].as_str().unwrap();
    assert!(reason.contains("withheld"), "{reason}");

    // From here on no user is sent to the dead pool.
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(200).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    assert!(records.iter().all(|r| r.upstream == "blue"));

    let (status, body) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/rollout/resume",
        None,
        &[],
    )
    .await;
    assert_ne!(
        status,
        StatusCode::OK,
        "no weight back to a dead pool: {body}"
    );
    let view = rollout_of(&proxy).await;
    assert_eq!(
        (view["status"].as_str(), view["weight"].as_f64()),
        (Some("paused"), Some(0.0))
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_window_that_cannot_be_saved_is_counted_once_it_can() {
    let (blue, green) = (
        ShapedApp::start("blue").await,
        ShapedApp::start("green").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("state.json");
    let proxy = start_proxy(&config(blue.addr, green.addr, None, &state_path)).await;
    ready(&proxy).await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    let (status, body) = start(
        &proxy,
        json!({"pool": "green", "steps": [50, 100], "hold": "1m",
            "analysis": {"interval": "300ms", "min_requests": 5}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The state is written through `<path>.tmp`: a directory there makes it fail.
    let blocker = dir.path().join("state.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    green.fail_every.store(1, Ordering::SeqCst);
    let failed = rollout_until(&proxy, Duration::from_secs(10), "a failed window", |v| {
        v["results"]
            .as_array()
            .is_some_and(|r| r.iter().any(|w| w["verdict"] == "fail"))
    })
    .await;
    assert_eq!(
        failed["status"], "progressing",
        "not saved, so not moved: {failed:#}"
    );
    // Green recovers; windows from here on would pass, so only the failure kept
    // from before can roll it back once the disk takes writes again.
    green.fail_every.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(900)).await;
    std::fs::remove_dir(&blocker).unwrap();
    let ended = rollout_until(&proxy, Duration::from_secs(10), "the rollback", |v| {
        v["status"] != "progressing"
    })
    .await;
    load.finish().await;
    assert_eq!(ended["status"], "rolled_back", "{ended:#}");
    assert!(
        ended["reason"].as_str().unwrap().contains("error rate"),
        "{ended:#}"
    );
    let saved: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(saved["services"]["app"]["rollout"]["status"], "rolled_back");
    proxy.shutdown().await;
}
