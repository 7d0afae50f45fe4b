//! The HTTPS listener: SNI, ALPN, certificate reload (API, SIGHUP, changed files), old
//! protocol versions, client certificates, and the HTTP-to-HTTPS redirect. Certificates
//! are made at run time; clients are rustls + hyper on real sockets.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::tls::{tls_table, Session, TestCa, TlsClient};
use common::*;
use http::StatusCode;

struct Site {
    _upstream: Upstream,
    proxy: switchyard::server::Running,
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl Site {
    fn tls_addr(&self) -> std::net::SocketAddr {
        self.proxy.tls_addr.unwrap()
    }
}

/// One upstream behind a proxy with `[proxy.tls]` serving `certs` (name lists, one
/// certificate each, in order).
async fn site(certs: &[&[&str]], tls_extra: &str, proxy_keys: &str) -> Site {
    let upstream = Upstream::start("blue-1").await;
    let ca = TestCa::new("switchyard test CA");
    let dir = tempfile::tempdir().unwrap();
    let pairs: Vec<_> = certs
        .iter()
        .enumerate()
        .map(|(i, names)| ca.issue(names).write(dir.path(), &format!("cert{i}")))
        .collect();
    let keys = format!("{proxy_keys}\n{}", tls_table(&pairs, tls_extra));
    let proxy = start_proxy(&config_text(&keys, &[("blue", &[upstream.addr])], "")).await;
    Site {
        _upstream: upstream,
        proxy,
        ca,
        dir,
    }
}

async fn reload(site: &Site) -> (StatusCode, serde_json::Value) {
    admin(
        site.proxy.admin_addr,
        "POST",
        "/api/v1/tls/reload",
        None,
        &[],
    )
    .await
}

/// The certificates differ by their DNS names: look for the name's bytes.
fn cert_has_name(der: &[u8], name: &str) -> bool {
    der.windows(name.len()).any(|w| w == name.as_bytes())
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_alpn_the_http_version() {
    let site = site(&[&["app.test"], &["*.api.test"]], "", "").await;

    let h2 = TlsClient::new(&site.ca, &["h2", "http/1.1"]);
    let mut session = Session::open(&h2, site.tls_addr(), "app.test")
        .await
        .unwrap();
    assert_eq!(session.alpn.as_deref(), Some(&b"h2"[..]));
    assert!(cert_has_name(&session.peer_cert, "app.test"));
    let answer = session.get("/echo").await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let echo = answer.json();
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(echo["headers"]["x-forwarded-host"][0], "app.test");

    let h1 = TlsClient::new(&site.ca, &["http/1.1"]);
    let mut session = Session::open(&h1, site.tls_addr(), "v2.api.test")
        .await
        .unwrap();
    assert_eq!(session.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(cert_has_name(&session.peer_cert, "*.api.test"));
    let answer = session.get("/").await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "blue-1");

    // No ALPN at all: HTTP/1.1.
    let plain = TlsClient::new(&site.ca, &[]);
    let mut session = Session::open(&plain, site.tls_addr(), "app.test")
        .await
        .unwrap();
    assert_eq!(session.alpn, None);
    assert_eq!(session.get("/").await.unwrap().text(), "blue-1");

    // A name no certificate covers gets the first one, which the client then refuses.
    let error = Session::open(&h2, site.tls_addr(), "other.test")
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("certificate"), "{error}");
}

#[tokio::test]
async fn reload_swaps_certificates_for_new_connections_and_keeps_open_ones() {
    let site = site(&[&["app.test"]], "reload_interval = \"0s\"", "").await;
    let client = TlsClient::new(&site.ca, &["http/1.1"]);
    let mut old = Session::open(&client, site.tls_addr(), "app.test")
        .await
        .unwrap();
    assert_eq!(old.get("/").await.unwrap().status, StatusCode::OK);
    let first = old.peer_cert.clone();

    // A new certificate (new key too) for the same name, written over the old files.
    site.ca.issue(&["app.test"]).write(site.dir.path(), "cert0");
    let (status, body) = reload(&site).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["certificates"][0]["names"][0], "app.test");

    // The connection opened before the reload keeps working.
    assert_eq!(old.get("/").await.unwrap().text(), "blue-1");
    assert_eq!(old.get("/echo").await.unwrap().status, StatusCode::OK);
    let mut fresh = Session::open(&client, site.tls_addr(), "app.test")
        .await
        .unwrap();
    assert_ne!(
        fresh.peer_cert, first,
        "a new connection still got the old certificate"
    );
    assert_eq!(fresh.get("/").await.unwrap().status, StatusCode::OK);
    let second = fresh.peer_cert.clone();

    // A broken file is refused with the reason, and the certificate in use stays.
    std::fs::write(
        site.dir.path().join("cert0.pem"),
        "-----BEGIN CERTIFICATE-----\nnope\n",
    )
    .unwrap();
    let (status, body) = reload(&site).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "tls_reload_refused");
    assert!(
        body["error"].as_str().unwrap().contains("cert0.pem"),
        "{body}"
    );
    let mut after = Session::open(&client, site.tls_addr(), "app.test")
        .await
        .unwrap();
    assert_eq!(after.peer_cert, second);
    assert_eq!(after.get("/").await.unwrap().status, StatusCode::OK);

    // A key that belongs to another certificate is refused too.
    let other = site.ca.issue(&["app.test"]);
    std::fs::write(site.dir.path().join("cert0.pem"), &other.cert_pem).unwrap();
    let (status, body) = reload(&site).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("does not go with"),
        "{body}"
    );
    let after = Session::open(&client, site.tls_addr(), "app.test")
        .await
        .unwrap();
    assert_eq!(after.peer_cert, second);

    let scrape = send(&common::client(), get(site.proxy.admin_addr, "/metrics"))
        .await
        .text();
    assert!(
        scrape.contains("switchyard_tls_reloads_total{result=\"success\"} 1"),
        "{scrape}"
    );
    assert!(
        scrape.contains("switchyard_tls_reloads_total{result=\"failure\"} 2"),
        "{scrape}"
    );
    assert!(
        scrape.contains("switchyard_tls_certificate_expiry_timestamp_seconds{cert_file="),
        "{scrape}"
    );
}

#[tokio::test]
async fn changed_certificate_files_are_picked_up_without_a_call() {
    let site = site(&[&["app.test"]], "reload_interval = \"50ms\"", "").await;
    let client = TlsClient::new(&site.ca, &["http/1.1"]);
    let first = Session::open(&client, site.tls_addr(), "app.test")
        .await
        .unwrap()
        .peer_cert;
    let replacement = site.ca.issue(&["app.test"]);
    // Key first, then certificate: a poll between the two sees a mismatched pair and
    // must keep the old one, not fail the listener.
    std::fs::write(site.dir.path().join("cert0.key"), &replacement.key_pem).unwrap();
    std::fs::write(site.dir.path().join("cert0.pem"), &replacement.cert_pem).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let session = Session::open(&client, site.tls_addr(), "app.test")
            .await
            .unwrap();
        assert!(session.peer_cert == first || session.peer_cert == replacement.der);
        if session.peer_cert == replacement.der {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn sighup_reloads_certificates_in_the_running_binary() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(Upstream::start("blue-1"));
    let ca = TestCa::new("switchyard test CA");
    let dir = tempfile::tempdir().unwrap();
    let pair = ca.issue(&["app.test"]).write(dir.path(), "app");
    let keys = tls_table(&[pair], "reload_interval = \"0s\"");
    let proxy = ProxyProcess::start(&config_text(&keys, &[("blue", &[upstream.addr])], ""));
    let tls_addr = proxy.tls_addr.unwrap();
    let client = TlsClient::new(&ca, &["h2"]);
    let first = runtime
        .block_on(Session::open(&client, tls_addr, "app.test"))
        .unwrap()
        .peer_cert;
    let replacement = ca.issue(&["app.test"]);
    replacement.write(dir.path(), "app");
    proxy.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut session = runtime
            .block_on(Session::open(&client, tls_addr, "app.test"))
            .unwrap();
        if session.peer_cert == replacement.der {
            let answer = runtime.block_on(session.get("/")).unwrap();
            assert_eq!(answer.text(), "blue-1");
            break;
        }
        assert_eq!(session.peer_cert, first);
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TLS 1.1 ClientHello without the supported_versions extension, as an old client
/// sends it: the proxy must answer with an alert, never a ServerHello.
fn legacy_client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&version);
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // no session id
                   // Suites the proxy does offer in TLS 1.2 (ECDHE-ECDSA/RSA-AES128-GCM), so the
                   // version is the only thing wrong, and an old CBC one.
    hello.extend_from_slice(&[0x00, 0x06, 0xc0, 0x2b, 0xc0, 0x2f, 0x00, 0x2f]);
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
                                            // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pkcs1_sha256), which rustls
                                            // needs before it looks at the version.
    hello.extend_from_slice(&[
        0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01,
    ]);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, version[0], version[1]];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

fn first_record(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = vec![0u8; 64];
    let n = stream.read(&mut answer).unwrap_or(0);
    answer.truncate(n);
    answer
}

#[tokio::test]
async fn tls_1_0_and_1_1_are_refused_and_min_version_1_3_refuses_1_2() {
    let site = site(&[&["app.test"]], "", "").await;
    for version in [[3, 1], [3, 2]] {
        let addr = site.tls_addr();
        let answer =
            tokio::task::spawn_blocking(move || first_record(addr, &legacy_client_hello(version)))
                .await
                .unwrap();
        // 0x15 = alert record; 70 = protocol_version. Never 0x16 (a ServerHello).
        assert_eq!(
            answer.first(),
            Some(&0x15),
            "TLS {version:?} got {answer:?}"
        );
        assert_eq!(answer.last(), Some(&70), "TLS {version:?} got {answer:?}");
    }
    // A modern client works on the same listener.
    let client = TlsClient::new(&site.ca, &["http/1.1"]);
    assert!(Session::open(&client, site.tls_addr(), "app.test")
        .await
        .is_ok());

    let strict = site_with_min_13().await;
    let mut tls12_only = TlsClient::new(&strict.ca, &["http/1.1"]);
    static TLS12: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
    tls12_only.versions = &TLS12;
    assert!(Session::open(&tls12_only, strict.tls_addr(), "app.test")
        .await
        .is_err());
    let modern = TlsClient::new(&strict.ca, &["http/1.1"]);
    assert!(Session::open(&modern, strict.tls_addr(), "app.test")
        .await
        .is_ok());
}

async fn site_with_min_13() -> Site {
    site(&[&["app.test"]], "min_version = \"1.3\"", "").await
}

#[tokio::test]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    let upstream = Upstream::start("blue-1").await;
    let ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let dir = tempfile::tempdir().unwrap();
    let pair = ca.issue(&["app.test"]).write(dir.path(), "app");
    let client_ca_file = dir.path().join("clients.pem");
    std::fs::write(&client_ca_file, client_ca.pem()).unwrap();
    let keys = tls_table(
        &[pair],
        &format!("client_ca_file = \"{}\"", client_ca_file.display()),
    );
    let proxy = start_proxy(&config_text(&keys, &[("blue", &[upstream.addr])], "")).await;
    let addr = proxy.tls_addr.unwrap();

    // Without a certificate: TLS 1.3 clients learn of the refusal on their first read.
    let anonymous = TlsClient::new(&ca, &["http/1.1"]);
    let refused = match Session::open(&anonymous, addr, "app.test").await {
        Err(_) => true,
        Ok(mut session) => session.get("/").await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // A certificate from another CA is refused too.
    let mut stranger = TlsClient::new(&ca, &["http/1.1"]);
    stranger.client_cert = Some(TestCa::new("other").issue_client("intruder"));
    let refused = match Session::open(&stranger, addr, "app.test").await {
        Err(_) => true,
        Ok(mut session) => session.get("/").await.is_err(),
    };
    assert!(
        refused,
        "a client with an unknown CA's certificate was served"
    );

    let mut known = TlsClient::new(&ca, &["http/1.1"]);
    known.client_cert = Some(client_ca.issue_client("deployer"));
    let mut session = Session::open(&known, addr, "app.test").await.unwrap();
    assert_eq!(session.get("/").await.unwrap().text(), "blue-1");
}

#[tokio::test]
async fn the_plain_port_redirects_to_https_when_asked() {
    let site = site(&[&["app.test"]], "redirect_http = true", "").await;
    let request = http::Request::get(format!("http://{}/a/b?c=d", site.proxy.proxy_addr))
        .header("host", "app.test:8080")
        .body(empty())
        .unwrap();
    let answer = send(&common::client(), request).await;
    assert_eq!(answer.status, StatusCode::PERMANENT_REDIRECT);
    let port = site.tls_addr().port();
    assert_eq!(
        answer.header("location"),
        Some(format!("https://app.test:{port}/a/b?c=d").as_str())
    );
    // An IPv6 literal keeps its brackets.
    let request = http::Request::get(format!("http://{}/", site.proxy.proxy_addr))
        .header("host", "[::1]:8080")
        .body(empty())
        .unwrap();
    let answer = send(&common::client(), request).await;
    assert_eq!(
        answer.header("location"),
        Some(format!("https://[::1]:{port}/").as_str())
    );
    // The HTTPS side serves as usual.
    let client = TlsClient::new(&site.ca, &["h2"]);
    let mut session = Session::open(&client, site.tls_addr(), "app.test")
        .await
        .unwrap();
    assert_eq!(session.get("/a/b?c=d").await.unwrap().text(), "blue-1");
}

#[test]
fn tls_listener_settings_that_cannot_work_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pair = TestCa::new("ca")
        .issue(&["app.test"])
        .write(dir.path(), "one");
    let backend = ["127.0.0.1:1".parse().unwrap()];
    for (extra, key) in [
        // Without a CA nobody would be asked for a certificate: refused, not ignored.
        ("client_auth = \"required\"", "proxy.tls.client_auth"),
        ("client_auth = \"optional\"", "proxy.tls.client_auth"),
        ("redirect_port = 443", "proxy.tls.redirect_port"),
        (
            "redirect_http = true\nredirect_port = 0",
            "proxy.tls.redirect_port",
        ),
        ("max_handshakes = 0", "proxy.tls.max_handshakes"),
        ("handshake_timeout = \"0s\"", "proxy.tls.handshake_timeout"),
        ("min_version = \"1.1\"", "proxy.tls"),
        (
            "client_ca_file = \"/nonexistent/clients.pem\"",
            "proxy.tls.client_ca_file",
        ),
    ] {
        let text = config_text(
            &tls_table(std::slice::from_ref(&pair), extra),
            &[("blue", &backend)],
            "",
        );
        let error = check(&text)
            .err()
            .unwrap_or_else(|| panic!("{extra} was accepted"));
        assert!(error.key.starts_with(key), "{extra}: {error}");
    }
    // The HTTPS listener on the admin address.
    let text = config_with_admin(
        &tls_table(std::slice::from_ref(&pair), "").replace("127.0.0.1:0", "127.0.0.1:19443"),
        "",
        &[("blue", &backend)],
        "",
    )
    .replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:19443\"",
    );
    let error = check(&text).unwrap_err();
    assert_eq!(error.key, "admin.listen", "{error}");
}

#[tokio::test]
async fn the_redirect_names_the_public_port_when_it_differs() {
    let site = site(
        &[&["app.test"]],
        "redirect_http = true\nredirect_port = 443",
        "",
    )
    .await;
    let request = http::Request::get(format!("http://{}/x", site.proxy.proxy_addr))
        .header("host", "app.test")
        .body(empty())
        .unwrap();
    let answer = send(&common::client(), request).await;
    assert_eq!(answer.header("location"), Some("https://app.test/x"));
}

#[tokio::test]
async fn stalled_handshakes_time_out_and_hold_no_more_than_their_slots() {
    let site = site(
        &[&["app.test"]],
        "handshake_timeout = \"1s\"\nmax_handshakes = 1",
        "",
    )
    .await;
    let addr = site.tls_addr();
    // A client that connects and never says hello holds the only handshake slot...
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client = TlsClient::new(&site.ca, &["http/1.1"]);
    let waiting = {
        let client = TlsClient::new(&site.ca, &["http/1.1"]);
        tokio::spawn(async move { Session::open(&client, addr, "app.test").await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a second handshake ran past max_handshakes = 1"
    );
    // ...until its handshake_timeout closes it. (The waiting handshake's own timeout,
    // which includes the wait for a slot, runs out at about the same moment, so it may
    // or may not complete; a new one does.)
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    let _ = waiting.await.unwrap();
    assert!(Session::open(&client, addr, "app.test").await.is_ok());
    let scrape = send(&common::client(), get(site.proxy.admin_addr, "/metrics"))
        .await
        .text();
    assert!(
        scrape.contains("switchyard_tls_handshake_failures_total{reason=\"timeout\"}"),
        "{scrape}"
    );
}

#[tokio::test]
async fn max_connections_counts_both_listeners_together() {
    let site = site(&[&["app.test"]], "", "max_connections = 1").await;
    let client = TlsClient::new(&site.ca, &["http/1.1"]);
    let mut held = Session::open(&client, site.tls_addr(), "app.test")
        .await
        .unwrap();
    assert_eq!(held.get("/").await.unwrap().status, StatusCode::OK);
    let answer = raw_exchange(
        site.proxy.proxy_addr,
        b"GET / HTTP/1.1\r\nhost: app.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
}

#[test]
fn check_names_a_missing_or_mismatched_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ca");
    let (cert, _) = ca.issue(&["app.test"]).write(dir.path(), "one");
    let (_, other_key) = ca.issue(&["app.test"]).write(dir.path(), "two");
    let missing = dir.path().join("missing.pem");
    for (pair, expect) in [
        ((missing.clone(), other_key.clone()), "missing.pem"),
        ((cert.clone(), other_key.clone()), "does not go with"),
    ] {
        let text = config_text(
            &tls_table(&[pair], ""),
            &[("blue", &["127.0.0.1:1".parse().unwrap()])],
            "",
        );
        let error = check(&text).unwrap_err();
        assert_eq!(error.key, "proxy.tls.certificates");
        assert!(error.to_string().contains(expect), "{error}");
        assert!(error.line.is_some(), "{error}");
    }
}

#[test]
fn the_shipped_tls_example_passes_check_once_its_certificates_exist() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("config/tls");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = TestCa::new("example");
    ca.issue(&["app.example.com", "www.example.com"])
        .write(&certs, "app");
    ca.issue(&["*.example.com"]).write(&certs, "wildcard");
    ca.issue(&["payments.internal"]).write(&certs, "payments");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tls.example.toml");
    std::fs::copy(example, dir.path().join("config/tls.example.toml")).unwrap();
    // The example's paths are relative to the working directory, as documented.
    let out = std::process::Command::new(binary())
        .args(["check", "--config", "config/tls.example.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
