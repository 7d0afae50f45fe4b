//! Failure handling as a client sees it: dead, hanging and misbehaving backends, and the
//! client-side limits.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A port that refuses connections: bound but not listening, and kept bound (by the
/// returned socket) so no parallel test can take it.
fn dead_addr() -> (std::net::SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// Runs `workers` keep-alive clients against `path` until `stop` is set; returns
/// (successes, failures as descriptions).
fn load(
    addr: std::net::SocketAddr,
    path: &'static str,
    workers: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let stop = stop.clone();
            let sent = sent.clone();
            tasks.push(tokio::spawn(async move {
                let client = client();
                let mut ok = 0u64;
                let mut failed = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    sent.fetch_add(1, Ordering::SeqCst);
                    match client.request(get(addr, path)).await {
                        Ok(response) => {
                            let status = response.status();
                            let body = response.into_body().collect().await;
                            if status == StatusCode::OK && body.is_ok() {
                                ok += 1;
                            } else {
                                failed.push(format!("status {status}"));
                            }
                        }
                        Err(e) => failed.push(format!("client error: {e:?}")),
                    }
                }
                (ok, failed)
            }));
        }
        let mut ok = 0;
        let mut failed = Vec::new();
        for task in tasks {
            let (o, f) = task.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_sustained_load_costs_clients_nothing() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let proxy = start_proxy(&config_text("", &[("blue", &[a.addr, b.addr])], "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let running = load(proxy.proxy_addr, "/", 16, stop.clone(), sent.clone());

    eventually(Duration::from_secs(20), "traffic on both backends", || {
        a.hits() > 200 && b.hits() > 200
    })
    .await;
    a.kill();
    let at_kill = sent.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(30),
        "2000 requests after the kill",
        || sent.load(Ordering::SeqCst) > at_kill + 2000,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = running.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 2000);
    proxy.shutdown().await;
}

#[tokio::test]
async fn all_backends_down_gives_503() {
    let (dead1, _hold1) = dead_addr();
    let (dead2, _hold2) = dead_addr();
    let proxy = start_proxy(&config_text("", &[("blue", &[dead1, dead2])], "")).await;
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer.header("x-switchyard-error"),
        Some("upstream-connect-failed")
    );
    assert!(!answer.body.is_empty());
    // The proxy keeps serving once a backend is back.
    proxy.shutdown().await;
}

#[tokio::test]
async fn no_available_backend_gives_503_without_trying() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config_text("", &[("blue", &[a.addr])], "")).await;
    let backend = proxy.shared.table().load().pools[0].backends[0].clone();
    backend.set_admin_state(switchyard::backend::AdminState::Draining);
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer.header("x-switchyard-error"),
        Some("no-healthy-backend")
    );
    assert_eq!(a.hits(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_hanging_upstream_gives_504_after_the_configured_timeout() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config_text(
        "upstream_header_timeout = \"300ms\"",
        &[("blue", &[a.addr])],
        "",
    ))
    .await;
    let started = Instant::now();
    let answer = send(&client(), get(proxy.proxy_addr, "/hang")).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        answer.header("x-switchyard-error"),
        Some("upstream-timeout")
    );
    // Not a timing assertion on the machine's speed: it must not answer *before* the timeout.
    assert!(started.elapsed() >= Duration::from_millis(300));
    // A slow upload is not a slow backend: the timer starts once the body is sent.
    let slow_body = futures_util::stream::unfold(0, |i| async move {
        if i == 4 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        Some((
            Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from_static(b"chunk"))),
            i + 1,
        ))
    });
    let request = Request::post(format!("http://{}/upload", proxy.proxy_addr))
        .body(BodyExt::boxed(http_body_util::StreamBody::new(slow_body)))
        .unwrap();
    assert_eq!(send(&client(), request).await.status, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_connect_timeout_is_retried_on_another_backend() {
    // A listener that never accepts, with its queue full: further connects hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let blackhole = socket.listen(1).unwrap();
    let blackhole_addr = blackhole.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(blackhole_addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let good = Upstream::start("good").await;
    let proxy = start_proxy(&config_text(
        "connect_timeout = \"200ms\"",
        &[("blue", &[blackhole_addr, good.addr])],
        "",
    ))
    .await;
    let client = client();
    for _ in 0..10 {
        let answer = send(&client, get(proxy.proxy_addr, "/")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "good");
    }
    proxy.shutdown().await;
    drop(blackhole);
}

/// An upstream that reads the request, then closes without answering.
async fn dropping_upstream() -> std::net::SocketAddr {
    raw_upstream(|mut s| async move {
        let mut buf = [0u8; 65536];
        let _ = s.read(&mut buf).await;
    })
    .await
}

#[tokio::test]
async fn an_upstream_that_drops_a_get_is_retried_and_a_post_gets_502() {
    let dropper = dropping_upstream().await;
    let good = Upstream::start("good").await;
    let proxy = start_proxy(&config_text(
        "",
        &[("blue", &[dropper, good.addr]), ("bad", &[dropper])],
        "[services.post]\npath_prefix = \"/post\"\nactive = \"bad\"\n",
    ))
    .await;
    let client = client();
    for _ in 0..20 {
        assert_eq!(
            send(&client, get(proxy.proxy_addr, "/")).await.status,
            StatusCode::OK
        );
    }
    let post = Request::post(format!("http://{}/post", proxy.proxy_addr))
        .body(full("payload"))
        .unwrap();
    let answer = send(&client, post).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.header("x-switchyard-error"), Some("upstream-error"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn oversized_headers_get_431_and_the_proxy_keeps_serving() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config_text(
        "max_header_size = \"16KiB\"",
        &[("blue", &[a.addr])],
        "",
    ))
    .await;
    let big = "x".repeat(20 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    let raw = raw_exchange(
        proxy.proxy_addr,
        request.as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 431"),
        "{}",
        &raw[..raw.len().min(200)]
    );
    assert_eq!(a.hits(), 0);
    assert_eq!(
        send(&client(), get(proxy.proxy_addr, "/")).await.status,
        StatusCode::OK
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_body_over_max_request_body_gets_413_declared_or_streamed() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config_text(
        "max_request_body = 1000",
        &[("blue", &[a.addr])],
        "",
    ))
    .await;
    let client = client();
    let declared = Request::post(format!("http://{}/upload", proxy.proxy_addr))
        .body(full(vec![b'x'; 5000]))
        .unwrap();
    let answer = send(&client, declared).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        answer.header("x-switchyard-error"),
        Some("request-body-too-large")
    );
    assert_eq!(
        a.hits(),
        0,
        "a declared oversize body never reaches the backend"
    );

    let chunks = futures_util::stream::iter((0..10).map(|_| {
        Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from(vec![b'y'; 500])))
    }));
    let streamed = Request::post(format!("http://{}/upload", proxy.proxy_addr))
        .body(BodyExt::boxed(http_body_util::StreamBody::new(chunks)))
        .unwrap();
    let response = client.request(streamed).await;
    // Either the proxy's 413, or the connection closed while the client was still
    // sending: never a 200 with a truncated body.
    if let Ok(response) = response {
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    let within = Request::post(format!("http://{}/upload", proxy.proxy_addr))
        .body(full(vec![b'x'; 1000]))
        .unwrap();
    assert_eq!(send(&client, within).await.status, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn connections_over_max_connections_get_503() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config_text(
        "max_connections = 2",
        &[("blue", &[a.addr])],
        "",
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(proxy.proxy_addr)
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let raw = raw_exchange(
        proxy.proxy_addr,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    assert!(raw.contains("x-switchyard-error: too-many-connections"));
    drop(held);
    // Permits come back when connections close.
    let mut answered = false;
    for _ in 0..200 {
        let raw = raw_exchange(
            proxy.proxy_addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
        if raw.starts_with("HTTP/1.1 200") {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answered);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config_text(
        "client_header_timeout = \"300ms\"",
        &[("blue", &[a.addr])],
        "",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "connection still open after 10 s");
    assert_eq!(a.hits(), 0);
    proxy.shutdown().await;
}

/// Writes `lines` one at a time, `gap` apart, until the server closes the connection;
/// returns how many it took and how long after the first the connection closed.
async fn trickle(
    s: &mut tokio::net::TcpStream,
    lines: &[&[u8]],
    gap: Duration,
) -> (usize, Duration) {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    for (sent, line) in lines.iter().enumerate() {
        if s.write_all(line).await.is_err() {
            return (sent, started.elapsed());
        }
        // The gap, cut short if the server closes (or answers) meanwhile.
        match tokio::time::timeout(gap, s.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return (sent + 1, started.elapsed()),
            Ok(Ok(n)) => panic!(
                "answered a head never finished: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        }
    }
    (lines.len(), started.elapsed())
}

/// Slowloris: a head sent a field at a time, each line 80 ms after the last (longer
/// than the proxy keeps an idle connection's hyper buffers, so it tries to give them up
/// between lines). The deadline counts from the head's first byte whatever happens in
/// between: the connection is closed at `client_header_timeout` (300 ms), not when the
/// head would be complete (4 s), on a fresh connection and on a kept-alive one alike.
#[tokio::test]
async fn a_client_that_trickles_its_headers_is_disconnected_at_client_header_timeout() {
    let a = Upstream::start("a").await;
    let proxy = start_proxy(&config_text(
        "client_header_timeout = \"300ms\"",
        &[("blue", &[a.addr])],
        "",
    ))
    .await;
    let mut lines: Vec<&[u8]> = vec![b"GET / HTTP/1.1\r\n"];
    lines.extend(std::iter::repeat_n(&b"x-slow: 1\r\n"[..], 48));
    lines.push(b"Host: a\r\n\r\n");

    let mut fresh = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .unwrap();
    let (sent, closed_after) = trickle(&mut fresh, &lines, Duration::from_millis(80)).await;
    assert!(
        sent < lines.len(),
        "the whole head got through, {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}"
    );

    // A kept-alive connection: one whole request answered, then the next head trickles.
    let mut kept = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let n = kept.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Idle past the moment the proxy gives the connection's hyper buffers up.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (sent, closed_after) = trickle(&mut kept, &lines, Duration::from_millis(80)).await;
    assert!(
        sent < lines.len(),
        "the whole second head got through, {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}"
    );

    assert_eq!(a.hits(), 1, "only the whole request reached the backend");
    proxy.shutdown().await;
}

/// An upstream that answers every request on its keep-alive connections, each after
/// `delay`, as `x-upstream: slow`.
async fn slow_upstream(delay: Duration) -> std::net::SocketAddr {
    raw_upstream(move |mut s| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let Ok(n) = s.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            head.extend_from_slice(&buf[..n]);
            // Bodiless GETs only: one answer per head.
            while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                head.drain(..end + 4);
                tokio::time::sleep(delay).await;
                let answer =
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-upstream: slow\r\n\r\nslow";
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_balancer_keeps_most_requests_off_a_slow_backend() {
    // Round robin would send every other request to the slow backend. p2c, the default,
    // sends one there only while it has no more in flight than the fast one, and each
    // of its answers takes 250 ms. (With a single client both have none in flight at
    // every pick: in-flight counts tell backends apart only under concurrent load.)
    let fast = Upstream::start("fast").await;
    let slow = slow_upstream(Duration::from_millis(250)).await;
    let proxy = start_proxy(&config_text("", &[("blue", &[fast.addr, slow])], "")).await;
    let addr = proxy.proxy_addr;
    // Eight clients at once until 400 requests have been sent, so the load stays
    // concurrent to the end.
    let started = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let started = started.clone();
        clients.push(tokio::spawn(async move {
            let client = client();
            let mut served = Vec::new();
            while started.fetch_add(1, Ordering::SeqCst) < 400 {
                let answer = send(&client, get(addr, "/")).await;
                assert_eq!(answer.status, StatusCode::OK);
                served.push(answer.header("x-upstream").unwrap_or("").to_string());
            }
            served
        }));
    }
    let mut slow_answers = 0;
    let mut answers = 0;
    for client in clients {
        let served = tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .expect("400 requests finish")
            .unwrap();
        answers += served.len();
        slow_answers += served.iter().filter(|s| *s == "slow").count();
    }
    assert_eq!(answers, 400);
    assert!(
        slow_answers * 10 < answers,
        "{slow_answers} of {answers} requests went to the slow backend"
    );
    proxy.shutdown().await;
}

/// An upstream that reads requests, never answers, and counts the connections that
/// carried one and were then closed by the proxy: how a test sees that a request was
/// given up upstream. (The implicit TCP health check's connections carry none.)
async fn silent_upstream(requests: Arc<AtomicU64>, closed: Arc<AtomicU64>) -> std::net::SocketAddr {
    raw_upstream(move |mut s| {
        let (requests, closed) = (Arc::clone(&requests), Arc::clone(&closed));
        async move {
            let mut buf = [0u8; 65536];
            let mut head = Vec::new();
            let mut carried_a_request = false;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        head.extend_from_slice(&buf[..n]);
                        if head.windows(4).any(|w| w == b"\r\n\r\n") {
                            head.clear();
                            carried_a_request = true;
                            requests.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
            if carried_a_request {
                closed.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .await
}

/// A client that hangs up while its request waits upstream takes the request with it:
/// the proxy closes the upstream connection (the backend can stop working on it) and
/// the backend's in-flight count, which drains and `wait_drained` trust, goes back to
/// 0 — long before any upstream timeout. Both for a request whose body was all sent
/// and for one cut off in the middle of its body.
#[tokio::test]
async fn a_client_that_hangs_up_mid_request_cancels_it_upstream() {
    let requests = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let upstream = silent_upstream(Arc::clone(&requests), Arc::clone(&closed)).await;
    let proxy = start_proxy(&config_text(
        "upstream_header_timeout = \"5m\"",
        &[("blue", &[upstream])],
        "",
    ))
    .await;
    let in_flight = || async {
        let (_, pool) = admin(proxy.admin_addr, "GET", "/api/v1/pools/blue", None, &[]).await;
        pool["backends"][0]["in_flight"].as_u64().unwrap()
    };
    let cases: [&[u8]; 2] = [
        b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 100000\r\n\r\nthe first bytes",
    ];
    for (case, request) in cases.iter().enumerate() {
        let mut client = tokio::net::TcpStream::connect(proxy.proxy_addr)
            .await
            .unwrap();
        client.write_all(request).await.unwrap();
        let limit = Duration::from_secs(10);
        let past = |count: &AtomicU64| count.load(Ordering::SeqCst) > case as u64;
        eventually(limit, "the request to reach the upstream", || {
            past(&requests)
        })
        .await;
        assert_eq!(in_flight().await, 1, "case {case}");
        drop(client);
        eventually(limit, "the upstream connection to close", || past(&closed)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_flight().await != 0 {
            assert!(
                Instant::now() < deadline,
                "case {case}: still counted in flight"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    proxy.shutdown().await;
}

/// `switchyard_upstream_timeouts_total` of the one backend of pool `blue`, for `timeout`.
async fn upstream_timeouts(proxy: &switchyard::server::Running, timeout: &str) -> u64 {
    let scrape = send(&client(), get(proxy.admin_addr, "/metrics"))
        .await
        .text();
    let prefix = "switchyard_upstream_timeouts_total{backend=";
    let suffix = format!("pool=\"blue\",timeout=\"{timeout}\"}}");
    scrape
        .lines()
        .find(|l| l.starts_with(prefix) && l.split(' ').next().unwrap().ends_with(&suffix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {timeout} counter in the scrape:\n{scrape}"))
}

/// Reads the start of a request from a raw upstream's connection: false when none
/// comes (the TCP health check connects and closes).
async fn a_request_came(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    matches!(s.read(&mut buf).await, Ok(n) if n > 0)
}

/// A proxy in front of `upstream` alone, with `upstream_body_timeout = timeout`.
async fn proxy_with_body_timeout(
    timeout: &str,
    upstream: std::net::SocketAddr,
) -> switchyard::server::Running {
    start_proxy(&config_text(
        &format!("upstream_body_timeout = \"{timeout}\""),
        &[("blue", &[upstream])],
        "",
    ))
    .await
}

/// A backend that sends its response head and a little of the body, then nothing,
/// keeping the connection open, holds no client forever: after `upstream_body_timeout`
/// without a byte the response is cut off (the client sees it end short, never a
/// whole-looking answer), the backend's connection is closed, the request no longer
/// counts in flight, and the timeout is counted.
#[tokio::test]
async fn a_backend_that_stops_in_the_middle_of_its_response_is_cut_off() {
    let requests = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let (requests_seen, closed_seen) = (Arc::clone(&requests), Arc::clone(&closed));
    let upstream = raw_upstream(move |mut s| {
        let (requests, closed) = (Arc::clone(&requests_seen), Arc::clone(&closed_seen));
        async move {
            if !a_request_came(&mut s).await {
                return;
            }
            requests.fetch_add(1, Ordering::SeqCst);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nthe first ")
                .await;
            // Nothing more: wait for the proxy to give up and close.
            while a_request_came(&mut s).await {}
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let proxy = proxy_with_body_timeout("300ms", upstream).await;
    let response = client()
        .request(get(proxy.proxy_addr, "/"))
        .await
        .expect("the head arrives");
    assert_eq!(response.status(), StatusCode::OK);
    let started = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(20), response.into_body().collect())
        .await
        .expect("the body ends, one way or the other");
    assert!(body.is_err(), "a cut-off body must not look whole");
    // Not a timing assertion on the machine's speed: it must not give up early.
    assert!(started.elapsed() >= Duration::from_millis(250));
    eventually(
        Duration::from_secs(10),
        "the upstream connection to close",
        || closed.load(Ordering::SeqCst) == 1,
    )
    .await;
    assert_eq!(requests.load(Ordering::SeqCst), 1, "never retried");
    assert_eq!(upstream_timeouts(&proxy, "upstream_body_timeout").await, 1);
    assert_eq!(
        upstream_timeouts(&proxy, "upstream_header_timeout").await,
        0
    );
    let (_, pool) = admin(proxy.admin_addr, "GET", "/api/v1/pools/blue", None, &[]).await;
    assert_eq!(pool["backends"][0]["in_flight"], 0, "{pool}");
    proxy.shutdown().await;
}

/// A backend that reads a request's head but none of its body gets no more than
/// `upstream_body_timeout` of the client's time: the client gets 504 rather than a
/// request stuck for good behind a full socket.
#[tokio::test]
async fn a_backend_that_takes_none_of_a_request_body_gives_504() {
    let upstream = raw_upstream(|mut s| async move {
        if !a_request_came(&mut s).await {
            return;
        }
        // Reads nothing more; the socket stays open.
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(s);
    })
    .await;
    let proxy = proxy_with_body_timeout("300ms", upstream).await;
    // More than the sockets on the way can hold.
    let body = vec![b'x'; 64 << 20];
    let request = Request::post(format!("http://{}/upload", proxy.proxy_addr))
        .body(full(body))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), send(&client(), request))
        .await
        .expect("an answer, not a request stuck for good");
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.text()
    );
    assert_eq!(
        answer.header("x-switchyard-error"),
        Some("upstream-timeout")
    );
    assert_eq!(upstream_timeouts(&proxy, "upstream_body_timeout").await, 1);
    proxy.shutdown().await;
}

/// The clock blames only the backend: a client that reads a large answer slowly,
/// pausing longer than `upstream_body_timeout` between reads while the backend has
/// plenty ready, gets all of it.
#[tokio::test]
async fn a_slow_reading_client_is_not_taken_for_a_stalled_backend() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text(
        "upstream_body_timeout = \"200ms\"",
        &[("blue", &[upstream.addr])],
        "",
    ))
    .await;
    let size = 8 << 20;
    let mut stream = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET /download/{size} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let n = stream.read(&mut buf).await.unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut got))
        .await
        .expect("the answer ends")
        .unwrap();
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
    let body_len = got.len() - head_end;
    if head.contains("transfer-encoding: chunked") {
        assert!(got.ends_with(b"0\r\n\r\n"), "the chunked body ended short");
        assert!(body_len > size, "{body_len}");
    } else {
        assert_eq!(body_len, size);
    }
    assert_eq!(upstream_timeouts(&proxy, "upstream_body_timeout").await, 0);
    proxy.shutdown().await;
}

/// The limit is on each wait, not on the whole body: a backend that streams slowly but
/// steadily, each piece well within `upstream_body_timeout`, is passed on whole however
/// long it takes in all.
#[tokio::test]
async fn a_slow_but_steady_backend_is_streamed_whole() {
    let upstream = raw_upstream(|mut s| async move {
        if !a_request_came(&mut s).await {
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = s.write_all(b"5\r\npiece\r\n").await;
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
        while a_request_came(&mut s).await {}
    })
    .await;
    let proxy = proxy_with_body_timeout("400ms", upstream).await;
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "piece".repeat(8));
    assert_eq!(upstream_timeouts(&proxy, "upstream_body_timeout").await, 0);
    proxy.shutdown().await;
}

/// A backend that answers early and then reads a slow upload (a full-duplex app)
/// waits on the client, not the other way round: its response is not cut off while
/// the request body still comes, however long that takes in all.
#[tokio::test]
async fn a_backend_that_answers_before_a_slow_upload_ends_is_not_cut_off() {
    let upstream = raw_upstream(|mut s| async move {
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        let head_end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut body = seen.len() - head_end;
        while body < 20 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => body += n,
            }
        }
        let _ = s.write_all(b"2\r\nok\r\n0\r\n\r\n").await;
        while a_request_came(&mut s).await {}
    })
    .await;
    let proxy = proxy_with_body_timeout("300ms", upstream).await;
    let slow_body = futures_util::stream::unfold(0, |i| async move {
        if i == 4 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        Some((
            Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from_static(b"chunk"))),
            i + 1,
        ))
    });
    let request = Request::post(format!("http://{}/upload", proxy.proxy_addr))
        .header("content-length", "20")
        .body(BodyExt::boxed(http_body_util::StreamBody::new(slow_body)))
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "ok");
    assert_eq!(upstream_timeouts(&proxy, "upstream_body_timeout").await, 0);
    proxy.shutdown().await;
}
