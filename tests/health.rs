//! Health checks, passive ejection, panic mode, draining, rolling deploys and runtime
//! membership, with real app servers that can be made to fail.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::json;
use switchyard::backend::{Backend, Health};
use tokio_tungstenite::tungstenite::Message;

/// One pool `blue` of `addrs`, with `pool_keys` in its table and `health` as its
/// `[pools.blue.health]` table (none when empty).
fn config(addrs: &[SocketAddr], pool_keys: &str, health: &str) -> String {
    let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let health = if health.is_empty() {
        String::new()
    } else {
        format!("[pools.blue.health]\n{health}\n")
    };
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n\
         [pools.blue]\nbackends = [{}]\n{pool_keys}\n{health}\n[services.app]\nactive = \"blue\"\n",
        state_dir().join("state.json").display(),
        list.join(", ")
    )
}

fn backend(proxy: &switchyard::server::Running, index: usize) -> Arc<Backend> {
    Arc::clone(&proxy.shared.table().load().pools[0].backends[index])
}

async fn served_by(addr: SocketAddr) -> (StatusCode, String) {
    let answer = send(&client(), get(addr, "/")).await;
    (
        answer.status,
        answer.header("x-upstream").unwrap_or("").to_string(),
    )
}

/// Watches `backend` flip to `target` while the app's health endpoint answers
/// `status`; asserts the flip came after exactly `threshold` checks, and returns how
/// long it took from the change.
async fn flip_after_exactly(
    upstream: &Upstream,
    backend: &Backend,
    status: u16,
    target: Health,
    threshold: u64,
) -> Duration {
    let before = upstream.health.checks();
    let changed = Instant::now();
    upstream.health.set(status);
    let deadline = changed + Duration::from_secs(20);
    loop {
        // Health first, then the count: a count read later is never smaller.
        let health = backend.health();
        let checks = upstream.health.checks() - before;
        if health == target {
            assert!(checks >= threshold, "{target:?} after only {checks} checks");
            return changed.elapsed();
        }
        assert!(
            checks <= threshold,
            "still {health:?} after {checks} checks (threshold {threshold})"
        );
        assert!(Instant::now() < deadline, "never became {target:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_endpoint_takes_a_backend_out_after_exactly_the_threshold_and_back() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let health = "path = \"/health\"\ninterval = \"150ms\"\ntimeout = \"100ms\"\njitter = \"0ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 3";
    let proxy = start_proxy(&config(&[a.addr, b.addr], "", health)).await;
    let backend_a = backend(&proxy, 0);
    eventually(Duration::from_secs(10), "first round", || {
        proxy.shared.control.first_round_done()
    })
    .await;
    assert_eq!(backend_a.health(), Health::Healthy);

    let detection = flip_after_exactly(&a, &backend_a, 500, Health::Unhealthy, 3).await;
    eprintln!("detection: unhealthy {detection:?} after the health endpoint started failing (interval 150ms x threshold 3)");
    let hits = a.hits();
    for _ in 0..50 {
        assert_eq!(
            served_by(proxy.proxy_addr).await,
            (StatusCode::OK, "b".to_string())
        );
    }
    assert_eq!(a.hits(), hits, "an unhealthy backend gets no traffic");
    let (_, state) = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(state["pools"][0]["backends"][0]["health"], "unhealthy");

    flip_after_exactly(&a, &backend_a, 200, Health::Healthy, 2).await;
    let mut seen_a = false;
    for _ in 0..100 {
        seen_a |= served_by(proxy.proxy_addr).await.1 == "a";
    }
    assert!(seen_a, "back in rotation");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_unexpected_status_and_a_hanging_check_both_count_as_failures() {
    let a = Upstream::start("a").await;
    let health = "interval = \"200ms\"\ntimeout = \"100ms\"\nunhealthy_threshold = 2\nexpected_status = [204]";
    let proxy = start_proxy(&config(&[a.addr], "panic_mode = \"fail_closed\"", health)).await;
    let backend_a = backend(&proxy, 0);
    // 200 is not the expected 204.
    eventually(Duration::from_secs(10), "unhealthy on 200", || {
        backend_a.health() == Health::Unhealthy
    })
    .await;
    a.health.set(204);
    eventually(Duration::from_secs(10), "healthy on 204", || {
        backend_a.health() == Health::Healthy
    })
    .await;
    // A check that never answers is cut off by the timeout, so the backend goes out.
    a.health.set(0);
    eventually(
        Duration::from_secs(10),
        "unhealthy on a hanging check",
        || backend_a.health() == Health::Unhealthy,
    )
    .await;
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer.header("x-switchyard-error"),
        Some("no-healthy-backend")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn readyz_waits_for_the_first_health_check_round() {
    let a = Upstream::start("a").await;
    a.health.set(0);
    let health = "interval = \"2s\"\ntimeout = \"1s\"\njitter = \"0ms\"";
    let proxy = start_proxy(&config(&[a.addr], "", health)).await;
    assert_eq!(
        send(&client(), get(proxy.admin_addr, "/readyz"))
            .await
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // The first check times out: the round is finished (unhealthy), so the proxy is ready.
    wait_ready(proxy.admin_addr).await;
    assert_eq!(backend(&proxy, 0).health(), Health::Unhealthy);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_ejected_by_real_traffic_before_the_next_active_check() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    // Active checks every 30 s: only passive ejection can notice the kill in time.
    let health = "interval = \"30s\"\ntimeout = \"1s\"\njitter = \"0ms\"";
    let proxy = start_proxy(&config(
        &[a.addr, b.addr],
        "passive = { consecutive_failures = 3, ejection_time = \"60s\" }",
        health,
    ))
    .await;
    let backend_a = backend(&proxy, 0);
    eventually(Duration::from_secs(10), "first round", || {
        proxy.shared.control.first_round_done()
    })
    .await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 16);
    load.wait_for(300).await;
    a.kill();
    let killed = Instant::now();
    eventually(Duration::from_secs(20), "passive ejection", || {
        backend_a.is_ejected()
    })
    .await;
    let ejected_after = killed.elapsed();
    assert!(
        ejected_after < Duration::from_secs(25),
        "ejected {ejected_after:?} after the kill"
    );
    load.wait_for(1000).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    eprintln!(
        "passive ejection {ejected_after:?} after the kill; {} requests, 0 failed",
        records.len()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn passive_ejection_never_takes_out_more_than_max_ejection_percent() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let proxy = start_proxy(&config(
        &[a.addr, b.addr],
        "passive = { consecutive_failures = 2, ejection_time = \"60s\", max_ejection_percent = 50 }",
        "interval = \"30s\"\ntimeout = \"1s\"\njitter = \"0ms\"",
    ))
    .await;
    eventually(Duration::from_secs(10), "first round", || {
        proxy.shared.control.first_round_done()
    })
    .await;
    // Both answer 500: real-traffic failures on both.
    let client = client();
    for _ in 0..40 {
        let answer = send(&client, get(proxy.proxy_addr, "/status/500")).await;
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let out = (0..2).filter(|&i| backend(&proxy, i).is_ejected()).count();
    assert_eq!(out, 1, "one of two ejected at most (50%)");
    proxy.shutdown().await;
}

#[tokio::test]
async fn panic_mode_fail_open_serves_from_unhealthy_backends_and_fail_closed_refuses() {
    for (mode, expected) in [
        ("fail_open", StatusCode::OK),
        ("fail_closed", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let a = Upstream::start("a").await;
        let b = Upstream::start("b").await;
        a.health.set(500);
        b.health.set(500);
        let proxy = start_proxy(&config(
            &[a.addr, b.addr],
            &format!("panic_mode = \"{mode}\""),
            "interval = \"200ms\"\ntimeout = \"100ms\"",
        ))
        .await;
        eventually(Duration::from_secs(10), "both unhealthy", || {
            (0..2).all(|i| backend(&proxy, i).health() == Health::Unhealthy)
        })
        .await;
        for _ in 0..10 {
            assert_eq!(
                send(&client(), get(proxy.proxy_addr, "/")).await.status,
                expected,
                "{mode}"
            );
        }
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_lets_slow_requests_finish_and_wait_drained_returns_at_zero() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let proxy = start_proxy(&config(&[a.addr, b.addr], "balance = \"round_robin\"", "")).await;
    let backend_a = backend(&proxy, 0);
    let mut slow = Vec::new();
    for _ in 0..6 {
        let addr = proxy.proxy_addr;
        slow.push(tokio::spawn(async move {
            send(&client(), get(addr, "/slow/1200")).await
        }));
    }
    eventually(
        Duration::from_secs(10),
        "slow requests in flight on a",
        || backend_a.in_flight() == 3,
    )
    .await;
    let drain = format!("/api/v1/pools/blue/backends/{}/drain", a.addr);
    let (status, body) = admin(proxy.admin_addr, "POST", &drain, None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["state"].as_str(), body["in_flight"].as_u64()),
        (Some("draining"), Some(3))
    );
    let hits = a.hits();
    for _ in 0..30 {
        assert_eq!(served_by(proxy.proxy_addr).await.1, "b");
    }
    assert_eq!(a.hits(), hits, "no new request reached the drained backend");
    let waited = Instant::now();
    let wait = format!(
        "/api/v1/pools/blue/backends/{}/wait-drained?timeout=30s",
        a.addr
    );
    let (status, body) = admin(proxy.admin_addr, "GET", &wait, None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["in_flight"], 0);
    assert_eq!(backend_a.in_flight(), 0);
    assert!(
        waited.elapsed() > Duration::from_millis(200),
        "returned only once the slow requests were done"
    );
    for task in slow {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_websocket_opened_before_a_drain_keeps_working_until_it_closes() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config(&[a.addr], "", "")).await;
    let stream = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.proxy_addr), stream)
            .await
            .unwrap();
    let drain = format!("/api/v1/pools/blue/backends/{}/drain", a.addr);
    let (_, body) = admin(proxy.admin_addr, "POST", &drain, None, &[]).await;
    assert_eq!(
        body["in_flight"], 1,
        "the open WebSocket counts as in flight"
    );
    for i in 0..10 {
        ws.send(Message::text(format!("after drain {i}")))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("after drain {i}"))
        );
    }
    let wait = format!(
        "/api/v1/pools/blue/backends/{}/wait-drained?timeout=100ms",
        a.addr
    );
    assert_eq!(
        admin(proxy.admin_addr, "GET", &wait, None, &[]).await.0,
        StatusCode::REQUEST_TIMEOUT
    );
    ws.close(None).await.unwrap();
    drop(ws);
    let wait = format!(
        "/api/v1/pools/blue/backends/{}/wait-drained?timeout=10s",
        a.addr
    );
    assert_eq!(
        admin(proxy.admin_addr, "GET", &wait, None, &[]).await.0,
        StatusCode::OK
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_of_every_backend_under_load_fails_nothing() {
    let mut upstreams = [
        Upstream::start("v1-a").await,
        Upstream::start("v1-b").await,
        Upstream::start("v1-c").await,
    ];
    let addrs: Vec<SocketAddr> = upstreams.iter().map(|u| u.addr).collect();
    let health =
        "interval = \"100ms\"\ntimeout = \"80ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2";
    let proxy = start_proxy(&config(&addrs, "", health)).await;
    wait_ready(proxy.admin_addr).await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 16);
    load.wait_for(300).await;
    for (i, addr) in addrs.iter().enumerate() {
        let base = format!("/api/v1/pools/blue/backends/{addr}");
        assert_eq!(
            admin(
                proxy.admin_addr,
                "POST",
                &format!("{base}/drain"),
                None,
                &[]
            )
            .await
            .0,
            StatusCode::OK
        );
        let (status, _) = admin(
            proxy.admin_addr,
            "GET",
            &format!("{base}/wait-drained?timeout=30s"),
            None,
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        // Stop the old version, start the new one on the same address.
        upstreams[i].kill();
        let listener = rebind(*addr).await;
        upstreams[i] = Upstream::serve_on(&format!("v2-{}", ["a", "b", "c"][i]), listener);
        let b = backend(&proxy, i);
        eventually(Duration::from_secs(20), "new version healthy", || {
            b.health() == Health::Healthy
        })
        .await;
        assert_eq!(
            admin(
                proxy.admin_addr,
                "POST",
                &format!("{base}/enable"),
                None,
                &[]
            )
            .await
            .0,
            StatusCode::OK
        );
        load.wait_for(300).await;
    }
    let records = load.finish().await;
    assert_no_failures(&records);
    let last: Vec<_> = records.iter().rev().take(100).cloned().collect();
    assert_eq!(
        share(&last, "v2"),
        1.0,
        "the new version serves everything at the end"
    );
    eprintln!(
        "rolling deploy of 3 backends: {} requests, 0 failed",
        records.len()
    );
    proxy.shutdown().await;
}

/// Binds `addr` again once the old listener is gone.
async fn rebind(addr: SocketAddr) -> tokio::net::TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot bind {addr} again: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_join_and_leave_at_runtime_and_leavers_are_drained_first() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let proxy = start_proxy(&config(&[a.addr, b.addr], "balance = \"round_robin\"", "")).await;
    // A slow request on `a` while it is replaced by `c`.
    let addr = proxy.proxy_addr;
    let slow = tokio::spawn(async move { send(&client(), get(addr, "/slow/800")).await });
    let backend_a = backend(&proxy, 0);
    eventually(Duration::from_secs(10), "slow request on a", || {
        backend_a.in_flight() == 1
    })
    .await;
    let started = Instant::now();
    let (status, body) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/pools/blue/backends?timeout=20s",
        Some(json!({"backends": [b.addr.to_string(), {"addr": c.addr.to_string(), "weight": 1}]})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        started.elapsed() > Duration::from_millis(200),
        "answered after `a` drained"
    );
    let listed: Vec<&str> = body["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["addr"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [b.addr.to_string(), c.addr.to_string()]);
    assert_eq!(
        slow.await.unwrap().status,
        StatusCode::OK,
        "the in-flight request finished on the leaver"
    );
    let hits_a = a.hits();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        seen.insert(served_by(proxy.proxy_addr).await.1);
    }
    assert_eq!(a.hits(), hits_a);
    assert!(seen.contains("c") && seen.contains("b"), "{seen:?}");

    // One at a time: add `a` back, remove `b`.
    let (status, _) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/pools/blue/backends",
        Some(json!({"addr": a.addr.to_string()})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, again) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/pools/blue/backends",
        Some(json!({"addr": a.addr.to_string()})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    let (status, body) = admin(
        proxy.admin_addr,
        "DELETE",
        &format!("/api/v1/pools/blue/backends/{}", b.addr),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["backends"].as_array().unwrap().len(), 2);
    // The membership is durable.
    let saved = std::fs::read_to_string(proxy.shared.control.state_path()).unwrap();
    assert!(
        saved.contains(&c.addr.to_string()) && !saved.contains(&format!("\"{}\"", b.addr)),
        "{saved}"
    );
    let (status, body) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/pools/blue/backends",
        Some(json!({"backends": []})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    proxy.shutdown().await;
}

/// The addresses of pool `blue`'s backends, as the admin API lists them.
async fn pool_addrs(admin_addr: SocketAddr) -> Vec<String> {
    let (_, pool) = admin(admin_addr, "GET", "/api/v1/pools/blue", None, &[]).await;
    pool["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["addr"].as_str().unwrap().to_string())
        .collect()
}

/// A script that adds backends in parallel (an autoscaler, a deploy of many hosts at
/// once) without If-Match loses none: each call's change is made to the list as the
/// previous one left it, so every acknowledged add is in the pool, and every
/// acknowledged remove is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_and_removes_of_backends_lose_none() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config(&[a.addr], "", "")).await;
    let admin_addr = proxy.admin_addr;
    // Addresses nothing listens on: membership does not need them up.
    let joiners: Vec<String> = (0..16)
        .map(|i| format!("127.0.0.9:{}", 20000 + i))
        .collect();
    let adds = joiners.iter().map(|addr| async move {
        admin(
            admin_addr,
            "POST",
            "/api/v1/pools/blue/backends",
            Some(json!({"addr": addr})),
            &[],
        )
        .await
    });
    for (status, body) in futures_util::future::join_all(adds).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let listed = pool_addrs(admin_addr).await;
    assert_eq!(listed.len(), 17, "{listed:?}");
    for addr in &joiners {
        assert!(listed.contains(addr), "{addr} is missing: {listed:?}");
    }
    let removes = joiners[..8].iter().map(|addr| async move {
        let path = format!("/api/v1/pools/blue/backends/{addr}");
        admin(admin_addr, "DELETE", &path, None, &[]).await
    });
    for (status, body) in futures_util::future::join_all(removes).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let listed = pool_addrs(admin_addr).await;
    assert_eq!(listed.len(), 9, "{listed:?}");
    for addr in &joiners[8..] {
        assert!(listed.contains(addr), "{addr} is missing: {listed:?}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_backends_weight_keeps_its_in_flight_count() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config(&[a.addr], "", "")).await;
    let before = backend(&proxy, 0);
    let addr = proxy.proxy_addr;
    let slow = tokio::spawn(async move { send(&client(), get(addr, "/slow/800")).await });
    eventually(Duration::from_secs(10), "slow request in flight", || {
        before.in_flight() == 1
    })
    .await;
    let body = json!({"backends": [{"addr": a.addr.to_string(), "weight": 5}]});
    let (status, answer) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/pools/blue/backends",
        Some(body),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["backends"][0]["weight"], 5);
    assert_eq!(
        answer["backends"][0]["in_flight"], 1,
        "the same backend object, still counting"
    );
    assert!(Arc::ptr_eq(&before, &backend(&proxy, 0)));
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    assert_eq!(before.in_flight(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_listing_one_server_checked_alike_send_it_one_check_and_both_see_it_fail() {
    let a = Upstream::start("a").await;
    let health = "path = \"/health\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\njitter = \"0ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 1";
    let pools: String = ["blue", "green", "slow"]
        .iter()
        .map(|pool| {
            let interval = if *pool == "slow" { "90ms" } else { "100ms" };
            format!(
                "[pools.{pool}]\nbackends = [\"{}\"]\n[pools.{pool}.health]\n{}\n",
                a.addr,
                health.replace("100ms\"\ntimeout", &format!("{interval}\"\ntimeout"))
            )
        })
        .collect();
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n\
         {pools}[services.app]\nactive = \"blue\"\n[services.other]\nhosts = [\"other\"]\nactive = \"green\"\n",
        state_dir().join("state.json").display(),
    );
    let proxy = start_proxy(&config).await;
    let checks_of = |state: &serde_json::Value, pool: usize| {
        state["pools"][pool]["backends"][0]["checks"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut state = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while (0..3).any(|pool| checks_of(&state, pool) < 20) {
        assert!(Instant::now() < deadline, "too few checks: {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        state = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[])
            .await
            .1;
    }
    // The server counted its /health requests after the proxy counted its checks.
    let served = a.health.checks();
    let (blue, green, slow) = (
        checks_of(&state, 0),
        checks_of(&state, 1),
        checks_of(&state, 2),
    );
    assert!(
        served >= blue.max(green) + slow && served <= blue.max(green) + slow + 3,
        "the server answered {served} checks for blue {blue}, green {green} (alike) and slow {slow}"
    );
    a.health.set(500);
    eventually(
        Duration::from_secs(10),
        "both pools' backend unhealthy",
        || {
            let table = proxy.shared.table().load();
            table
                .pools
                .iter()
                .all(|p| p.backends[0].health() == Health::Unhealthy)
        },
    )
    .await;
    let (_, state) = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    for pool in 0..3 {
        let backend = &state["pools"][pool]["backends"][0];
        assert_eq!(backend["health"], "unhealthy", "{state}");
        assert_eq!(backend["last_check_error"], "status 500", "{state}");
    }
    proxy.shutdown().await;
}
