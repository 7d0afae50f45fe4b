//! Config reload of the real binary under load: SIGHUP, `ctl reload` and
//! `POST /api/v1/config/reload` re-read the whole file, all or nothing, and no client
//! request fails while they do.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::json;

/// The config file the process was started with.
/// A port nothing listens on now.
fn free_port() -> u16 {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    free.local_addr().unwrap().port()
}

/// `n` GETs of `path`, one after another on `client`'s connection, each answered 200.
async fn answered_in_turn(
    client: &TestClient,
    addr: std::net::SocketAddr,
    path: &str,
    n: usize,
) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(n);
    for _ in 0..n {
        let answer = send(client, get(addr, path)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        answers.push(answer);
    }
    answers
}

fn config_path(proxy: &ProxyProcess) -> std::path::PathBuf {
    proxy.dir.path().join("switchyard.toml")
}

fn ctl(proxy: &ProxyProcess, args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(["ctl", "--admin", &format!("http://{}", proxy.admin_addr)])
        .args(args)
        .output()
        .unwrap()
}

async fn info(proxy: &ProxyProcess) -> serde_json::Value {
    let (status, info) = admin(proxy.admin_addr, "GET", "/api/v1/info", None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    info
}

/// `POST /api/v1/config/reload`, which must succeed; its answer.
async fn reload_ok(proxy: &ProxyProcess) -> serde_json::Value {
    let (status, answer) =
        admin(proxy.admin_addr, "POST", "/api/v1/config/reload", None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

fn backend<'a>(state: &'a serde_json::Value, pool: &str, addr: &str) -> &'a serde_json::Value {
    state["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pool)
        .unwrap_or_else(|| panic!("no pool {pool} in {state}"))["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr)
        .unwrap_or_else(|| panic!("no backend {addr} in pool {pool}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_pool_and_a_service_under_load_and_fails_nothing() {
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let text = config_text("", &[("blue", &[blue.addr])], "");
    let proxy = ProxyProcess::start(&text);
    wait_ready(proxy.admin_addr).await;
    let before = info(&proxy).await;
    assert_eq!(before["pid"], proxy.pid());
    assert_eq!(before["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(before["listen"]["proxy"], proxy.proxy_addr.to_string());
    assert!(before["cluster"].is_null());
    assert_eq!(
        before["config_path"],
        config_path(&proxy).display().to_string()
    );
    let status = ctl(&proxy, &["status"]);
    let first_line = String::from_utf8_lossy(&status.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        first_line.starts_with(&format!(
            "switchyard {} pid {}",
            env!("CARGO_PKG_VERSION"),
            proxy.pid()
        )),
        "{first_line}"
    );
    let health_before = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[])
        .await
        .1;
    assert_eq!(
        backend(&health_before, "blue", &blue.addr.to_string())["health"],
        "healthy"
    );

    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(200).await;
    let added = format!(
        "{text}\n[pools.green]\nbackends = [\"{}\"]\n\n[services.api]\npath_prefix = \"/api\"\nactive = \"green\"\n",
        green.addr
    );
    std::fs::write(config_path(&proxy), &added).unwrap();
    let out = ctl(&proxy, &["reload"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("added pools.green"), "{stdout}");
    assert!(stdout.contains("added services.api"), "{stdout}");
    load.wait_for(200).await;

    // The new service answers at once; the old one is untouched.
    let answer = send(&client(), get(proxy.proxy_addr, "/api/x")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-upstream"), Some("green-1"));
    let state = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[])
        .await
        .1;
    let kept = backend(&state, "blue", &blue.addr.to_string());
    assert_eq!(kept["health"], "healthy", "the backend kept its health");
    assert!(info(&proxy).await["generation"].as_u64() > before["generation"].as_u64());

    // SIGHUP does the same: here it takes the service away again.
    std::fs::write(config_path(&proxy), &text).unwrap();
    let generation = info(&proxy).await["generation"].as_u64().unwrap();
    proxy.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while info(&proxy).await["generation"].as_u64().unwrap() == generation {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = send(&client(), get(proxy.proxy_addr, "/api/x")).await;
    assert_eq!(gone.header("x-upstream"), Some("blue-1"));
    load.wait_for(200).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    assert!(records.iter().all(|r| r.upstream == "blue-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_finishes_its_slow_requests_and_gets_no_new_ones() {
    let first = Upstream::start("blue-1").await;
    let second = Upstream::start("blue-2").await;
    let text = config_text("", &[("blue", &[first.addr, second.addr])], "");
    let proxy = ProxyProcess::start(&text);
    wait_ready(proxy.admin_addr).await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(100).await;
    let addr = proxy.proxy_addr;
    let slow: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { send(&client(), get(addr, "/slow/1500")).await }))
        .collect();
    let admin_addr = proxy.admin_addr;
    let second_addr = second.addr.to_string();
    let mut in_flight = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while in_flight == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no slow request reached blue-2"
        );
        let state = admin(admin_addr, "GET", "/api/v1/state", None, &[]).await.1;
        in_flight = backend(&state, "blue", &second_addr)["in_flight"]
            .as_u64()
            .unwrap();
    }

    std::fs::write(
        config_path(&proxy),
        text.replace(&format!(", \"{}\"", second.addr), ""),
    )
    .unwrap();
    let (status, reloaded) =
        admin(proxy.admin_addr, "POST", "/api/v1/config/reload", None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{reloaded}");
    assert!(
        reloaded["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["key"] == "pools.blue.backends"
                && c["change"] == "removed"
                && c["detail"].as_str().unwrap().starts_with(&second_addr)),
        "{reloaded}"
    );
    for request in slow {
        let answer = request.await.unwrap();
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "a slow request in flight failed"
        );
    }
    // Counted once the slow requests are back (1.5 s after the reload), so a request
    // routed by the old table a moment before the swap, still on its way to blue-2
    // when the reload answered, is not taken for a new one.
    let hits_at_reload = second.hits();
    load.wait_for(300).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    assert_eq!(
        second.hits(),
        hits_at_reload,
        "a removed backend got new requests"
    );
    let state = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[])
        .await
        .1;
    let pool = state["pools"].as_array().unwrap()[0]["backends"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(pool, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_changes_nothing_and_says_what_check_says() {
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let text = config_text("", &[("blue", &[blue.addr]), ("green", &[green.addr])], "");
    let proxy = ProxyProcess::start(&text);
    wait_ready(proxy.admin_addr).await;
    set_header_canary(proxy.admin_addr, "green").await;
    let generation = info(&proxy).await["generation"].as_u64().unwrap();
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(100).await;

    let path = config_path(&proxy);
    let missing_cert = text.replace(
        "[admin]",
        "[proxy.tls]\nlisten = \"127.0.0.1:0\"\ncertificates = [{ cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }]\n\n[admin]",
    );
    for bad in [text.replace("[proxy]", "[proxy]\nlisen = 1"), missing_cert] {
        std::fs::write(&path, &bad).unwrap();
        let check = Command::new(binary())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!check.status.success());
        let check_text = String::from_utf8_lossy(&check.stderr)
            .trim()
            .trim_start_matches("error: ")
            .to_string();
        let (status, answer) =
            admin(proxy.admin_addr, "POST", "/api/v1/config/reload", None, &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["code"], "invalid_config");
        assert!(
            answer["error"].as_str().unwrap().starts_with(&check_text),
            "{answer} vs check: {check_text}"
        );
        let out = ctl(&proxy, &["reload"]);
        assert!(!out.status.success(), "ctl reload exited 0 on a bad file");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&check_text),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(info(&proxy).await["generation"], generation);
    let canary = canary_request(proxy.proxy_addr, "/");
    assert_eq!(
        send(&client(), canary).await.header("x-upstream"),
        Some("green-1"),
        "the canary survived"
    );

    // A good file again: the runtime canary wins over the file and is kept; dropping
    // its pool drops it, and the answer says so.
    std::fs::write(&path, &text).unwrap();
    let answer = reload_ok(&proxy).await;
    assert_eq!(answer["changes"], json!([]));
    assert_eq!(
        answer["generation"], generation,
        "nothing changed, same generation"
    );
    let state = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[])
        .await
        .1;
    assert_eq!(state["services"][0]["canary"]["pool"], "green");
    let without_green = text.replace(
        &format!("[pools.green]\nbackends = [\"{}\"]\n", green.addr),
        "",
    );
    std::fs::write(&path, &without_green).unwrap();
    let answer = reload_ok(&proxy).await;
    let changes = answer["changes"].as_array().unwrap();
    assert!(changes
        .iter()
        .any(|c| c["key"] == "pools.green" && c["change"] == "removed"));
    assert!(
        changes
            .iter()
            .any(|c| c["change"] == "dropped" && c["detail"].as_str().unwrap().contains("canary")),
        "{answer}"
    );
    let records = load.finish().await;
    assert_no_failures(&records);
    assert!(
        proxy
            .log
            .wait_for(
                "config reload refused, nothing changed",
                Duration::from_secs(5)
            )
            .is_some(),
        "the log does not say the reload was refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_listen_address_is_bound_before_the_old_one_closes() {
    let blue = Upstream::start("blue-1").await;
    // A port found free can be taken (as another test's connection's local port) before
    // the proxy binds it: then another one is tried.
    let (proxy, text, old_port) = {
        let mut tries = 0;
        loop {
            let old_port = free_port();
            let text = config_text("", &[("blue", &[blue.addr])], "").replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{old_port}\""),
                1,
            );
            match ProxyProcess::try_start(&text) {
                Ok(proxy) => break (proxy, text, old_port),
                Err(e) if e.contains("Address already in use") && tries < 5 => tries += 1,
                Err(e) => panic!("{e}"),
            }
        }
    };
    wait_ready(proxy.admin_addr).await;
    let kept_alive = client();
    assert_eq!(
        send(&kept_alive, get(proxy.proxy_addr, "/")).await.status,
        StatusCode::OK
    );
    let load = LoadRun::start(proxy.proxy_addr, "/", 2);
    load.wait_for(100).await;

    // A reload that cannot bind changes nothing: another port is tried.
    let (new_port, answer) = {
        let mut tries = 0;
        loop {
            let new_port = free_port();
            std::fs::write(
                config_path(&proxy),
                text.replace(
                    &format!("127.0.0.1:{old_port}"),
                    &format!("127.0.0.1:{new_port}"),
                ),
            )
            .unwrap();
            let (status, answer) =
                admin(proxy.admin_addr, "POST", "/api/v1/config/reload", None, &[]).await;
            if status == StatusCode::OK {
                break (new_port, answer);
            }
            assert!(
                answer["code"] == "bind_failed" && tries < 5,
                "{status} {answer}"
            );
            tries += 1;
        }
    };
    assert!(answer["changes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["key"] == "proxy.listen"));
    let moved: std::net::SocketAddr = format!("127.0.0.1:{new_port}").parse().unwrap();
    assert_eq!(info(&proxy).await["listen"]["proxy"], moved.to_string());
    assert_eq!(
        send(&client(), get(moved, "/")).await.status,
        StatusCode::OK
    );
    // Connections made before the move carry on; new ones find the old port closed.
    load.wait_for(100).await;
    assert_eq!(
        send(&kept_alive, get(proxy.proxy_addr, "/")).await.status,
        StatusCode::OK
    );
    eventually(Duration::from_secs(10), "the old port to close", || {
        std::net::TcpStream::connect(proxy.proxy_addr).is_err()
    })
    .await;
    assert_no_failures(&load.finish().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_the_https_listener() {
    use common::tls::{tls_table, Session, TestCa, TlsClient};
    let blue = Upstream::start("blue-1").await;
    let text = config_text("", &[("blue", &[blue.addr])], "");
    let proxy = ProxyProcess::start(&text);
    wait_ready(proxy.admin_addr).await;
    assert!(info(&proxy).await["listen"]["tls"].is_null());

    let ca = TestCa::new("reload CA");
    let pair = ca.issue(&["app.test"]).write(proxy.dir.path(), "app");
    let with_tls = text.replace("[admin]", &format!("{}\n[admin]", tls_table(&[pair], "")));
    std::fs::write(config_path(&proxy), &with_tls).unwrap();
    let answer = reload_ok(&proxy).await;
    assert!(answer["changes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["key"] == "proxy.tls" && c["change"] == "added"));
    let tls_addr: std::net::SocketAddr = info(&proxy).await["listen"]["tls"]
        .as_str()
        .expect("a TLS address after the reload")
        .parse()
        .unwrap();
    let client = TlsClient::new(&ca, &["h2", "http/1.1"]);
    let mut session = Session::open(&client, tls_addr, "app.test").await.unwrap();
    let answer = session.get("/").await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-upstream"), Some("blue-1"));

    std::fs::write(config_path(&proxy), &text).unwrap();
    reload_ok(&proxy).await;
    assert!(info(&proxy).await["listen"]["tls"].is_null());
    eventually(Duration::from_secs(10), "the HTTPS port to close", || {
        std::net::TcpStream::connect(tls_addr).is_err()
    })
    .await;
}

#[tokio::test]
async fn a_reload_that_changes_a_pools_protocol_fails_no_request_on_the_connections_it_had() {
    let upstream = Upstream::start("rpc-1").await;
    let h2c = config_text(
        "",
        &[],
        &format!(
            "[pools.rpc]\nbackends = [\"{}\"]\nprotocol = \"h2c\"\n\n[services.app]\nactive = \"rpc\"\n",
            upstream.addr
        ),
    );
    let http1 = h2c.replace("protocol = \"h2c\"\n", "");
    let proxy = ProxyProcess::start(&h2c);
    wait_ready(proxy.admin_addr).await;
    let client = client();
    let versions = |n: usize| {
        let client = client.clone();
        let addr = proxy.proxy_addr;
        async move {
            answered_in_turn(&client, addr, "/echo", n)
                .await
                .iter()
                .map(|answer| answer.json()["version"].as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        }
    };
    // The pool's shared HTTP/2 connection is open when the reload makes it HTTP/1.1,
    // and its idle HTTP/1.1 connections are when the next makes it HTTP/2 again.
    assert_eq!(versions(3).await, ["HTTP/2.0"; 3]);
    std::fs::write(config_path(&proxy), &http1).unwrap();
    reload_ok(&proxy).await;
    assert_eq!(versions(3).await, ["HTTP/1.1"; 3]);
    std::fs::write(config_path(&proxy), &h2c).unwrap();
    reload_ok(&proxy).await;
    assert_eq!(versions(3).await, ["HTTP/2.0"; 3]);
}

/// Backends and their pooled connections outlive a reload; the connections made under
/// a pool's old TLS settings must not carry its requests under the new ones.
#[tokio::test]
async fn a_reload_that_changes_a_pools_tls_settings_is_not_bypassed_by_its_pooled_connections() {
    use common::tls::{TlsUpstream, UpstreamTlsFiles};
    let files = UpstreamTlsFiles::new();
    let upstream = TlsUpstream::start_plain_too(&files.server_cert(), &files.client_ca).await;
    let pool = |keys: &str| {
        config_text(
            // Connections stay pooled however slow a step is.
            "upstream_idle_timeout = \"1h\"",
            &[],
            &format!(
                "[pools.app]\nbackends = [\"{}\"]\n{keys}\n\n[services.app]\nactive = \"app\"\n",
                upstream.addr
            ),
        )
    };
    let tls = files.pool_keys();
    let with_cert = files.pool_keys_with_client_cert();
    let proxy = ProxyProcess::start(&pool(""));
    wait_ready(proxy.admin_addr).await;
    // One keep-alive client: each step's first request would find the connection the
    // step before left idle.
    let client = client();
    let answers = |n: usize| {
        let client = client.clone();
        let addr = proxy.proxy_addr;
        async move {
            answered_in_turn(&client, addr, "/", n)
                .await
                .iter()
                .map(Answer::text)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(answers(3).await, ["plain-upstream HTTP/1.1"; 3]);
    // Three idle connections for the first reload to leave behind.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let addr = proxy.proxy_addr;
            tokio::spawn(async move { send(&common::client(), get(addr, "/slow")).await.status })
        })
        .collect();
    for request in slow {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    assert!(upstream.open_connections() >= 3);
    // HTTP/1.1's idle connections, then HTTP/2's shared one.
    let h2 = tls.replace("tls = true", r#"protocol = "h2""#);
    let h2_with_cert = with_cert.replace("tls = true", r#"protocol = "h2""#);
    for (keys, expected) in [
        (tls.as_str(), "tls-upstream HTTP/1.1 client-cert=no"),
        (with_cert.as_str(), "tls-upstream HTTP/1.1 client-cert=yes"),
        ("", "plain-upstream HTTP/1.1"),
        (r#"protocol = "h2c""#, "plain-upstream HTTP/2.0"),
        (h2.as_str(), "tls-upstream HTTP/2.0 client-cert=no"),
        (
            h2_with_cert.as_str(),
            "tls-upstream HTTP/2.0 client-cert=yes",
        ),
        (tls.as_str(), "tls-upstream HTTP/1.1 client-cert=no"),
        (r#"protocol = "h2c""#, "plain-upstream HTTP/2.0"),
        ("", "plain-upstream HTTP/1.1"),
    ] {
        std::fs::write(config_path(&proxy), pool(keys)).unwrap();
        reload_ok(&proxy).await;
        // What the old settings made is closed with no request to meet it (the
        // sweep's work: the idle timeout is an hour).
        eventually(
            Duration::from_secs(10),
            &format!("the old connections closed after a reload to `{keys}`"),
            || upstream.open_connections() == 0,
        )
        .await;
        assert_eq!(
            answers(3).await,
            [expected; 3],
            "after a reload to `{keys}`"
        );
        // And the requests since share one new connection.
        eventually(
            Duration::from_secs(10),
            &format!("one connection open to the upstream after a reload to `{keys}` and requests"),
            || upstream.open_connections() == 1,
        )
        .await;
    }
}
