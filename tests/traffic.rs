//! Traffic control through the admin API, as a deploy script drives it, with real
//! clients sending requests the whole time.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_under_load_fails_nothing_and_every_later_request_goes_to_green() {
    let bg = BlueGreen::start(2, "", "").await;
    let load = LoadRun::start(bg.addr(), "/", 16);
    load.wait_for(500).await;
    let (status, body) = admin(
        bg.admin(),
        "POST",
        "/api/v1/services/app/switch",
        Some(json!({"to": "green"})),
        &[],
    )
    .await;
    let returned = Instant::now();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], "green");
    assert_eq!(body["generation"], 1);
    load.wait_for(1000).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    let before: Vec<_> = records
        .iter()
        .filter(|r| r.started < returned)
        .cloned()
        .collect();
    let after: Vec<_> = records
        .iter()
        .filter(|r| r.started > returned)
        .cloned()
        .collect();
    assert!(
        share(&before, "blue") > 0.5,
        "traffic was on blue before the switch"
    );
    assert!(after.len() >= 1000);
    let strays: Vec<_> = after
        .iter()
        .filter(|r| !r.upstream.starts_with("green"))
        .collect();
    assert!(
        strays.is_empty(),
        "{} requests after the switch went elsewhere: {:?}",
        strays.len(),
        &strays[..strays.len().min(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_percent_canary_gets_10_percent_of_10000_requests() {
    let bg = BlueGreen::start(1, "", "").await;
    let (status, body) = admin(
        bg.admin(),
        "PUT",
        "/api/v1/services/app/canary",
        Some(json!({"pool": "green", "weight": 10})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["canary"]["weight"], 10.0);
    let load = LoadRun::start(bg.addr(), "/", 16);
    load.wait_for(10_000).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    let green = share(&records, "green") * 100.0;
    // Binomial sd at n=10,000 is 0.3 points; 1.5 points is five of them.
    assert!(
        (green - 10.0).abs() < 1.5,
        "green got {green:.2}% of {}",
        records.len()
    );
}

async fn served_by(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> String {
    let mut request = http::Request::get(format!("http://{addr}/"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let answer = send(&client(), request.body(empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.header("x-upstream").unwrap().to_string()
}

#[tokio::test]
async fn header_and_cookie_overrides_reach_the_canary_at_weight_zero() {
    let bg = BlueGreen::start(1, "", "").await;
    let body = json!({
        "pool": "green", "weight": 0,
        "header": {"name": "x-canary", "value": "always"},
        "cookie": {"name": "beta", "value": "yes"},
    });
    let (status, answer) = admin(
        bg.admin(),
        "PUT",
        "/api/v1/services/app/canary",
        Some(body),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    for _ in 0..20 {
        assert_eq!(
            served_by(bg.addr(), &[("x-canary", "always")]).await,
            "green-1"
        );
        assert_eq!(
            served_by(bg.addr(), &[("cookie", "session=1; beta=yes")]).await,
            "green-1"
        );
        assert_eq!(
            served_by(bg.addr(), &[("x-canary", "never")]).await,
            "blue-1"
        );
        assert_eq!(served_by(bg.addr(), &[]).await, "blue-1");
    }
}

#[tokio::test]
async fn sticky_users_keep_their_pool_and_only_move_into_the_canary() {
    let bg = BlueGreen::start(1, "", "").await;
    let users: Vec<String> = (0..150).map(|i| format!("user-{i}")).collect();
    let mut in_canary = vec![false; users.len()];
    for weight in [10, 20, 30, 40] {
        let body = json!({"pool": "green", "weight": weight, "sticky": "header:x-user-id"});
        let (status, answer) = admin(
            bg.admin(),
            "PUT",
            "/api/v1/services/app/canary",
            Some(body),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        for (i, user) in users.iter().enumerate() {
            let first = served_by(bg.addr(), &[("x-user-id", user)]).await;
            for _ in 0..3 {
                assert_eq!(
                    served_by(bg.addr(), &[("x-user-id", user)]).await,
                    first,
                    "{user} moved at {weight}%"
                );
            }
            let now = first == "green-1";
            assert!(
                !in_canary[i] || now,
                "{user} left the canary when the weight rose to {weight}%"
            );
            in_canary[i] = now;
        }
    }
    let share = in_canary.iter().filter(|c| **c).count() as f64 / users.len() as f64;
    assert!(
        (0.25..0.55).contains(&share),
        "40% canary holds {share:.2} of users"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_promote_and_rollback_under_load_fail_nothing() {
    let bg = BlueGreen::start(2, "", "").await;
    let load = LoadRun::start(bg.addr(), "/", 16);
    load.wait_for(300).await;
    for weight in [5, 25, 50] {
        let body = json!({"pool": "green", "weight": weight});
        assert_eq!(
            admin(
                bg.admin(),
                "PUT",
                "/api/v1/services/app/canary",
                Some(body),
                &[]
            )
            .await
            .0,
            StatusCode::OK
        );
        load.wait_for(300).await;
    }
    let (status, body) = admin(
        bg.admin(),
        "POST",
        "/api/v1/services/app/promote",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], "green");
    assert!(body["canary"].is_null());
    let promoted = Instant::now();
    load.wait_for(500).await;
    let rollback_sent = Instant::now();
    let (status, body) = admin(
        bg.admin(),
        "POST",
        "/api/v1/services/app/rollback",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], "blue");
    let rolled_back = Instant::now();
    load.wait_for(500).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    let after_promote: Vec<_> = records
        .iter()
        // Routed after the promote returned, and answered before the rollback was sent.
        .filter(|r| r.started > promoted && r.finished < rollback_sent)
        .cloned()
        .collect();
    assert!(!after_promote.is_empty());
    let strays: Vec<_> = after_promote
        .iter()
        .filter(|r| !r.upstream.starts_with("green"))
        .map(|r| {
            (
                r.started.duration_since(promoted),
                r.upstream.clone(),
                r.status,
            )
        })
        .collect();
    assert!(
        strays.is_empty(),
        "{} of {} after promote: {strays:?}",
        strays.len(),
        after_promote.len()
    );
    let after_rollback: Vec<_> = records
        .iter()
        .filter(|r| r.started > rolled_back)
        .cloned()
        .collect();
    assert_eq!(share(&after_rollback, "blue"), 1.0);

    let (_, history) = admin(bg.admin(), "GET", "/api/v1/services/app/history", None, &[]).await;
    let kinds: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["canary", "canary", "canary", "promote", "rollback"]);
    assert!(history["history"][0]["at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn a_stale_if_match_is_refused_and_changes_nothing() {
    let bg = BlueGreen::start(1, "", "").await;
    let (_, state) = admin(bg.admin(), "GET", "/api/v1/state", None, &[]).await;
    let generation = state["generation"].as_u64().unwrap().to_string();
    let quoted = format!("\"{generation}\"");
    let (status, body) = admin(
        bg.admin(),
        "POST",
        "/api/v1/services/app/switch",
        Some(json!({"to": "green"})),
        &[("if-match", &quoted)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The same generation again is now stale.
    let (status, body) = admin(
        bg.admin(),
        "POST",
        "/api/v1/services/app/switch",
        Some(json!({"to": "blue"})),
        &[("if-match", &generation)],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "stale_generation");
    assert_eq!(served_by(bg.addr(), &[]).await, "green-1");
}

#[tokio::test]
async fn switching_to_a_pool_whose_backends_are_all_down_needs_force() {
    let bg = BlueGreen::start(1, "", "").await;
    for upstream in &bg.green {
        upstream.kill();
    }
    let (status, body) = admin(
        bg.admin(),
        "POST",
        "/api/v1/services/app/switch",
        Some(json!({"to": "green"})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "no_healthy_backend");
    assert_eq!(served_by(bg.addr(), &[]).await, "blue-1");
    let (status, _) = admin(
        bg.admin(),
        "PUT",
        "/api/v1/services/app/canary",
        Some(json!({"pool": "green", "weight": 10})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = admin(
        bg.admin(),
        "POST",
        "/api/v1/services/app/switch",
        Some(json!({"to": "green", "force": true})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        send(&client(), get(bg.addr(), "/")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn the_api_needs_the_token_when_one_is_configured() {
    let dir = state_dir();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "correct-horse\n").unwrap();
    let bg = BlueGreen::start(1, "", &format!("token_file = \"{}\"", token_file.display())).await;
    let (status, body) = admin(bg.admin(), "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "unauthorized");
    let switch = Some(json!({"to": "green"}));
    let wrong = [("authorization", "Bearer correct-horsf")];
    assert_eq!(
        admin(
            bg.admin(),
            "POST",
            "/api/v1/services/app/switch",
            switch.clone(),
            &wrong
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(served_by(bg.addr(), &[]).await, "blue-1");
    let right = [("authorization", "Bearer correct-horse")];
    assert_eq!(
        admin(
            bg.admin(),
            "POST",
            "/api/v1/services/app/switch",
            switch,
            &right
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        send(&client(), get(bg.admin(), "/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&client(), get(bg.admin(), "/readyz")).await.status,
        StatusCode::OK
    );
}

/// The state as the API shows it, minus what changes on its own.
async fn settled_state(admin_addr: std::net::SocketAddr) -> serde_json::Value {
    let (status, mut state) = admin(admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    for pool in state["pools"].as_array_mut().unwrap() {
        for backend in pool["backends"].as_array_mut().unwrap() {
            backend["in_flight"] = json!(0);
        }
    }
    state
}

#[tokio::test]
async fn bad_input_gets_its_4xx_and_changes_nothing() {
    let bg = BlueGreen::start(1, "", "").await;
    let before = settled_state(bg.admin()).await;
    let cases: Vec<(&str, &str, &str, u16, &str)> = vec![
        ("POST", "/api/v1/services/app/switch", "{\"to\": ", 400, "bad_request"),
        ("POST", "/api/v1/services/app/switch", "", 400, "bad_request"),
        ("POST", "/api/v1/services/app/switch", "{\"to\": \"green\", \"colour\": 1}", 400, "bad_request"),
        ("POST", "/api/v1/services/app/switch", "{\"to\": 7}", 400, "bad_request"),
        ("POST", "/api/v1/services/app/switch", "[\"green\"]", 400, "bad_request"),
        ("POST", "/api/v1/services/nope/switch", "{\"to\": \"green\"}", 404, "unknown_service"),
        ("POST", "/api/v1/services/app/switch", "{\"to\": \"purple\"}", 404, "unknown_pool"),
        ("PUT", "/api/v1/services/app/canary", "{\"pool\": \"green\", \"weight\": 101}", 400, "bad_request"),
        ("PUT", "/api/v1/services/app/canary", "{\"pool\": \"green\", \"weight\": -1}", 400, "bad_request"),
        ("PUT", "/api/v1/services/app/canary", "{\"pool\": \"green\", \"weight\": \"10\"}", 400, "bad_request"),
        ("PUT", "/api/v1/services/app/canary", "{\"pool\": \"green\"}", 400, "bad_request"),
        ("PUT", "/api/v1/services/app/canary", "{\"pool\": \"green\", \"weight\": 5, \"sticky\": \"ip\"}", 400, "bad_request"),
        ("PUT", "/api/v1/services/app/canary", "{\"pool\": \"green\", \"weight\": 5, \"header\": {\"name\": \"bad header\", \"value\": \"1\"}}", 400, "bad_request"),
        ("PUT", "/api/v1/services/app/canary", "{\"pool\": \"blue\", \"weight\": 5}", 409, "conflict"),
        ("PUT", "/api/v1/services/app/canary", "{\"pool\": \"purple\", \"weight\": 5}", 404, "unknown_pool"),
        ("POST", "/api/v1/services/app/promote", "", 409, "conflict"),
        ("POST", "/api/v1/services/app/promote", "{\"force\": \"yes\"}", 400, "bad_request"),
        ("POST", "/api/v1/services/app/rollback", "", 409, "conflict"),
        ("POST", "/api/v1/pools/blue/backends/127.0.0.1:1/drain", "", 404, "unknown_backend"),
        ("POST", "/api/v1/pools/purple/backends/127.0.0.1:1/drain", "", 404, "unknown_pool"),
        ("GET", "/api/v1/pools/blue/backends/127.0.0.1:1/wait-drained?timeout=soon", "", 400, "bad_request"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, answer) = admin_raw(bg.admin(), method, path, body).await;
        assert_eq!(got.as_u16(), status, "{method} {path} {body}: {answer}");
        assert_eq!(answer["code"], code, "{method} {path} {body}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
        assert_eq!(
            settled_state(bg.admin()).await,
            before,
            "{method} {path} {body} changed the state"
        );
    }
    let (status, answer) = admin(
        bg.admin(),
        "POST",
        "/api/v1/services/app/switch",
        Some(json!({"to": "green"})),
        &[("if-match", "banana")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(settled_state(bg.admin()).await, before);
    assert_eq!(served_by(bg.addr(), &[]).await, "blue-1");
}

#[tokio::test]
async fn a_drained_backend_gets_no_new_requests_and_wait_drained_returns_at_zero() {
    let bg = BlueGreen::start(2, "", "").await;
    let target = bg.blue[0].addr.to_string();
    let slow = {
        // Pin a slow request to blue-1 by draining blue-2 for a moment.
        let other = bg.blue[1].addr.to_string();
        admin(
            bg.admin(),
            "POST",
            &format!("/api/v1/pools/blue/backends/{other}/drain"),
            None,
            &[],
        )
        .await;
        let addr = bg.addr();
        let slow = tokio::spawn(async move { send(&client(), get(addr, "/slow/1500")).await });
        eventually(Duration::from_secs(10), "slow request on blue-1", || {
            bg.blue[0].hits() == 1
        })
        .await;
        admin(
            bg.admin(),
            "POST",
            &format!("/api/v1/pools/blue/backends/{other}/enable"),
            None,
            &[],
        )
        .await;
        slow
    };
    let (status, body) = admin(
        bg.admin(),
        "POST",
        &format!("/api/v1/pools/blue/backends/{target}/drain"),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "draining");
    assert_eq!(body["in_flight"], 1);
    for _ in 0..50 {
        assert_eq!(served_by(bg.addr(), &[]).await, "blue-2");
    }
    let (_, state) = admin(bg.admin(), "GET", "/api/v1/state", None, &[]).await;
    let blue1 = &state["pools"][0]["backends"][0];
    assert_eq!(
        (blue1["state"].as_str(), blue1["in_flight"].as_u64()),
        (Some("draining"), Some(1))
    );
    let (status, body) = admin(
        bg.admin(),
        "GET",
        &format!("/api/v1/pools/blue/backends/{target}/wait-drained?timeout=100ms"),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
    assert_eq!(body["in_flight"], 1);
    let (status, body) = admin(
        bg.admin(),
        "GET",
        &format!("/api/v1/pools/blue/backends/{target}/wait-drained?timeout=20s"),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["in_flight"], 0);
    let answer = slow.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "blue-1");
    let (status, body) = admin(
        bg.admin(),
        "POST",
        &format!("/api/v1/pools/blue/backends/{target}/enable"),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "active");
}
