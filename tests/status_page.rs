//! The status page at `/` of the admin listener, in a real headless Chromium driven
//! through WebDriver (Debian `chromium` and `chromium-driver`; `.ci/run` installs
//! them): it asks for the token and shows nothing else without it, renders the pools
//! and backends, shows a canary change and a backend going unhealthy within its
//! refresh interval, and charts the traffic.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use http::StatusCode;

const TOKEN: &str = "status-page-token";
/// The page polls every 2 s; a change must show within that and one slow round trip.
const SHOWS_WITHIN: Duration = Duration::from_secs(5);

/// `chromedriver` on a free port, stopped when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("chromedriver could not start ({e}): install Debian's chromium and chromium-driver (.ci/run does)")
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _profile: tempfile::tempdir().unwrap(),
        }
    }

    async fn browser(&self) -> Client {
        let chromium = which("chromium")
            .or_else(|| which("chromium-browser"))
            .expect("chromium is not installed (Debian package `chromium`)");
        let options = serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless=new",
                // Root in a container has no user namespace for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,1100",
                format!("--user-data-dir={}", self._profile.path().display()),
            ],
        });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a WebDriver session with headless Chromium")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| format!("{dir}/{name}"))
        .find(|path| std::path::Path::new(path).is_file())
}

/// Polls a JavaScript expression in the page until it is truthy; returns its value.
async fn until(
    browser: &Client,
    limit: Duration,
    what: &str,
    expression: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let script = format!("return ({expression}) || null;");
    loop {
        let value = browser.execute(&script, vec![]).await.unwrap();
        if !value.is_null() && value != serde_json::Value::Bool(false) {
            return value;
        }
        if Instant::now() >= deadline {
            let body = browser
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap_or_default();
            panic!(
                "{what}: not within {limit:?}; the page shows:\n{}",
                body.as_str().unwrap_or("")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Types `token` into the page's prompt and submits it.
async fn log_in(browser: &Client, token: &str) {
    let input = browser.find(Locator::Id("token")).await.unwrap();
    input.send_keys(token).await.unwrap();
    let button = browser.find(Locator::Css("#login button")).await.unwrap();
    button.click().await.unwrap();
}

fn text_of(selector: &str) -> String {
    format!("(document.querySelector('{selector}') || {{}}).innerText")
}

#[tokio::test]
async fn the_status_page_asks_for_the_token_then_follows_the_traffic_state() {
    let blue_1 = Upstream::start("blue-1").await;
    let blue_2 = Upstream::start("blue-2").await;
    let green = Upstream::start("green-1").await;
    let health = "path = \"/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\njitter = \"0ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\n";
    let config = config_with_admin(
        "",
        &admin_token_keys(TOKEN),
        &[
            ("blue", &[blue_1.addr, blue_2.addr]),
            ("green", &[green.addr]),
        ],
        &format!("[pools.blue.health]\n{health}[pools.green.health]\n{health}"),
    );
    let proxy = ProxyProcess::start(&config);
    wait_ready(proxy.admin_addr).await;
    let auth = format!("Bearer {TOKEN}");
    let page = format!("http://{}/", proxy.admin_addr);

    let driver = ChromeDriver::start();
    let browser = driver.browser().await;
    browser.goto(&page).await.unwrap();

    // Without the token: the prompt, and nothing of the state.
    until(
        &browser,
        SHOWS_WITHIN,
        "the token prompt",
        "!document.getElementById('login').hidden",
    )
    .await;
    let shown = browser
        .execute("return document.body.innerText;", vec![])
        .await
        .unwrap();
    let shown = shown.as_str().unwrap();
    assert!(!shown.contains(&blue_1.addr.to_string()), "{shown}");
    assert!(
        !shown.contains("blue"),
        "without the token the page shows pools: {shown}"
    );

    // A wrong token is refused and says so.
    log_in(&browser, "not-the-token").await;
    until(
        &browser,
        SHOWS_WITHIN,
        "the refusal",
        &format!("{}.includes('refused')", text_of("#login-error")),
    )
    .await;

    // The right one shows the pools and backends with their health.
    log_in(&browser, TOKEN).await;
    for (pool, backend) in [("blue", &blue_1), ("blue", &blue_2), ("green", &green)] {
        until(
            &browser,
            SHOWS_WITHIN,
            &format!("{pool}/{} healthy", backend.addr),
            &format!(
                "(document.querySelector('[data-backend=\"{pool}/{}\"]') || {{dataset: {{}}}}).dataset.health === 'healthy'",
                backend.addr
            ),
        )
        .await;
    }
    let stored = browser
        .execute(
            "return [sessionStorage.getItem('switchyard-token'), localStorage.length, document.cookie];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        stored,
        serde_json::json!([TOKEN, 0, ""]),
        "the token lives in the tab's session only"
    );
    let login = browser.find(Locator::Id("login")).await.unwrap();
    assert!(
        !login.is_displayed().await.unwrap(),
        "the prompt goes once the token is taken"
    );

    // A canary change made through the API shows within the refresh interval.
    let (status, body) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/services/app/canary",
        Some(serde_json::json!({"pool": "green", "weight": 25})),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let changed = Instant::now();
    until(
        &browser,
        SHOWS_WITHIN,
        "the canary",
        &format!(
            "{}.includes('green 25%')",
            text_of("[data-service=\"app\"] [data-field=\"canary\"]")
        ),
    )
    .await;
    eprintln!("canary shown {:?} after the change", changed.elapsed());

    // A rollout, waiting at its first (pause) step, shows with its status and step.
    let (status, body) = admin(
        proxy.admin_addr,
        "POST",
        "/api/v1/services/app/rollout",
        Some(serde_json::json!({"pool": "green", "steps": ["pause", 50]})),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    until(
        &browser,
        SHOWS_WITHIN,
        "the rollout",
        &format!(
            "{}.includes('green paused, step 1/2')",
            text_of("[data-service=\"app\"] [data-field=\"rollout\"]")
        ),
    )
    .await;

    // Traffic through the proxy shows in blue's request-rate chart.
    let client = client();
    for _ in 0..200 {
        let response = client.request(get(proxy.proxy_addr, "/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    until(
        &browser,
        Duration::from_secs(10),
        "blue's request rate",
        &format!(
            "parseFloat({}) > 0",
            text_of("[data-pool=\"blue\"] [data-chart=\"rate\"] .value")
        ),
    )
    .await;

    // A backend whose checks fail turns unhealthy, visibly, with the reason.
    blue_2.health.set(500);
    let row = format!("[data-backend=\"blue/{}\"]", blue_2.addr);
    until(
        &browser,
        SHOWS_WITHIN,
        "blue-2 unhealthy",
        &format!(
            "(document.querySelector('{row}') || {{dataset: {{}}}}).dataset.health === 'unhealthy'"
        ),
    )
    .await;
    until(
        &browser,
        SHOWS_WITHIN,
        "the check's reason",
        &format!("{}.includes('500')", text_of(&row)),
    )
    .await;
    let colours = browser
        .execute(
            &format!(
                "return [getComputedStyle(document.querySelector('{row}')).backgroundColor, \
                 getComputedStyle(document.querySelector('[data-backend=\"blue/{}\"]')).backgroundColor];",
                blue_1.addr
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_ne!(
        colours[0], colours[1],
        "the unhealthy row must look different: {colours}"
    );

    // The picture for the docs.
    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = std::env::var("SWITCHYARD_SCREENSHOT")
        .unwrap_or_else(|_| format!("{}/status-page.png", env!("CARGO_TARGET_TMPDIR")));
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot: {path}");

    // Read-only: the page never sent a change (the generation is still the canary's).
    let (_, state) = admin(
        proxy.admin_addr,
        "GET",
        "/api/v1/state",
        None,
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(state["generation"], body["generation"]);

    // The admin API goes away: the last picture stays, marked stale, with the problem.
    drop(proxy);
    until(
        &browser,
        Duration::from_secs(10),
        "the stale mark",
        &format!(
            "{}.includes('did not answer') && {}.includes('ago')",
            text_of("#problem"),
            text_of("#freshness")
        ),
    )
    .await;
    assert!(
        browser.find(Locator::Css(&row)).await.is_ok(),
        "the last picture stays"
    );
    browser.close().await.unwrap();
}
