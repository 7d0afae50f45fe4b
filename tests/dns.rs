//! Backends written as host names: resolved at start and every `dns_refresh`, each
//! address a backend; a name whose address changes moves the traffic, a failed lookup
//! keeps the last good addresses, a name that never resolved is shown with its error.
//! Names come from a hosts file (`[proxy] hosts_file`), so the test controls them.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::tls::TestCa;
use common::*;
use http::StatusCode;

/// Two stand-ins on one port of two loopback addresses, as one name's two addresses.
async fn twins() -> (Upstream, Upstream, u16) {
    loop {
        let first = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        if let Ok(second) = tokio::net::TcpListener::bind(("127.0.0.3", port)).await {
            return (
                Upstream::serve_on("app-2", first),
                Upstream::serve_on("app-3", second),
                port,
            );
        }
    }
}

/// A config whose pool `blue` is `pool_keys` (its backends among them), with names
/// looked up in `hosts` first.
fn named_config(hosts: &std::path::Path, pool_keys: &str) -> String {
    config_with_admin(
        &format!("hosts_file = \"{}\"", hosts.display()),
        "",
        &[("blue", &[])],
        "",
    )
    .replace(
        "[pools.blue]\nbackends = []",
        &format!("[pools.blue]\n{pool_keys}"),
    )
}

fn pool_names(state: &serde_json::Value) -> serde_json::Value {
    state["pools"][0]["names"][0].clone()
}

async fn state(admin_addr: SocketAddr) -> serde_json::Value {
    admin(admin_addr, "GET", "/api/v1/state", None, &[]).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_backend_follows_its_address_and_keeps_the_last_good_one() {
    let (two, three, port) = twins().await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let text = named_config(
        &hosts,
        &format!("backends = [\"app-blue:{port}\"]\ndns_refresh = \"100ms\""),
    );
    check(&text).expect("check accepts a host name");
    // No hosts file yet: the name never resolved, and the pool has no backend.
    let proxy = start_proxy(&text).await;
    let view = pool_names(&state(proxy.admin_addr).await);
    assert_eq!(view["name"], format!("app-blue:{port}"));
    assert_eq!(view["addresses"], serde_json::json!([]));
    assert!(
        view["error"].as_str().unwrap().contains("hosts file"),
        "{view}"
    );
    assert!(view["resolved_at"].is_null());
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);

    // It resolves at the next refresh.
    std::fs::write(&hosts, "127.0.0.2 app-blue\n").unwrap();
    let addr = proxy.proxy_addr;
    let mut served = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while served != "app-2" {
        assert!(
            std::time::Instant::now() < deadline,
            "the name never resolved"
        );
        served = send(&client(), get(addr, "/"))
            .await
            .header("x-upstream")
            .unwrap_or_default()
            .to_string();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let view = pool_names(&state(proxy.admin_addr).await);
    assert_eq!(
        view["addresses"],
        serde_json::json!([format!("127.0.0.2:{port}")])
    );
    assert!(view["error"].is_null());

    // The address changes under load: traffic moves, nothing fails.
    let load = LoadRun::start(addr, "/", 4);
    load.wait_for(100).await;
    std::fs::write(&hosts, "127.0.0.3 app-blue\n").unwrap();
    eventually(
        Duration::from_secs(10),
        "traffic to move to 127.0.0.3",
        || three.hits() > 50,
    )
    .await;
    let moved_at = two.hits();
    load.wait_for(200).await;
    assert_eq!(two.hits(), moved_at, "the old address still gets requests");

    // Both addresses: both are backends.
    std::fs::write(&hosts, "127.0.0.2 app-blue\n127.0.0.3 app-blue\n").unwrap();
    eventually(Duration::from_secs(10), "both addresses to serve", || {
        two.hits() > moved_at + 50
    })
    .await;

    // The lookup fails: the last good addresses stay, and the failure is shown.
    std::fs::remove_file(&hosts).unwrap();
    let admin_addr = proxy.admin_addr;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view = pool_names(&state(admin_addr).await);
        if view["error"].is_string() {
            assert_eq!(view["addresses"].as_array().unwrap().len(), 2, "{view}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failed lookup is not shown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = (two.hits(), three.hits());
    load.wait_for(200).await;
    assert!(two.hits() > before.0 && three.hits() > before.1);
    assert_no_failures(&load.finish().await);
    let scrape = send(&client(), get(proxy.admin_addr, "/metrics"))
        .await
        .text();
    let failures = scrape
        .lines()
        .find(|l| l.starts_with("switchyard_dns_lookup_failures_total{pool=\"blue\"}"))
        .unwrap_or_else(|| panic!("no dns failure counter in the scrape"));
    assert!(!failures.ends_with(" 0"), "{failures}");
}

/// Every request goes to `app-3`, none to the drained `app-2`.
async fn only_the_other_serves(proxy: SocketAddr, drained: &Upstream) {
    let before = drained.hits();
    for _ in 0..20 {
        let answer = send(&client(), get(proxy, "/")).await;
        assert_eq!(answer.header("x-upstream"), Some("app-3"));
    }
    assert_eq!(drained.hits(), before);
}

/// A drain of one of a name's addresses is a change like any other: it survives a
/// reload of an unchanged config and a restart, though neither knows the name's
/// addresses when it reads the saved state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_address_of_a_named_backend_stays_drained_across_a_reload_and_a_restart() {
    let (two, three, port) = twins().await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.2 app-blue\n127.0.0.3 app-blue\n").unwrap();
    let text = named_config(&hosts, &format!("backends = [\"app-blue:{port}\"]"));
    let drained = format!("127.0.0.2:{port}");
    let mode_of_drained = |state: &serde_json::Value| {
        state["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["addr"] == drained.as_str())
            .map(|b| b["state"].clone())
    };
    let mut first = ProxyProcess::start(&text);
    let path = format!("/api/v1/pools/blue/backends/{drained}/drain");
    let (status, answer) = admin(first.admin_addr, "POST", &path, None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    only_the_other_serves(first.proxy_addr, &two).await;

    let (status, answer) =
        admin(first.admin_addr, "POST", "/api/v1/config/reload", None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let after_reload = state(first.admin_addr).await;
    assert_eq!(
        mode_of_drained(&after_reload),
        Some("draining".into()),
        "{after_reload}"
    );
    only_the_other_serves(first.proxy_addr, &two).await;

    first.signal("TERM");
    assert!(first.wait_exit(Duration::from_secs(30)).success());
    let second = ProxyProcess::start(&text);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let restarted = loop {
        let view = state(second.admin_addr).await;
        if mode_of_drained(&view).is_some() {
            break view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the name never resolved: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        mode_of_drained(&restarted),
        Some("draining".into()),
        "{restarted}"
    );
    only_the_other_serves(second.proxy_addr, &two).await;
    assert!(three.hits() >= 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_named_backend_sends_and_verifies_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ca");
    let upstream = common::tls::TlsUpstream::start(&ca.issue(&["app.test"]), None).await;
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 app.test\n").unwrap();
    let text = named_config(
        &hosts,
        &format!(
            "backends = [\"app.test:{}\"]\ntls = true\nca_file = \"{}\"",
            upstream.addr.port(),
            ca.write(dir.path()).display()
        ),
    );
    let proxy = start_proxy(&text).await;
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(
        answer.text().starts_with("tls-upstream"),
        "{}",
        answer.text()
    );
}

#[test]
fn check_accepts_names_and_refuses_what_is_neither_a_name_nor_an_address() {
    let pool = |backend: &str| {
        config_with_admin("", "", &[("blue", &[])], "")
            .replace("backends = []", &format!("backends = [\"{backend}\"]"))
    };
    for good in [
        "app-blue:8080",
        "app.example.com:443",
        "app_blue.svc.cluster.local.:80",
    ] {
        check(&pool(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let compose = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/compose/switchyard.toml"
    );
    check(&std::fs::read_to_string(compose).unwrap()).expect("the Compose example passes check");
    for bad in [
        "app-blue",
        "app-blue:0",
        "app-blue:99999",
        "-app:80",
        "10.0.0.300:80",
        "a b:80",
    ] {
        let error = check(&pool(bad))
            .err()
            .unwrap_or_else(|| panic!("{bad} was accepted"));
        assert_eq!(error.key, "pools.blue.backends", "{bad}");
    }
}
