//! The proxy's own HTTP/1.1 client, seen from a client of the proxy: backends that
//! answer with what hyper refuses get a 502 (or a cut-off body) and the proxy keeps
//! serving; a keep-alive connection the backend closed while it was idle costs the
//! client nothing; informational answers, early answers and bytes right behind a 101
//! reach the client as they should. The backends are scripted TCP servers on
//! 127.0.0.1 that write exact bytes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one request head (up to the empty line) and returns it, or `None` at EOF.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A backend on 127.0.0.1 that hands each connection that brings a request, with the
/// request's head, to `serve` (the health checker's connections bring none).
async fn backend<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream, String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let serve = Arc::new(serve);
    raw_upstream(move |mut stream| {
        let serve = Arc::clone(&serve);
        async move {
            if let Some(head) = read_head(&mut stream).await {
                serve(stream, head).await;
            }
        }
    })
    .await
}

/// A backend that answers every request head with `answer` and then closes.
async fn scripted(answer: &'static [u8]) -> SocketAddr {
    backend(move |mut stream, _| async move {
        let _ = stream.write_all(answer).await;
    })
    .await
}

async fn proxy_to(backend: SocketAddr) -> switchyard::server::Running {
    start_proxy(&config_text("", &[("blue", &[backend])], "")).await
}

#[tokio::test]
async fn responses_hyper_refuses_get_a_502_and_the_proxy_keeps_serving() {
    let long_field: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nX-Long: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(70_000)
        )
        .into_boxed_str(),
    );
    let many_fields: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\n{}Content-Length: 0\r\n\r\n",
            (0..120)
                .map(|i| format!("X-{i}: v\r\n"))
                .collect::<String>()
        )
        .into_boxed_str(),
    );
    let cases: [(&str, &'static [u8]); 9] = [
        (
            "both Content-Length and Transfer-Encoding",
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsmug\r\n0\r\n\r\n",
        ),
        ("two different lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nhello"),
        ("a length that is no number", b"HTTP/1.1 200 OK\r\nContent-Length: +4\r\n\r\nabcd"),
        ("bare LF line ends", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"),
        ("an obsolete folded field", b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 0\r\n\r\n"),
        ("a head over 64 KiB", long_field.as_bytes()),
        ("over 100 fields", many_fields.as_bytes()),
        ("Transfer-Encoding in HTTP/1.0", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("not HTTP at all", b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
    ];
    let good = Upstream::start("good").await;
    for (what, answer) in cases {
        let backend = scripted(answer).await;
        let proxy = start_proxy(&config_text(
            "",
            &[("blue", &[backend]), ("good", &[good.addr])],
            "[services.good]\npath_prefix = \"/good\"\nactive = \"good\"\n",
        ))
        .await;
        let client = client();
        let answer = send(&client, get(proxy.proxy_addr, "/")).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{what}");
        assert_eq!(
            answer.header("x-switchyard-error"),
            Some("upstream-error"),
            "{what}"
        );
        let after = send(&client, get(proxy.proxy_addr, "/good")).await;
        assert_eq!(after.status, StatusCode::OK, "after {what}");
        drop(client);
        proxy.shutdown().await;
    }
}

/// The body breaks off: the client must not take what it got for the whole body.
#[tokio::test]
async fn a_bad_chunk_or_a_short_body_cuts_the_response_off() {
    let cases: [(&str, &'static [u8]); 5] = [
        ("a chunk size that is not hex", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nmore\r\n0\r\n\r\n"),
        ("a chunk size over 15 digits", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n10000000000000000\r\n"),
        ("chunk data without its CRLF", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n"),
        ("a bare LF after a chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n"),
        ("fewer bytes than Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
    ];
    for (what, answer) in cases {
        let backend = scripted(answer).await;
        let proxy = proxy_to(backend).await;
        let client = client();
        // The head goes out with the first piece of body, so a body that breaks at once
        // breaks the response before its head.
        let Ok(response) = client.request(get(proxy.proxy_addr, "/")).await else {
            proxy.shutdown().await;
            continue;
        };
        assert_eq!(response.status(), StatusCode::OK, "{what}");
        let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
            .await
            .expect("the body neither ended nor broke");
        assert!(
            body.is_err(),
            "{what}: the client got a complete body: {:?}",
            body.map(|b| b.to_bytes())
        );
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn chunked_bodies_with_extensions_and_trailers_and_close_delimited_bodies_pass_whole() {
    let cases: [(&'static [u8], &str); 3] = [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n",
            "hello world",
        ),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", "until the end"),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
            "final",
        ),
    ];
    for (answer, expected) in cases {
        let backend = scripted(answer).await;
        let proxy = proxy_to(backend).await;
        let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), expected);
        proxy.shutdown().await;
    }
}

/// A backend that keeps connections alive but, on each connection, closes without an
/// answer when the second request comes: what a backend's keep-alive timeout does when
/// it fires just as the proxy reuses the connection.
#[tokio::test]
async fn a_kept_connection_the_backend_closed_costs_a_get_nothing_and_a_post_is_not_sent_twice() {
    let answered = Arc::new(AtomicUsize::new(0));
    let posts = Arc::new(AtomicUsize::new(0));
    let (answered_seen, posts_seen) = (Arc::clone(&answered), Arc::clone(&posts));
    let addr = backend(move |mut stream, head| {
        let (answered, posts) = (Arc::clone(&answered_seen), Arc::clone(&posts_seen));
        async move {
            posts.fetch_add(usize::from(head.starts_with("POST")), Ordering::SeqCst);
            answered.fetch_add(1, Ordering::SeqCst);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            // The next request is read and dropped with the connection.
            if let Some(head) = read_head(&mut stream).await {
                posts.fetch_add(usize::from(head.starts_with("POST")), Ordering::SeqCst);
            }
        }
    })
    .await;
    let proxy = proxy_to(addr).await;
    let client = client();
    for round in 0..10 {
        let answer = send(&client, get(proxy.proxy_addr, "/")).await;
        assert_eq!(answer.status, StatusCode::OK, "round {round}");
        assert_eq!(answer.text(), "ok");
    }
    // Each answered request was the first on its connection.
    assert_eq!(answered.load(Ordering::SeqCst), 10);
    // A POST may have been acted on before the close: it gets a 502, never a second copy.
    let post = Request::post(format!("http://{}/", proxy.proxy_addr))
        .body(empty())
        .unwrap();
    let answer = send(&client, post).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(posts.load(Ordering::SeqCst), 1);
    drop(client);
    proxy.shutdown().await;
}

/// A full-duplex backend: it answers with its head at once, then reads the whole request
/// body and only then ends its answer with what it read.
#[tokio::test]
async fn a_backend_that_answers_before_it_reads_the_body_still_gets_all_of_it() {
    const SIZE: usize = 8 << 20;
    let addr = backend(|mut stream, _| async move {
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let mut body = vec![0u8; SIZE];
        stream.read_exact(&mut body).await.unwrap();
        let count = SIZE.to_string();
        let end = format!("{:x}\r\n{count}\r\n0\r\n\r\n", count.len());
        stream.write_all(end.as_bytes()).await.unwrap();
    })
    .await;
    let proxy = proxy_to(addr).await;
    let upload = Request::post(format!("http://{}/", proxy.proxy_addr))
        .body(full(vec![b'x'; SIZE]))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), send(&client(), upload))
        .await
        .expect("the backend never got the whole body");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), SIZE.to_string());
    proxy.shutdown().await;
}

/// A backend that answers 413 as soon as it has the head, and never reads the body.
#[tokio::test]
async fn an_answer_that_comes_before_the_request_body_is_sent_reaches_the_client() {
    let backend = scripted(
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n",
    )
    .await;
    let proxy = proxy_to(backend).await;
    let mut stream = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 10000000\r\n\r\n")
        .await
        .unwrap();
    // Some of the body, then the client waits for the answer.
    stream.write_all(&[b'x'; 65536]).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("no answer while the body was still coming")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    proxy.shutdown().await;
}

/// The backend's first bytes of the upgraded protocol come in the same packet as its
/// 101: they must reach the client, ahead of anything later.
#[tokio::test]
async fn bytes_the_backend_sends_right_behind_its_101_reach_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // The first connection with a request: the health checker's carry none.
        let mut stream = loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            if read_head(&mut stream).await.is_some() {
                break stream;
            }
        };
        stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nhello from the backend;")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.unwrap();
        stream.write_all(&buf[..n]).await.unwrap();
    });
    let proxy = proxy_to(backend).await;
    let mut stream = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let expected_first = b"hello from the backend;";
    while !got
        .windows(expected_first.len())
        .any(|w| w == expected_first)
    {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the bytes behind the 101 never came")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 101"));
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping");
    drop(stream);
    proxy.shutdown().await;
}

/// Request bodies of every framing the client may use reach the backend whole and as
/// HTTP/1.1 framing says: chunked stays chunked, a length stays that length.
#[tokio::test]
async fn request_bodies_reach_the_backend_framed_right() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let heads_tx = heads_tx.clone();
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut stream).await {
                    let lower = head.to_ascii_lowercase();
                    let body = if lower.contains("transfer-encoding: chunked") {
                        let mut raw = Vec::new();
                        let mut byte = [0u8; 1];
                        while !raw.ends_with(b"0\r\n\r\n") {
                            if stream.read(&mut byte).await.unwrap() == 0 {
                                return;
                            }
                            raw.push(byte[0]);
                        }
                        raw
                    } else if let Some(at) = lower.find("content-length: ") {
                        let length: usize = lower[at + 16..]
                            .split("\r\n")
                            .next()
                            .unwrap()
                            .parse()
                            .unwrap();
                        let mut raw = vec![0u8; length];
                        stream.read_exact(&mut raw).await.unwrap();
                        raw
                    } else {
                        Vec::new()
                    };
                    heads_tx
                        .send((head, String::from_utf8_lossy(&body).into_owned()))
                        .unwrap();
                    stream
                        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                        .await
                        .unwrap();
                }
            });
        }
    });
    let proxy = proxy_to(backend).await;
    let chunked = b"POST /c HTTP/1.1\r\nHost: app\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    let answer = raw_exchange(proxy.proxy_addr, chunked, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let (head, body) = heads.recv().await.unwrap();
    assert!(head.starts_with("POST /c HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
    let decoded: String = body
        .split("\r\n")
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(decoded, "abcde", "{body:?}");

    let sized =
        b"PUT /s HTTP/1.1\r\nHost: app\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello";
    let answer = raw_exchange(proxy.proxy_addr, sized, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let (head, body) = heads.recv().await.unwrap();
    assert!(head.contains("content-length: 5\r\n"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body, "hello");

    let client = client();
    let put = Request::put(format!("http://{}/f", proxy.proxy_addr))
        .body(full("twelve bytes"))
        .unwrap();
    let response = client.request(put).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let _ = response.into_body().collect().await;
    let (head, body) = heads.recv().await.unwrap();
    assert!(head.contains("content-length: 12\r\n"), "{head}");
    assert_eq!(body, "twelve bytes");
    proxy.shutdown().await;
}

/// A backend that answers one request on each connection and then, if `close_first`,
/// closes its side; it reports how long after its answer the proxy closed the
/// connection.
async fn watching_backend(
    close_first: bool,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Duration>) {
    let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
    let addr = backend(move |mut stream, _| {
        let closed_tx = closed_tx.clone();
        async move {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            let answered = std::time::Instant::now();
            if close_first {
                stream.shutdown().await.unwrap();
            }
            let mut rest = [0u8; 16];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_secs(10), stream.read(&mut rest)).await
            {
                let _ = closed_tx.send(answered.elapsed());
            }
        }
    })
    .await;
    (addr, closed)
}

#[tokio::test]
async fn an_idle_connection_the_backend_closed_is_closed_by_the_proxy_without_waiting_for_a_request(
) {
    let (backend, mut closed) = watching_backend(true).await;
    // An idle time far past the wait: only seeing the close can end the connection.
    let proxy = start_proxy(&config_text(
        "upstream_idle_timeout = \"1h\"\n",
        &[("blue", &[backend])],
        "",
    ))
    .await;
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    assert_eq!(answer.text(), "ok");
    let after = tokio::time::timeout(Duration::from_secs(10), closed.recv())
        .await
        .expect("the proxy kept the half-closed connection")
        .unwrap();
    assert!(after < Duration::from_secs(10), "{after:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_idle_connection_past_upstream_idle_timeout_is_closed() {
    let (backend, mut closed) = watching_backend(false).await;
    let proxy = start_proxy(&config_text(
        "upstream_idle_timeout = \"1s\"\n",
        &[("blue", &[backend])],
        "",
    ))
    .await;
    let answer = send(&client(), get(proxy.proxy_addr, "/")).await;
    assert_eq!(answer.text(), "ok");
    let after = tokio::time::timeout(Duration::from_secs(10), closed.recv())
        .await
        .expect("the proxy kept the idle connection past upstream_idle_timeout")
        .unwrap();
    assert!(
        after >= Duration::from_secs(1),
        "closed before its idle time: {after:?}"
    );
    proxy.shutdown().await;
}

/// A TLS backend whose answer has no length, so only the end of the connection ends
/// it; `close_notify`: it ends the TLS session properly, else it just drops the TCP
/// connection, as anyone on the path could.
async fn tls_until_close_backend(ca: &common::tls::TestCa, close_notify: bool) -> SocketAddr {
    let (chain, key) = ca.issue(&["backend.test"]).chain_and_key();
    let config = rustls::ServerConfig::builder_with_provider(common::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(stream).await else {
                    return;
                };
                if read_head(&mut stream).await.is_none() {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it";
                stream.write_all(answer).await.unwrap();
                stream.flush().await.unwrap();
                if close_notify {
                    let _ = stream.shutdown().await;
                }
                // Dropped without shutdown: the TCP connection ends, the session not.
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_tls_answer_delimited_by_its_close_is_whole_only_with_close_notify() {
    let ca = common::tls::TestCa::new("private CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path());
    for close_notify in [true, false] {
        let backend = tls_until_close_backend(&ca, close_notify).await;
        let proxy = start_proxy(&config_text(
            "",
            &[],
            &format!(
                "[pools.blue]\nbackends = [\"{backend}\"]\ntls = true\nca_file = \"{}\"\nserver_name = \"backend.test\"\n\n[services.app]\nactive = \"blue\"\n",
                ca_file.display()
            ),
        ))
        .await;
        // A body that breaks at once breaks the response before its head (see
        // `a_bad_chunk_or_a_short_body_cuts_the_response_off`).
        let whole = match client().request(get(proxy.proxy_addr, "/")).await {
            Ok(response) => response
                .into_body()
                .collect()
                .await
                .ok()
                .map(|b| b.to_bytes()),
            Err(_) => None,
        };
        if close_notify {
            assert_eq!(whole.as_deref(), Some(&b"all of it"[..]));
        } else {
            assert!(
                whole.is_none(),
                "a cut TLS stream passed for whole: {whole:?}"
            );
        }
        proxy.shutdown().await;
    }
}

/// `upstream_header_timeout` on a kept connection: each request gets its whole timeout
/// from when it went out, whatever the requests before it on that connection, and no
/// more. The backend keeps one connection and answers `GET /delay/<ms>` after that long.
#[tokio::test]
async fn each_request_on_a_kept_connection_gets_the_whole_header_timeout() {
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&connections);
    let addr = backend(move |mut stream, head| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut head = Some(head);
            while let Some(request) = head {
                let delay: u64 = request
                    .split_whitespace()
                    .nth(1)
                    .and_then(|path| path.strip_prefix("/delay/"))
                    .and_then(|ms| ms.parse().ok())
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    return;
                }
                head = read_head(&mut stream).await;
            }
        }
    })
    .await;
    let proxy = start_proxy(&config_text(
        "upstream_header_timeout = \"300ms\"",
        &[("blue", &[addr])],
        "",
    ))
    .await;
    let client = client();
    let at = |path: &str| get(proxy.proxy_addr, path);
    assert_eq!(send(&client, at("/delay/0")).await.status, StatusCode::OK);
    // Past half of the first request's timeout, a request that takes most of its own:
    // it outlives the first request's deadline and is still answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(send(&client, at("/delay/200")).await.status, StatusCode::OK);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the connection was kept"
    );
    // One that takes too long gets its 504, and not before its own timeout.
    let started = std::time::Instant::now();
    let late = send(&client, at("/delay/5000")).await;
    assert_eq!(late.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    proxy.shutdown().await;
}
