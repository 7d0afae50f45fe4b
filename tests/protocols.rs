//! HTTP/2 on both sides and TLS to upstreams: h2c and h2 pools, h2c on the plain port,
//! gRPC (unary, server streaming, status trailers) to a tonic server, upstream TLS with
//! a private CA and client certificates, and the rapid-reset defence.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::tls::{tls_table, Issued, TestCa, TlsClient, TlsUpstream, UpstreamTlsFiles};
use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A config with one pool `rpc` (with `pool_keys`) as service `app`'s active pool.
fn single_pool(proxy_keys: &str, backends: &[SocketAddr], pool_keys: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    config_text(
        proxy_keys,
        &[],
        &format!(
            "[pools.rpc]\nbackends = [{}]\n{pool_keys}\n\n[services.app]\nactive = \"rpc\"\n",
            list.join(", ")
        ),
    )
}

/// An HTTP/2 prior-knowledge (h2c) client connection.
async fn h2c_connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<TestBody>, hyper::Error> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A proxy that serves h2c on its plain port, in front of one HTTP/1.1 backend.
async fn h2c_proxy(upstream: &Upstream) -> switchyard::server::Running {
    start_proxy(&config_text(
        "h2c = true",
        &[("blue", &[upstream.addr])],
        "",
    ))
    .await
}

/// Sends `request` over h2c to `proxy`; what the echoing backend saw. The answer
/// must come back 200 over HTTP/2.
async fn echoed_over_h2c(proxy: SocketAddr, request: http::Request<TestBody>) -> serde_json::Value {
    let mut sender = h2c_connect(proxy).await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn an_h2c_pool_gets_http2_over_one_shared_connection() {
    let upstream = Upstream::start("rpc-1").await;
    let config = single_pool(
        "",
        &[upstream.addr],
        "protocol = \"h2c\"\n[pools.rpc.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"80ms\"",
    );
    let proxy = start_proxy(&config).await;
    wait_ready(proxy.admin_addr).await;
    assert!(
        upstream.health.checks() > 0,
        "the health check did not reach the upstream"
    );

    let client = client();
    let request = http::Request::get(format!("http://{}/echo?x=1", proxy.proxy_addr))
        .header("host", "app.test")
        .body(empty())
        .unwrap();
    let echo = send(&client, request).await.json();
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["uri"], "http://app.test/echo?x=1");
    assert_eq!(echo["headers"]["x-forwarded-host"][0], "app.test");

    // Sixteen requests at once share the one upstream connection.
    let calls = (0..16).map(|_| {
        let client = client.clone();
        let addr = proxy.proxy_addr;
        async move { send(&client, get(addr, "/slow/100")).await.status }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // The health check speaks HTTP/2 too, and a failing one takes the backend out.
    upstream.health.set(500);
    let admin = proxy.admin_addr;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, state) = common::admin(admin, "GET", "/api/v1/pools/rpc", None, &[]).await;
        if state["backends"][0]["health"] == "unhealthy" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Browsers speaking HTTP/2 send each cookie as a field of its own; an HTTP/1.1
/// backend gets them as the one `Cookie` line HTTP/1.1 allows, in order.
#[tokio::test]
async fn cookies_split_over_http2_fields_reach_an_http1_backend_in_one_line() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = h2c_proxy(&upstream).await;
    let request = http::Request::get("http://app.test/echo")
        .header("cookie", "session=abc")
        .header("x-between", "1")
        .header("cookie", "theme=dark")
        .header("cookie", "lang=en")
        .body(empty())
        .unwrap();
    let echo = echoed_over_h2c(proxy.proxy_addr, request).await;
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(
        echo["headers"]["cookie"],
        serde_json::json!(["session=abc; theme=dark; lang=en"])
    );
    assert_eq!(echo["headers"]["x-between"][0], "1");
}

#[tokio::test]
async fn h2c_on_the_plain_port_is_served_only_when_enabled() {
    let upstream = Upstream::start("blue-1").await;
    let on = h2c_proxy(&upstream).await;
    let request = http::Request::get("http://app.test/echo")
        .body(empty())
        .unwrap();
    let echo = echoed_over_h2c(on.proxy_addr, request).await;
    // The upstream (HTTP/1.1 pool) gets the host as a Host header.
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["headers"]["host"][0], "app.test");

    let off = start_proxy(&config_text("", &[("blue", &[upstream.addr])], "")).await;
    let refused = match h2c_connect(off.proxy_addr).await {
        Err(_) => true,
        Ok(mut sender) => sender
            .send_request(
                http::Request::get("http://app.test/")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .is_err(),
    };
    assert!(refused, "h2c was served with h2c = false");
}

async fn grpc_server() -> (SocketAddr, tonic_health::server::HealthReporter) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming =
        tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    (addr, reporter)
}

/// Unary calls (a success and a status error, which only exists as trailers) and a
/// server-streaming call that delivers a message pushed after it started.
async fn exercise_grpc(
    mut client: HealthClient<tonic::transport::Channel>,
    reporter: &mut tonic_health::server::HealthReporter,
) {
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::Serving)
        .await;
    let reply = client
        .check(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.get_ref().status, ServingStatus::Serving as i32);

    let status = client
        .check(HealthCheckRequest {
            service: "no-such-service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    let mut stream = client
        .watch(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the streamed update did not arrive")
        .unwrap()
        .unwrap();
    assert_eq!(second.status, ServingStatus::NotServing as i32);
}

#[tokio::test]
async fn grpc_over_h2c_reaches_a_tonic_server_with_trailers() {
    let (backend, mut reporter) = grpc_server().await;
    let proxy = start_proxy(&single_pool("h2c = true", &[backend], "protocol = \"h2c\"")).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.proxy_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    exercise_grpc(HealthClient::new(channel), &mut reporter).await;
}

#[tokio::test]
async fn grpc_over_tls_with_alpn_h2_reaches_a_tonic_server() {
    let (backend, mut reporter) = grpc_server().await;
    let ca = TestCa::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let pair = ca.issue(&["grpc.test"]).write(dir.path(), "grpc");
    let proxy = start_proxy(&single_pool(
        &tls_table(&[pair], ""),
        &[backend],
        "protocol = \"h2c\"",
    ))
    .await;
    let tls_addr = proxy.tls_addr.unwrap();
    let tls = std::sync::Arc::new(TlsClient::new(&ca, &["h2"]));
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = std::sync::Arc::clone(&tls);
        async move {
            let stream = tls.connect(tls_addr, "grpc.test").await?;
            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://grpc.test")
        .connect_with_connector(connector)
        .await
        .unwrap();
    exercise_grpc(HealthClient::new(channel), &mut reporter).await;
}

/// A TLS upstream with a certificate for `backend.test` from `ca`.
async fn tls_backend(ca: &TestCa, client_ca: Option<&TestCa>) -> TlsUpstream {
    let cert: Issued = ca.issue(&["backend.test"]);
    TlsUpstream::start(&cert, client_ca).await
}

async fn status_and_text(
    proxy: &switchyard::server::Running,
) -> (StatusCode, String, Option<String>) {
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    let code = answer.header("x-switchyard-error").map(String::from);
    (answer.status, answer.text(), code)
}

#[tokio::test]
async fn tls_upstreams_are_verified_against_the_pool_ca() {
    let ca = TestCa::new("private CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path());
    let backend = tls_backend(&ca, None).await;
    let tls_keys = |extra: &str| {
        format!(
            "tls = true\nca_file = \"{}\"\nserver_name = \"backend.test\"\n{extra}",
            ca_file.display()
        )
    };

    let https = start_proxy(&single_pool("", &[backend.addr], &tls_keys(""))).await;
    let (status, text, _) = status_and_text(&https).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, "tls-upstream HTTP/1.1 client-cert=no")
    );

    let h2 = start_proxy(&single_pool(
        "",
        &[backend.addr],
        &format!(
            "protocol = \"h2\"\nca_file = \"{}\"\nserver_name = \"backend.test\"",
            ca_file.display()
        ),
    ))
    .await;
    let (status, text, _) = status_and_text(&h2).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, "tls-upstream HTTP/2.0 client-cert=no")
    );

    // A certificate from another CA, or for another name, is refused: the client gets
    // the connect-failure answer, never the unverified backend's.
    let other_ca = TestCa::new("someone else");
    let other_dir = tempfile::tempdir().unwrap();
    let other_file = other_ca.write(other_dir.path());
    let wrong_ca = start_proxy(&single_pool(
        "",
        &[backend.addr],
        &format!(
            "tls = true\nca_file = \"{}\"\nserver_name = \"backend.test\"",
            other_file.display()
        ),
    ))
    .await;
    let wrong_name = start_proxy(&single_pool(
        "",
        &[backend.addr],
        &format!(
            "tls = true\nca_file = \"{}\"\nserver_name = \"elsewhere.test\"",
            ca_file.display()
        ),
    ))
    .await;
    for proxy in [&wrong_ca, &wrong_name] {
        let (status, text, code) = status_and_text(proxy).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
        assert_eq!(code.as_deref(), Some("upstream-connect-failed"));
        assert!(!text.contains("tls-upstream"));
    }

    // insecure_skip_verify takes the unverifiable backend.
    let insecure = start_proxy(&single_pool(
        "",
        &[backend.addr],
        "tls = true\ninsecure_skip_verify = true",
    ))
    .await;
    assert_eq!(status_and_text(&insecure).await.0, StatusCode::OK);
}

#[tokio::test]
async fn client_certificates_are_presented_to_upstreams_that_require_them() {
    let files = UpstreamTlsFiles::new();
    let backend = tls_backend(&files.ca, Some(&files.client_ca)).await;
    let base = files.pool_keys();

    let with_cert = start_proxy(&single_pool(
        "",
        &[backend.addr],
        &files.pool_keys_with_client_cert(),
    ))
    .await;
    let (status, text, _) = status_and_text(&with_cert).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, "tls-upstream HTTP/1.1 client-cert=yes")
    );

    let without = start_proxy(&single_pool("", &[backend.addr], &base)).await;
    let (status, _, _) = status_and_text(&without).await;
    assert_ne!(status, StatusCode::OK);
}

#[test]
fn upstream_tls_settings_are_checked_when_the_config_is_loaded() {
    let backend: SocketAddr = "127.0.0.1:1".parse().unwrap();
    for (keys, key) in [
        ("ca_file = \"/ca.pem\"", "pools.rpc.ca_file"),
        (
            "tls = true\nca_file = \"/nonexistent/ca.pem\"",
            "pools.rpc.ca_file",
        ),
        ("protocol = \"h2\"\ntls = false", "pools.rpc.tls"),
        ("protocol = \"h2c\"\ntls = true", "pools.rpc.tls"),
        (
            "tls = true\ninsecure_skip_verify = true\nclient_cert_file = \"/c.pem\"",
            "pools.rpc.client_cert_file",
        ),
        (
            "tls = true\ninsecure_skip_verify = true\nserver_name = \"not a name!\"",
            "pools.rpc.server_name",
        ),
        ("protocol = \"h3\"", "pools.rpc"),
    ] {
        let text = single_pool("", &[backend], keys);
        let error = check(&text).unwrap_err();
        assert!(error.key.starts_with(key), "{keys}: {error}");
    }
}

/// Opens streams on one HTTP/2 connection and cancels each at once (with `paced_by`:
/// once that upstream has the request, so the proxy has taken the stream on; a fixed
/// pause was not enough on a loaded machine). Returns how many were opened before the
/// proxy closed the connection, or `None` if it never did.
async fn reset_flood(addr: SocketAddr, paced_by: Option<&Upstream>) -> Option<usize> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut attacker, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut opened = 0;
    for _ in 0..20_000 {
        attacker = match attacker.ready().await {
            Ok(ready) => ready,
            Err(_) => break,
        };
        let request = http::Request::get("http://app.test/slow/30000")
            .body(())
            .unwrap();
        let hits_before = paced_by.map(Upstream::hits);
        let Ok((response, mut stream)) = attacker.send_request(request, true) else {
            break;
        };
        opened += 1;
        if let (Some(upstream), Some(before)) = (paced_by, hits_before) {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            // A stream that never arrives means the connection is gone: the next
            // `ready` says so.
            while upstream.hits() == before && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        stream.send_reset(h2::Reason::CANCEL);
        drop(response);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
    (opened < 20_000).then_some(opened)
}

async fn wait_nothing_in_flight(admin: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, pool) = common::admin(admin, "GET", "/api/v1/pools/blue", None, &[]).await;
        if pool["backends"][0]["in_flight"] == 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{pool}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_closes_the_connection_and_leaks_nothing() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text(
        "h2c = true",
        &[("blue", &[upstream.addr])],
        "",
    ))
    .await;
    wait_ready(proxy.admin_addr).await;
    let flood_metric = "switchyard_http2_reset_flood_connections_closed_total";

    // Back to back, most streams are reset before the proxy has taken them: h2's own
    // limit on such streams closes the connection.
    let opened = reset_flood(proxy.proxy_addr, None).await;
    assert!(
        opened.is_some(),
        "20000 cancelled streams and the connection is still open"
    );
    eprintln!("back to back: closed after {opened:?} streams");
    wait_nothing_in_flight(proxy.admin_addr).await;

    // Each stream reaches the upstream before it is cancelled: the proxy's own rule
    // (most streams cancelled, at least 200) closes the connection.
    let opened = reset_flood(proxy.proxy_addr, Some(&upstream)).await;
    eprintln!("paced: closed after {opened:?} streams");
    let opened = opened.expect("the paced flood was never cut off");
    assert!((200..=450).contains(&opened), "{opened}");
    wait_nothing_in_flight(proxy.admin_addr).await;
    let scrape = send(&client(), get(proxy.admin_addr, "/metrics"))
        .await
        .text();
    assert!(scrape.contains(&format!("{flood_metric} 1")), "{scrape}");

    // Everyone else is still served.
    assert_eq!(
        send(&client(), get(proxy.proxy_addr, "/")).await.text(),
        "blue-1"
    );
}

/// A stream that is read and written at the same time (gRPC bidirectional streaming):
/// each message sent must come back before the next is sent, so nothing may wait for
/// the request body to end.
#[tokio::test]
async fn a_bidirectional_stream_flows_both_ways_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let echo = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(req.into_body()))
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), echo)
                    .await;
            });
        }
    });
    let proxy = start_proxy(&single_pool("h2c = true", &[backend], "protocol = \"h2c\"")).await;

    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok(http_body::Frame::data(data)), rx))
    });
    let body = BodyExt::boxed(http_body_util::StreamBody::new(frames));
    let mut sender = h2c_connect(proxy.proxy_addr).await.unwrap();
    let request = http::Request::post("http://app.test/chat")
        .body(body)
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut replies = response.into_body();
    for i in 0..3 {
        let message = bytes::Bytes::from(format!("message {i}"));
        tx.send(message.clone()).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(10), replies.frame())
            .await
            .expect("the echo did not come back while the request was still open")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), message);
    }
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(10), replies.collect())
        .await
        .unwrap()
        .unwrap();
    assert!(rest.to_bytes().is_empty());
}

#[tokio::test]
async fn idle_http2_connections_are_closed_and_busy_ones_are_not() {
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text(
        "h2c = true\nhttp2_idle_timeout = \"300ms\"",
        &[("blue", &[upstream.addr])],
        "",
    ))
    .await;
    let mut sender = h2c_connect(proxy.proxy_addr).await.unwrap();
    // A stream that lasts longer than the idle timeout keeps the connection.
    let slow = http::Request::get("http://app.test/slow/900")
        .body(empty())
        .unwrap();
    let response = sender.send_request(slow).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "blue-1");
    // Then, with nothing in progress, the proxy closes it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sender.is_closed() {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An HTTP/1.1 keep-alive connection on the same port is left to its own timer.
    let tcp = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let first = h1.send_request(get(proxy.proxy_addr, "/")).await.unwrap();
    first.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(!h1.is_closed());
    h1.ready().await.unwrap();
    let again = h1.send_request(get(proxy.proxy_addr, "/")).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
}
