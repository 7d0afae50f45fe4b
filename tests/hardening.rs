//! What a hostile client, a slow client or a runaway script can do, tried on real
//! sockets: silent connections, stalled bodies, clients that stop reading, host
//! confusion, floods over `max_connections`, and admin calls that ask for too much.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{tls_table, TestCa, TlsClient};
use common::*;
use http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (EOF or reset); false if it is still
/// open after `limit`.
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A proxy with a TLS listener for `app.example` and `client_header_timeout = 300ms`, in
/// front of `upstream`; the CA (for clients) and the certificate's directory (kept).
async fn tls_proxy_with_header_timeout(
    upstream: &Upstream,
) -> (switchyard::server::Running, TestCa, tempfile::TempDir) {
    let ca = TestCa::new("hardening CA");
    let dir = tempfile::tempdir().unwrap();
    let pair = ca.issue(&["app.example"]).write(dir.path(), "app");
    let keys = format!(
        "client_header_timeout = \"300ms\"\n{}",
        tls_table(&[pair], "")
    );
    let proxy = start_proxy(&config_text(&keys, &[("blue", &[upstream.addr])], "")).await;
    (proxy, ca, dir)
}

/// Reads an answer up to the end of its head; the bytes read.
async fn read_answer_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    answer
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{line_start}` in the scrape"))
}

async fn scrape(admin_addr: SocketAddr) -> String {
    send(&client(), get(admin_addr, "/metrics")).await.text()
}

fn backend(
    proxy: &switchyard::server::Running,
    pool: &str,
    index: usize,
) -> Arc<switchyard::backend::Backend> {
    Arc::clone(&proxy.shared.table().load().pool(pool).unwrap().backends[index])
}

// ------------------------------------------------------------------------------------
// 1. Connections that never send a request.

#[tokio::test]
async fn silent_connections_are_closed_after_client_header_timeout_even_with_h2c() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text(
        "h2c = true\nclient_header_timeout = \"300ms\"\nmax_connections = 3",
        &[("blue", &[upstream.addr])],
        "",
    ))
    .await;
    let addr = proxy.proxy_addr;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut half_preface = TcpStream::connect(addr).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // The whole preface and an empty SETTINGS frame, then never a HEADERS frame.
    let mut no_stream = TcpStream::connect(addr).await.unwrap();
    no_stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "three connections open", || {
        proxy.shared.control.metrics().connections("http").get() == 3
    })
    .await;
    let locked_out = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(locked_out.starts_with("HTTP/1.1 503"), "{locked_out}");

    for (what, stream) in [
        ("a silent connection", &mut silent),
        ("half an HTTP/2 preface", &mut half_preface),
        ("a preface and no stream", &mut no_stream),
    ] {
        assert!(
            closed_by_server(stream, Duration::from_secs(10)).await,
            "{what} is still open"
        );
    }
    // The slots are free again for real clients.
    eventually(Duration::from_secs(5), "connections closed", || {
        proxy.shared.control.metrics().connections("http").get() == 0
    })
    .await;
    assert_eq!(send(&client(), get(addr, "/")).await.status, StatusCode::OK);
    let metrics = scrape(proxy.admin_addr).await;
    assert!(
        metric(
            &metrics,
            "switchyard_client_timeouts_total{timeout=\"client_header_timeout\"}"
        ) >= 3.0,
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn silent_connections_after_the_tls_handshake_are_closed_too() {
    let upstream = Upstream::start("blue-1").await;
    let (proxy, ca, _dir) = tls_proxy_with_header_timeout(&upstream).await;
    let tls_addr = proxy.tls_addr.unwrap();
    for alpn in ["h2", "http/1.1"] {
        let client = TlsClient::new(&ca, &[alpn]);
        let mut stream = client.connect(tls_addr, "app.example").await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn.as_bytes()));
        assert!(
            closed_by_server(&mut stream, Duration::from_secs(10)).await,
            "a silent {alpn} connection is still open"
        );
    }
    proxy.shutdown().await;
}

/// A plain HTTP/1.1 head begun and never finished, on a fresh connection and on a
/// kept-alive one: closed without an answer at `client_header_timeout` (counted from
/// when the proxy began waiting for that head), counted as that timeout, and the
/// backend never sees it. An idle kept-alive client is closed too, but not counted: it
/// is no attack, just a client done for now.
#[tokio::test]
async fn an_unfinished_head_is_cut_off_and_counted_as_client_header_timeout() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text(
        "client_header_timeout = \"300ms\"",
        &[("blue", &[upstream.addr])],
        "",
    ))
    .await;
    let addr = proxy.proxy_addr;
    let timeouts = "switchyard_client_timeouts_total{timeout=\"client_header_timeout\"}";

    let mut fresh = TcpStream::connect(addr).await.unwrap();
    fresh
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(read_answer_head(&mut kept)
        .await
        .starts_with(b"HTTP/1.1 200"));
    kept.write_all(b"GET /second HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();

    let started = Instant::now();
    for (what, stream) in [("fresh", &mut fresh), ("kept-alive", &mut kept)] {
        assert!(
            closed_by_server(stream, Duration::from_secs(10)).await,
            "the {what} connection with half a head is still open"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(closed_by_server(&mut idle, Duration::from_secs(10)).await);
    assert_eq!(
        upstream.hits(),
        2,
        "only the whole requests reached the backend"
    );
    assert_eq!(metric(&scrape(proxy.admin_addr).await, timeouts), 2.0);
    proxy.shutdown().await;
}

/// The same over TLS (hyper keeps the head deadline there), on a kept-alive connection:
/// one whole request answered, then half a head; cut off and counted.
#[tokio::test]
async fn an_unfinished_head_over_tls_is_cut_off_and_counted_too() {
    let upstream = Upstream::start("blue-1").await;
    let (proxy, ca, _dir) = tls_proxy_with_header_timeout(&upstream).await;
    let client = TlsClient::new(&ca, &["http/1.1"]);
    let mut stream = client
        .connect(proxy.tls_addr.unwrap(), "app.example")
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: app.example\r\n\r\n")
        .await
        .unwrap();
    assert!(read_answer_head(&mut stream)
        .await
        .starts_with(b"HTTP/1.1 200"));
    stream
        .write_all(b"GET /second HTTP/1.1\r\nhost: app.example\r\n")
        .await
        .unwrap();
    assert!(closed_by_server(&mut stream, Duration::from_secs(10)).await);
    assert_eq!(upstream.hits(), 1);
    let metrics = scrape(proxy.admin_addr).await;
    assert_eq!(
        metric(
            &metrics,
            "switchyard_client_timeouts_total{timeout=\"client_header_timeout\"}"
        ),
        1.0
    );
    proxy.shutdown().await;
}

// ------------------------------------------------------------------------------------
// 2. Slow bodies and clients that stop reading.

#[tokio::test]
async fn a_stalled_request_body_gets_408_and_releases_the_backend() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text(
        "client_body_timeout = \"300ms\"",
        &[("blue", &[upstream.addr])],
        "",
    ))
    .await;
    let mut stream = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    // Ten of the hundred bytes announced, then nothing.
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let answer = backend(&proxy, "blue", 0);
    eventually(Duration::from_secs(5), "the upload in flight", || {
        answer.in_flight() == 1
    })
    .await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response.contains("x-switchyard-error: client-body-timeout"),
        "{response}"
    );
    assert_eq!(answer.in_flight(), 0);
    // A deploy waiting for the backend to drain is not held up by it.
    let wait = format!(
        "/api/v1/pools/blue/backends/{}/wait-drained?timeout=1s",
        upstream.addr
    );
    assert_eq!(
        admin(proxy.admin_addr, "GET", &wait, None, &[]).await.0,
        StatusCode::OK
    );
    let metrics = scrape(proxy.admin_addr).await;
    assert_eq!(
        metric(
            &metrics,
            "switchyard_client_timeouts_total{timeout=\"client_body_timeout\"}"
        ),
        1.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text(
        "send_timeout = \"300ms\"",
        &[("blue", &[upstream.addr])],
        "",
    ))
    .await;
    let total: u64 = 256 << 20;
    let mut stream = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    stream
        .write_all(format!("GET /download/{total} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 16];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..12], b"HTTP/1.1 200");
    // Now read nothing: the proxy's writes block once the socket buffers are full.
    let pinned = backend(&proxy, "blue", 0);
    eventually(Duration::from_secs(20), "the download released", || {
        pinned.in_flight() == 0
    })
    .await;
    let metrics = scrape(proxy.admin_addr).await;
    assert_eq!(
        metric(
            &metrics,
            "switchyard_client_timeouts_total{timeout=\"send_timeout\"}"
        ),
        1.0
    );
    // What is left to read ends well short of the whole body.
    let mut received = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received += n as u64,
            Err(_) => panic!("the connection was left open"),
        }
    }
    assert!(
        received < total,
        "{received} bytes: the whole body came through"
    );
    proxy.shutdown().await;
}

// ------------------------------------------------------------------------------------
// 3. Host confusion.

struct HostSite {
    _internal: Upstream,
    _public: Upstream,
    _catch_all: Upstream,
    proxy: switchyard::server::Running,
}

async fn host_site(proxy_keys: &str) -> HostSite {
    let internal = Upstream::start("internal-1").await;
    let public = Upstream::start("public-1").await;
    let catch_all = Upstream::start("blue-1").await;
    let extra = "[services.internal]\nhosts = [\"internal.example\"]\nactive = \"internal\"\n\
                 [services.public]\nhosts = [\"public.example\"]\nactive = \"public\"\n";
    let proxy = start_proxy(&config_text(
        proxy_keys,
        &[
            ("blue", &[catch_all.addr]),
            ("internal", &[internal.addr]),
            ("public", &[public.addr]),
        ],
        extra,
    ))
    .await;
    HostSite {
        _internal: internal,
        _public: public,
        _catch_all: catch_all,
        proxy,
    }
}

/// The `host` values the upstream saw, from `/echo`.
fn echoed_hosts(response: &str) -> Vec<String> {
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    echo["headers"]["host"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_proxy_routes_and_forwards_one_validated_host() {
    let site = host_site("").await;
    let addr = site.proxy.proxy_addr;
    let exchange = |request: String| async move {
        raw_exchange(addr, request.as_bytes(), Duration::from_secs(5)).await
    };

    for bad in [
        "host: internal.example\r\nhost: public.example\r\n",
        "host: a b/c@d\"<>\r\n",
        "host: user@evil.example\r\n",
        "",
    ] {
        let response = exchange(format!(
            "GET /echo HTTP/1.1\r\n{bad}connection: close\r\n\r\n"
        ))
        .await;
        assert!(response.starts_with("HTTP/1.1 400"), "{bad:?}: {response}");
        assert!(
            response.contains("x-switchyard-error: invalid-host"),
            "{bad:?}: {response}"
        );
    }

    // Absolute form: the URI's authority decides, and is what the backend gets.
    let response = exchange(
        "GET http://public.example/echo HTTP/1.1\r\nhost: internal.example\r\nconnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(response.contains("x-upstream: public-1"), "{response}");
    assert_eq!(echoed_hosts(&response), ["public.example"]);

    let response = exchange(
        "GET /echo HTTP/1.1\r\nhost: internal.example.\r\nconnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(
        response.contains("x-upstream: internal-1"),
        "trailing dot: {response}"
    );

    let response = exchange(
        "GET /echo HTTP/1.1\r\nhost: internal.example\r\nconnection: close, host\r\n\r\n".into(),
    )
    .await;
    assert!(response.contains("x-upstream: internal-1"), "{response}");
    assert_eq!(
        echoed_hosts(&response),
        ["internal.example"],
        "Connection: host"
    );

    // HTTP/1.0 may leave the host out: only the catch-all service matches. It goes
    // out as HTTP/1.1, which must name one.
    let response = exchange("GET /echo HTTP/1.0\r\n\r\n".into()).await;
    assert!(response.contains("x-upstream: blue-1"), "{response}");
    assert_eq!(
        echoed_hosts(&response),
        ["localhost"],
        "HTTP/1.0 without Host"
    );
    site.proxy.shutdown().await;
}

#[tokio::test]
async fn an_http2_authority_wins_over_a_host_header() {
    let site = host_site("h2c = true").await;
    let tcp = TcpStream::connect(site.proxy.proxy_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("http://public.example/echo")
        .version(http::Version::HTTP_2)
        .header("host", "internal.example")
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.headers()["x-upstream"], "public-1");
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["headers"]["host"], json!(["public.example"]));
    site.proxy.shutdown().await;
}

// ------------------------------------------------------------------------------------
// 4. Admin calls that ask for too much, and changes that cannot be saved.

#[tokio::test]
async fn runtime_membership_is_capped_and_the_refusal_changes_nothing() {
    let upstream = Upstream::start("blue-1").await;
    // The default max_backends_per_pool: 1000.
    let proxy = start_proxy(&config_text("", &[("blue", &[upstream.addr])], "")).await;
    let admin_addr = proxy.admin_addr;
    wait_ready(admin_addr).await;
    let (_, before) = admin(admin_addr, "GET", "/api/v1/state", None, &[]).await;
    let many: Vec<String> = (0..1001)
        .map(|i| format!("127.0.{}.{}:80", i / 250, 1 + i % 250))
        .collect();
    let (status, body) = admin(
        admin_addr,
        "PUT",
        "/api/v1/pools/blue/backends",
        Some(json!({ "backends": many })),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["code"], "too_many_backends");
    assert!(
        body["error"].as_str().unwrap().contains("at most 1000"),
        "{body}"
    );
    let (_, after) = admin(admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["pools"], before["pools"]);

    // A body past the admin API's limit: 413, as JSON like every other error.
    let huge = format!("{{\"backends\": [\"{}\"]}}", "1".repeat(2 << 20));
    let (status, body) = admin_raw(admin_addr, "PUT", "/api/v1/pools/blue/backends", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "body_too_large", "{body}");
    // A path that does not decode: axum's own rejection, as JSON too.
    let (status, body) = admin(
        admin_addr,
        "POST",
        "/api/v1/pools/blue/backends/%FF%FE/drain",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "bad_request", "{body}");
    assert_eq!(
        send(&client(), get(proxy.proxy_addr, "/")).await.text(),
        "blue-1"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_change_that_cannot_be_saved_leaves_memory_disk_and_traffic_as_they_were() {
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let config = config_text("", &[("blue", &[blue.addr]), ("green", &[green.addr])], "");
    let state_path = state_path_of(&config);
    let proxy = start_proxy(&config).await;
    let admin_addr = proxy.admin_addr;
    // Health settled first, so the views before and after differ only by the change.
    wait_ready(admin_addr).await;
    let saved = std::fs::read(&state_path).unwrap();
    let (_, before) = admin(admin_addr, "GET", "/api/v1/state", None, &[]).await;
    // The write goes through `<path>.tmp`: a directory there makes it fail, even as root.
    let blocker = std::path::PathBuf::from(format!("{}.tmp", state_path.display()));
    std::fs::create_dir(&blocker).unwrap();

    let switch = json!({"to": "green", "force": true});
    let (status, body) = admin(
        admin_addr,
        "POST",
        "/api/v1/services/app/switch",
        Some(switch.clone()),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["code"], "persist_failed");
    let members = json!({"backends": [blue.addr.to_string(), green.addr.to_string()]});
    let (status, _) = admin(
        admin_addr,
        "PUT",
        "/api/v1/pools/blue/backends",
        Some(members),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let (_, after) = admin(admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["services"], before["services"]);
    assert_eq!(after["pools"], before["pools"]);
    assert_eq!(std::fs::read(&state_path).unwrap(), saved);
    for _ in 0..10 {
        assert_eq!(
            send(&client(), get(proxy.proxy_addr, "/")).await.text(),
            "blue-1"
        );
    }

    std::fs::remove_dir(&blocker).unwrap();
    let (status, body) = admin(
        admin_addr,
        "POST",
        "/api/v1/services/app/switch",
        Some(switch),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        send(&client(), get(proxy.proxy_addr, "/")).await.text(),
        "green-1"
    );
    proxy.shutdown().await;
}

// ------------------------------------------------------------------------------------
// 5. A flood over max_connections.

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_over_max_connections_is_answered_without_holding_descriptors() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = ProxyProcess::start(&config_text(
        "max_connections = 1\nworkers = 1",
        &[("blue", &[upstream.addr])],
        "",
    ));
    // The one slot, taken by a keep-alive client.
    let mut holder = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    holder
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = holder.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let base = open_fds(proxy.pid());

    let pid = proxy.pid();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(open_fds(pid));
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        })
    };
    // Silent clients: today's slow path would wait on each for its request.
    let mut flood = Vec::new();
    for _ in 0..400 {
        flood.push(TcpStream::connect(proxy.proxy_addr).await.unwrap());
    }
    let started = Instant::now();
    let mut answered = 0;
    for stream in &mut flood {
        let mut response = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
        if response.starts_with(b"HTTP/1.1 503") {
            answered += 1;
        }
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = sampler.join().unwrap();
    eprintln!(
        "400 refused connections answered in {:?}; proxy descriptors: {base} before, at most {most} during",
        started.elapsed()
    );
    assert_eq!(answered, 400, "every refused client read a 503");
    assert!(
        most <= base + 64 + 16,
        "{most} descriptors open during the flood ({base} before): refused connections are held"
    );
    drop(holder);
}

// ------------------------------------------------------------------------------------
// 6. Backend bookkeeping.

#[tokio::test]
async fn an_ejected_backend_shows_as_ejected_while_its_checks_keep_passing() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let text = config_text(
        "",
        &[("blue", &[a.addr, b.addr])],
        "[pools.blue.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\njitter = \"0ms\"\n",
    )
    .replacen(
        "[pools.blue]\n",
        "[pools.blue]\npassive = { consecutive_failures = 3, ejection_time = \"60s\", max_ejection_percent = 50 }\n",
        1,
    );
    let proxy = start_proxy(&text).await;
    wait_ready(proxy.admin_addr).await;
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ejected = loop {
        assert!(Instant::now() < deadline, "no backend was ejected");
        send(&client, get(proxy.proxy_addr, "/status/500")).await;
        if let Some(i) = (0..2).find(|&i| backend(&proxy, "blue", i).is_ejected()) {
            break i;
        }
    };
    let upstream = if ejected == 0 { &a } else { &b };
    // Several passing checks later, it is still out, and shown as what it is.
    let checks = upstream.health.checks();
    eventually(Duration::from_secs(10), "three more passing checks", || {
        upstream.health.checks() >= checks + 3
    })
    .await;
    let (_, state) = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    let view = &state["pools"][0]["backends"][ejected];
    assert_eq!(
        (view["health"].as_str(), view["ejected"].as_bool()),
        (Some("healthy"), Some(true)),
        "{state}"
    );
    let other = if ejected == 0 { "b" } else { "a" };
    for _ in 0..20 {
        assert_eq!(
            send(&client, get(proxy.proxy_addr, "/")).await.text(),
            other
        );
    }
    let metrics = scrape(proxy.admin_addr).await;
    let line = format!(
        "switchyard_backend_ejected{{backend=\"{}\",pool=\"blue\"}}",
        upstream.addr
    );
    assert_eq!(metric(&metrics, &line), 1.0, "{metrics}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failures_never_eject_past_max_ejection_percent() {
    let upstreams = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
        Upstream::start("d").await,
    ];
    let addrs: Vec<SocketAddr> = upstreams.iter().map(|u| u.addr).collect();
    let text = config_text("", &[("blue", &addrs)], "");
    let text = text.replacen(
        "[pools.blue]\n",
        "[pools.blue]\npassive = { consecutive_failures = 1, ejection_time = \"60s\", max_ejection_percent = 50 }\n",
        1,
    );
    let proxy = start_proxy(&text).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let addr = proxy.proxy_addr;
        tasks.push(tokio::spawn(async move {
            send(&client(), get(addr, "/status/500")).await.status
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let ejected = (0..4)
        .filter(|&i| backend(&proxy, "blue", i).is_ejected())
        .count();
    assert_eq!(ejected, 2, "half of four, exactly");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_wait_drained_returns_no_request_reaches_the_backend() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let proxy = start_proxy(&config_text("", &[("blue", &[a.addr, b.addr])], "")).await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 12);
    load.wait_for(500).await;
    let drain = format!("/api/v1/pools/blue/backends/{}/drain", a.addr);
    assert_eq!(
        admin(proxy.admin_addr, "POST", &drain, None, &[]).await.0,
        StatusCode::OK
    );
    let wait = format!(
        "/api/v1/pools/blue/backends/{}/wait-drained?timeout=10s",
        a.addr
    );
    assert_eq!(
        admin(proxy.admin_addr, "GET", &wait, None, &[]).await.0,
        StatusCode::OK
    );
    let hits = a.hits();
    load.wait_for(1000).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    assert_eq!(
        a.hits(),
        hits,
        "a request reached the drained backend after wait-drained"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_504_is_counted_under_the_backend_that_timed_out() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text(
        "upstream_header_timeout = \"200ms\"",
        &[("blue", &[upstream.addr])],
        "",
    ))
    .await;
    let answer = send(&client(), get(proxy.proxy_addr, "/hang")).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    let metrics = scrape(proxy.admin_addr).await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("switchyard_requests_total") && l.contains("code=\"504\""))
        .unwrap_or_else(|| panic!("no 504 counted: {metrics}"));
    assert!(
        line.contains(&format!("backend=\"{}\"", upstream.addr)),
        "{line}"
    );
    proxy.shutdown().await;
}

#[test]
fn check_refuses_absurd_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    std::fs::write(
        &path,
        "[proxy]\nworkers = 100000\n[pools.blue]\nbackends = [\"127.0.0.1:1\"]\n[services.app]\nactive = \"blue\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("proxy.workers"), "{stderr}");
    assert!(stderr.contains("between 0 and 1024"), "{stderr}");
}
