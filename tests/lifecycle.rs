//! The real binary: graceful shutdown on SIGTERM, bounded memory while streaming, the
//! `check` command and the `demo` command of the README.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_completes_across_sigterm_and_the_process_exits_0() {
    let upstream = Upstream::start("blue").await;
    let config = config_text(
        "shutdown_delay = \"1s\"\nshutdown_timeout = \"20s\"",
        &[("blue", &[upstream.addr])],
        "",
    );
    let mut proxy = ProxyProcess::start(&config);
    let client = client();
    wait_ready(proxy.admin_addr).await;

    let slow = tokio::spawn({
        let client = client.clone();
        let addr = proxy.proxy_addr;
        async move { send(&client, get(addr, "/slow/2500")).await }
    });
    eventually(
        Duration::from_secs(10),
        "slow request reached the upstream",
        || upstream.hits() == 1,
    )
    .await;
    proxy.signal("TERM");

    // During shutdown_delay: not ready, but still serving new requests.
    let admin = proxy.admin_addr;
    let mut not_ready = false;
    for _ in 0..100 {
        if send(&client, get(admin, "/readyz")).await.status == StatusCode::SERVICE_UNAVAILABLE {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready, "/readyz never turned 503");
    let fresh = common::client();
    assert_eq!(
        send(&fresh, get(proxy.proxy_addr, "/")).await.status,
        StatusCode::OK
    );

    let answer = slow.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "blue");
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mb_download_streams_through_without_growing_memory() {
    let upstream = Upstream::start("blue").await;
    let proxy = ProxyProcess::start(&config_text("", &[("blue", &[upstream.addr])], ""));
    let total: u64 = 256 * 1024 * 1024;
    let response = client()
        .request(get(proxy.proxy_addr, &format!("/download/{total}")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.unwrap().data_ref() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, total);
    let peak = proxy.peak_rss();
    assert!(
        peak < 64 * 1024 * 1024,
        "proxy peak RSS {} MiB",
        peak / (1024 * 1024)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mb_upload_streams_through_without_growing_memory() {
    let upstream = Upstream::start("blue").await;
    let proxy = ProxyProcess::start(&config_text("", &[("blue", &[upstream.addr])], ""));
    let total: u64 = 256 * 1024 * 1024;
    let request = http::Request::post(format!("http://{}/upload", proxy.proxy_addr))
        .body(BodyExt::boxed(Repeat::new(total)))
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.text().ends_with(&format!(" {total}")),
        "{}",
        answer.text()
    );
    let peak = proxy.peak_rss();
    assert!(
        peak < 64 * 1024 * 1024,
        "proxy peak RSS {} MiB",
        peak / (1024 * 1024)
    );
}

fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(binary())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("bad.toml"), "the file is named: {text}");
    (out.status.success(), text)
}

const VALID: &str = r#"[proxy]
listen = "127.0.0.1:8080"

[pools.blue]
backends = ["127.0.0.1:9001", "127.0.0.1:9002"]

[pools.blue.health]
path = "/health"
interval = "1s"
timeout = "500ms"

[services.app]
hosts = ["*"]
active = "blue"
"#;

#[test]
fn check_accepts_a_valid_config_and_the_shipped_example() {
    let (ok, text) = check(VALID);
    assert!(ok, "{text}");
    let out = Command::new(binary())
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_rejects_each_invalid_config_naming_the_key_and_line() {
    let cases: &[(&str, String, &str, Option<&str>)] = &[
        (
            "unknown key",
            VALID.replace("listen = \"127", "lissen = \"127"),
            "proxy.lissen",
            Some(":2:"),
        ),
        (
            "unknown pool",
            VALID.replace("active = \"blue\"", "active = \"green\""),
            "services.app.active",
            Some(":14:"),
        ),
        (
            "empty pool",
            VALID.replace("[\"127.0.0.1:9001\", \"127.0.0.1:9002\"]", "[]"),
            "pools.blue.backends",
            Some(":5:"),
        ),
        (
            "bad address",
            VALID.replace("127.0.0.1:9002", "127.0.0.1:99999"),
            "pools.blue.backends",
            Some(":5:"),
        ),
        (
            "duplicate backend",
            VALID.replace("127.0.0.1:9002", "127.0.0.1:9001"),
            "pools.blue.backends",
            Some(":5:"),
        ),
        (
            "timeout >= interval",
            VALID.replace("500ms", "2s"),
            "pools.blue.health.timeout",
            Some(":10:"),
        ),
        (
            "threshold 0",
            VALID.replace(
                "timeout = \"500ms\"",
                "timeout = \"500ms\"\nhealthy_threshold = 0",
            ),
            "pools.blue.health.healthy_threshold",
            Some(":11:"),
        ),
        (
            "identical services",
            format!("{VALID}\n[services.other]\nactive = \"blue\"\n"),
            "services.other.hosts",
            None,
        ),
        (
            "wrong type",
            VALID.replace("listen = \"127.0.0.1:8080\"", "listen = 8080"),
            "proxy.listen",
            Some(":2:"),
        ),
    ];
    for (what, config, key, line) in cases {
        let (ok, text) = check(config);
        assert!(!ok, "{what}: accepted");
        assert!(
            text.contains(key),
            "{what}: key `{key}` not named in: {text}"
        );
        if let Some(line) = line {
            assert!(
                text.contains(line),
                "{what}: line {line} not named in: {text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_example_config_with_stand_in_app_servers() {
    // Free ports for the stand-ins, found by binding and releasing.
    let mut ports = Vec::new();
    for _ in 0..4 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        ports.push(l.local_addr().unwrap().port());
    }
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [pools.blue]\nbackends = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
         [pools.green]\nbackends = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
         [services.app]\nactive = \"blue\"\n",
        ports[0], ports[1], ports[2], ports[3]
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(binary());
    command
        .args(["demo", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::piped());
    let Switchyard {
        mut child,
        proxy_addr: addr,
        ..
    } = Switchyard::start(command, true).unwrap();
    let answer = send(&client(), get(addr, "/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.text().starts_with("hello from blue"),
        "{}",
        answer.text()
    );
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_ignored_a_second_sigterm_too_and_sigint_then_exits_at_once() {
    let upstream = Upstream::start("blue").await;
    let config = config_text(
        "shutdown_timeout = \"60s\"",
        &[("blue", &[upstream.addr])],
        "",
    );
    let mut proxy = ProxyProcess::start(&config);
    let client = client();
    proxy.signal("HUP");
    // Still serving after SIGHUP (its handler logs and ignores it).
    for _ in 0..5 {
        assert_eq!(
            send(&client, get(proxy.proxy_addr, "/")).await.status,
            StatusCode::OK
        );
    }
    assert!(proxy.child.try_wait().unwrap().is_none());

    // A request that would hold the graceful shutdown for a minute...
    let addr = proxy.proxy_addr;
    let _slow = tokio::spawn(async move { client.request(get(addr, "/hang")).await });
    eventually(
        Duration::from_secs(10),
        "hanging request reached the upstream",
        || upstream.hits() == 6,
    )
    .await;
    proxy.signal("TERM");
    let admin = proxy.admin_addr;
    let probe = common::client();
    let mut draining = false;
    for _ in 0..200 {
        if send(&probe, get(admin, "/readyz")).await.status == StatusCode::SERVICE_UNAVAILABLE {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining);
    // A repeated SIGTERM (a supervisor's) does not cut it short...
    proxy.signal("TERM");
    for _ in 0..20 {
        assert!(send(&probe, get(admin, "/healthz")).await.status == StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "still draining after a second SIGTERM"
    );
    // A drain that takes long says what holds it: the hanging request's connection.
    let report = proxy
        .log
        .wait_for(
            "draining: client connections still open",
            Duration::from_secs(15),
        )
        .expect("no report of what the drain waits for");
    let fields: Vec<&str> = report.split_whitespace().collect();
    assert!(
        fields.contains(&"client_connections=1") && fields.contains(&"requests_in_flight=1"),
        "{report}"
    );
    // A SIGINT (an operator's second Ctrl-C) cuts it short.
    proxy.signal("INT");
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_websockets_but_not_for_admin_long_polls() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let upstream = Upstream::start("blue").await;
    let config = config_text(
        "shutdown_timeout = \"30s\"",
        &[("blue", &[upstream.addr])],
        "",
    );
    let mut proxy = ProxyProcess::start(&config);
    let stream = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.proxy_addr), stream)
            .await
            .unwrap();
    // A deploy script's long poll, still waiting when the proxy is told to stop.
    let mut poll = tokio::net::TcpStream::connect(proxy.admin_addr)
        .await
        .unwrap();
    let request = format!(
        "GET /api/v1/pools/blue/backends/{}/wait-drained?timeout=5m HTTP/1.1\r\nhost: admin\r\n\r\n",
        upstream.addr
    );
    tokio::io::AsyncWriteExt::write_all(&mut poll, request.as_bytes())
        .await
        .unwrap();
    let poll_addr = poll.local_addr().unwrap();
    eventually(
        Duration::from_secs(10),
        "the long poll read by the proxy",
        || server_has_read(proxy.admin_addr, poll_addr),
    )
    .await;
    proxy.signal("TERM");
    // The tunnel keeps working during the graceful shutdown...
    for i in 0..5 {
        ws.send(Message::text(format!("during shutdown {i}")))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("during shutdown {i}"))
        );
    }
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the process waits for the open tunnel"
    );
    // ...and once it closes, the process exits, without waiting for the long poll.
    ws.close(None).await.unwrap();
    drop(ws);
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// CPU ticks (utime + stime) of each of `pid`'s threads named like a worker.
fn worker_thread_ticks(pid: u32) -> Vec<u64> {
    let mut ticks = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        // `comm` holds 15 bytes of "switchyard-worker-N".
        if !name.starts_with("switchyard-work") {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // The fields after the name in parentheses: utime and stime are 14 and 15.
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        ticks.push(fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap());
    }
    ticks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_each_serve_connections_and_reuse_their_upstream_connections() {
    let upstream = Upstream::start("blue").await;
    let config = config_text("workers = 2", &[("blue", &[upstream.addr])], "");
    let proxy = ProxyProcess::start(&config);
    wait_ready(proxy.admin_addr).await;
    assert_eq!(
        worker_thread_ticks(proxy.pid()).len(),
        2,
        "two worker threads"
    );

    // Four keep-alive client connections, handed to the workers in turn; one request
    // at a time across all of them.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(proxy.proxy_addr)
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, TestBody>(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        clients.push(sender);
    }
    for round in 0..400 {
        for sender in &mut clients {
            sender.ready().await.unwrap();
            let answer = sender
                .send_request(get(proxy.proxy_addr, "/"))
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(answer.status(), StatusCode::OK);
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"blue");
        }
    }

    // Both workers did the work, and each kept reusing its own upstream connection:
    // with requests one at a time, no more than one per worker was ever opened.
    let ticks = worker_thread_ticks(proxy.pid());
    assert!(ticks.iter().all(|&t| t > 0), "worker CPU ticks {ticks:?}");
    let opened = upstream
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=2).contains(&opened), "{opened} upstream connections");
    assert_eq!(upstream.hits(), 1600);
}

#[test]
fn a_bad_tokio_worker_threads_stops_the_start_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    std::fs::write(
        &path,
        config_text("", &[("blue", &["127.0.0.1:1".parse().unwrap()])], ""),
    )
    .unwrap();
    for value in ["abc", "0", "5000"] {
        let out = Command::new(binary())
            .args(["run", "--config"])
            .arg(&path)
            .env("TOKIO_WORKER_THREADS", value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: {stderr}");
        assert!(
            stderr.contains("TOKIO_WORKER_THREADS") && stderr.contains("1 to 1024"),
            "{value}: {stderr}"
        );
    }
}
