//! What a client sees through the proxy: transparency, bodies both ways, header hygiene,
//! upgrades. Real upstream servers, a real proxy, a real hyper client, all on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

async fn one_backend() -> (Upstream, switchyard::server::Running) {
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text("", &[("blue", &[upstream.addr])], "")).await;
    (upstream, proxy)
}

/// Headers that legitimately differ between a direct and a proxied answer.
fn comparable(headers: &http::HeaderMap) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "date" | "connection" | "keep-alive" | "transfer-encoding"
            )
        })
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn the_same_request_gives_the_same_answer_direct_and_through_the_proxy() {
    let (upstream, proxy) = one_backend().await;
    let client = client();
    for path in [
        "/",
        "/status/201",
        "/status/404",
        "/status/503",
        "/chunked",
        "/download/100000",
    ] {
        let direct = send(&client, get(upstream.addr, path)).await;
        let proxied = send(&client, get(proxy.proxy_addr, path)).await;
        assert_eq!(direct.status, proxied.status, "{path}");
        assert_eq!(
            comparable(&direct.headers),
            comparable(&proxied.headers),
            "{path}"
        );
        assert_eq!(direct.body, proxied.body, "{path}");
    }
    // Multi-valued response headers arrive intact and in order.
    let proxied = send(&client, get(proxy.proxy_addr, "/echo")).await;
    let cookies: Vec<_> = proxied.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn path_and_query_reach_the_upstream_byte_for_byte() {
    let (_upstream, proxy) = one_backend().await;
    let client = client();
    let path = "/echo/a%2Fb/%7Euser/..%2F?q=a+b&q=%20c&empty=&x=%E2%9C%93#";
    let answer = send(&client, get(proxy.proxy_addr, path.trim_end_matches('#'))).await;
    assert_eq!(answer.json()["uri"], path.trim_end_matches('#'));
    proxy.shutdown().await;
}

#[tokio::test]
async fn host_is_preserved_and_forwarded_headers_are_set() {
    let (_upstream, proxy) = one_backend().await;
    let client = client();
    let request = Request::get(format!("http://{}/echo", proxy.proxy_addr))
        .header("host", "shop.example.com")
        .header("x-forwarded-for", "203.0.113.9, 198.51.100.2")
        .header("via", "1.1 cdn")
        .body(empty())
        .unwrap();
    let answer = send(&client, request).await;
    let headers = &answer.json()["headers"];
    assert_eq!(headers["host"][0], "shop.example.com");
    assert_eq!(
        headers["x-forwarded-for"][0],
        "203.0.113.9, 198.51.100.2, 127.0.0.1"
    );
    assert_eq!(headers["x-forwarded-proto"][0], "http");
    assert_eq!(headers["x-forwarded-host"][0], "shop.example.com");
    assert_eq!(headers["via"][0], "1.1 cdn, 1.1 switchyard");
    proxy.shutdown().await;
}

/// A backend that builds links from `X-Forwarded-Host` must only ever see a host the
/// client asked this proxy for: the client's own value never gets through, not even on
/// an HTTP/1.0 request that names no host at all.
#[tokio::test]
async fn a_clients_own_x_forwarded_host_never_reaches_the_backend() {
    let (_upstream, proxy) = one_backend().await;
    for (request, expected) in [
        (
            "GET /echo HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n",
            None,
        ),
        (
            "GET /echo HTTP/1.1\r\nHost: shop.example.com\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n",
            Some("shop.example.com"),
        ),
    ] {
        let raw = raw_exchange(proxy.proxy_addr, request.as_bytes(), Duration::from_secs(10)).await;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(" 200 "), "{head}");
        let echo: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
        let seen: Vec<&str> = echo["headers"]["x-forwarded-host"]
            .as_array()
            .map(|values| values.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(seen, expected.into_iter().collect::<Vec<_>>(), "{request}");
        assert_eq!(echo["headers"]["x-forwarded-proto"][0], "http", "{request}");
    }
    proxy.shutdown().await;
}

/// The map a request's fields came in is reused for its response's fields: none of the
/// request's may show up in the answer, on the first request of a connection or later.
#[tokio::test]
async fn a_response_carries_only_the_fields_its_backend_sent() {
    let (_upstream, proxy) = one_backend().await;
    let client = client();
    for round in 0..3 {
        let request = Request::get(format!("http://{}/echo", proxy.proxy_addr))
            .header("x-secret", "from-the-client")
            .header("cookie", "session=1")
            .body(empty())
            .unwrap();
        let answer = send(&client, request).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["headers"]["x-secret"][0], "from-the-client");
        assert_eq!(answer.header("x-secret"), None, "round {round}");
        assert_eq!(answer.header("cookie"), None, "round {round}");
        assert_eq!(answer.header("x-upstream"), Some("blue-1"), "round {round}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_in_both_directions() {
    let (upstream, proxy) = one_backend().await;
    // Raw request so the client library cannot tidy the headers up first.
    let request = format!(
        "GET /echo HTTP/1.1\r\nHost: {}\r\nConnection: close, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9v\r\nTE: trailers\r\nX-End-To-End: yes\r\n\r\n",
        upstream.addr
    );
    let raw = raw_exchange(
        proxy.proxy_addr,
        request.as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let echo: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    let seen = echo["headers"].as_object().unwrap();
    for gone in ["x-private", "keep-alive", "proxy-authorization"] {
        assert!(
            !seen.contains_key(gone),
            "{gone} reached the upstream: {seen:?}"
        );
    }
    assert_eq!(seen["x-end-to-end"][0], "yes");
    assert_eq!(seen["te"][0], "trailers");
    // The upstream connection is the proxy's own: keep-alive, whatever the client said.
    assert!(!seen.contains_key("connection") || seen["connection"][0] != "close");
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_from_the_upstream_do_not_reach_the_client() {
    // An upstream that sends hop-by-hop headers of its own.
    let addr = raw_upstream(|mut s| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=99\r\nX-Public: 1\r\n\r\nok")
            .await;
    })
    .await;
    let proxy = start_proxy(&config_text("", &[("blue", &[addr])], "")).await;
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-public"), Some("1"));
    assert_eq!(answer.header("x-internal"), None);
    assert_eq!(answer.header("keep-alive"), None);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_8_mb_upload_arrives_intact() {
    let (_upstream, proxy) = one_backend().await;
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let expected = format!("{} {}", hex(&Sha256::digest(&data)), data.len());
    let request = Request::post(format!("http://{}/upload", proxy.proxy_addr))
        .body(full(data))
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), expected);
    proxy.shutdown().await;
}

#[tokio::test]
async fn chunked_request_and_response_bodies_stream_through() {
    let (_upstream, proxy) = one_backend().await;
    let parts = futures_util::stream::iter((0..50).map(|i| {
        Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from(format!(
            "part-{i};"
        ))))
    }));
    let sent: String = (0..50).map(|i| format!("part-{i};")).collect();
    let request = Request::post(format!("http://{}/upload", proxy.proxy_addr))
        .body(BodyExt::boxed(http_body_util::StreamBody::new(parts)))
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(
        answer.text(),
        format!("{} {}", hex(&Sha256::digest(sent.as_bytes())), sent.len())
    );

    let response = client()
        .request(get(proxy.proxy_addr, "/chunked"))
        .await
        .unwrap();
    assert!(response.headers().get("content-length").is_none());
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"one,two,three");
    proxy.shutdown().await;
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body_and_keep_the_connection_usable() {
    let (upstream, proxy) = one_backend().await;
    let client = client();
    for _ in 0..3 {
        let head = Request::head(format!("http://{}/download/5000", proxy.proxy_addr))
            .body(empty())
            .unwrap();
        let answer = send(&client, head).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("content-length"), Some("5000"));
        assert!(answer.body.is_empty());
        for code in [204, 304] {
            let answer = send(&client, get(proxy.proxy_addr, &format!("/status/{code}"))).await;
            assert_eq!(answer.status.as_u16(), code);
            assert!(answer.body.is_empty());
        }
    }
    // Nine exchanges, each bodiless one returned its connection to the pool.
    assert!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 2
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let (upstream, proxy) = one_backend().await;
    let client = client();
    for _ in 0..50 {
        assert_eq!(
            send(&client, get(proxy.proxy_addr, "/")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(upstream.hits(), 50);
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_websocket_echoes_through_the_proxy_and_counts_as_in_flight() {
    let (_upstream, proxy) = one_backend().await;
    let stream = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .unwrap();
    let url = format!("ws://{}/ws", proxy.proxy_addr);
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let backend = proxy.shared.table().load().pools[0].backends[0].clone();
    assert_eq!(backend.in_flight(), 1, "an open tunnel counts as in flight");
    for i in 0..20 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.close(None).await.unwrap();
    drop(ws);
    eventually(Duration::from_secs(5), "tunnel closed", || {
        backend.in_flight() == 0
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_request_that_matches_no_service_gets_404() {
    let upstream = Upstream::start("shop").await;
    let config = config_text(
        "",
        &[("shop", &[upstream.addr])],
        "[services.app]\nhosts = [\"shop.example.com\"]\nactive = \"shop\"\n",
    );
    let proxy = start_proxy(&config).await;
    let request = Request::get(format!("http://{}/", proxy.proxy_addr))
        .header("host", "other.example.com")
        .body(empty())
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.header("x-switchyard-error"), Some("no-route"));
    assert_eq!(upstream.hits(), 0);
    let request = Request::get(format!("http://{}/", proxy.proxy_addr))
        .header("host", "shop.example.com:8080")
        .body(empty())
        .unwrap();
    assert_eq!(send(&client(), request).await.status, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn services_route_by_host_and_longest_prefix() {
    let web = Upstream::start("web").await;
    let api = Upstream::start("api").await;
    let config = config_text(
        "",
        &[("web", &[web.addr]), ("api", &[api.addr])],
        "[services.app]\nactive = \"web\"\n[services.api]\npath_prefix = \"/api/\"\nactive = \"api\"\n",
    );
    let proxy = start_proxy(&config).await;
    let client = client();
    assert_eq!(
        send(&client, get(proxy.proxy_addr, "/api/users"))
            .await
            .text(),
        "api"
    );
    assert_eq!(
        send(&client, get(proxy.proxy_addr, "/apix")).await.text(),
        "web"
    );
    assert_eq!(
        send(&client, get(proxy.proxy_addr, "/")).await.text(),
        "web"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn options_and_delete_methods_pass_through() {
    let (_upstream, proxy) = one_backend().await;
    for method in [Method::OPTIONS, Method::DELETE, Method::PATCH, Method::PUT] {
        let request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}/echo", proxy.proxy_addr))
            .body(empty())
            .unwrap();
        let answer = send(&client(), request).await;
        assert_eq!(answer.json()["method"], method.as_str());
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_h2c_upgrade_offer_is_dropped_not_tunnelled() {
    let (_upstream, proxy) = one_backend().await;
    let request = Request::get(format!("http://{}/echo", proxy.proxy_addr))
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .body(empty())
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let echo = answer.json();
    assert_eq!(echo["version"], "HTTP/1.1");
    for name in ["upgrade", "http2-settings"] {
        assert!(
            echo["headers"].get(name).is_none(),
            "{name} reached the upstream: {echo}"
        );
    }
}

/// Reads from `stream` until `count` complete answers (heads and `content-length`
/// bodies) have arrived; returns their status lines.
async fn read_answers(stream: &mut tokio::net::TcpStream, count: usize) -> Vec<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut statuses = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while statuses.len() < count {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                statuses.push(head.lines().next().unwrap_or("").to_string());
                buf.drain(..end + 4 + length);
                continue;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("answers within 10 s")
            .unwrap();
        assert!(n > 0, "closed after {} answers", statuses.len());
        buf.extend_from_slice(&chunk[..n]);
    }
    statuses
}

// An idle keep-alive connection gives its hyper connection (and buffers) up between
// requests; the next request on it, whole, split across writes or pipelined, is served
// as before.
#[tokio::test]
async fn a_keep_alive_connection_is_served_again_after_it_idled() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text("", &[("blue", &[upstream.addr])], "")).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .unwrap();
    let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
    stream.write_all(get).await.unwrap();
    assert_eq!(read_answers(&mut stream, 1).await, ["HTTP/1.1 200 OK"]);
    // Idle between requests, past the 200 ms after which hyper is given up (the gap is
    // the case under test, not a wait for a state).
    tokio::time::sleep(Duration::from_millis(400)).await;
    stream.write_all(get).await.unwrap();
    assert_eq!(read_answers(&mut stream, 1).await, ["HTTP/1.1 200 OK"]);
    // A head split across writes, idle in the middle of it.
    stream.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    stream.write_all(b"st: a\r\n\r\n").await.unwrap();
    assert_eq!(read_answers(&mut stream, 1).await, ["HTTP/1.1 200 OK"]);
    // Three pipelined requests in one write, the last one cut short and finished later.
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTT")
        .await
        .unwrap();
    assert_eq!(read_answers(&mut stream, 2).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    stream.write_all(b"P/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    assert_eq!(read_answers(&mut stream, 1).await, ["HTTP/1.1 200 OK"]);
    assert_eq!(upstream.hits(), 6);
    proxy.shutdown().await;
}
