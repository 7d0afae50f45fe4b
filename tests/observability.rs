//! Metrics and access logs as an operator sees them: a real scrape after real traffic,
//! checked by promtool, and access log lines read from the process's stdout.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::json;

struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_scrape(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

async fn scrape(admin: SocketAddr) -> (String, Vec<Sample>) {
    let answer = send(&client(), get(admin, "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = answer.text();
    let samples = parse_scrape(&text);
    (text, samples)
}

/// Sum of the samples of `name` whose labels include all of `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Runs `promtool check metrics` on a scrape; fails the test when promtool is missing
/// (CI installs it) or reports a problem.
fn promtool_check(scrape: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool is needed for this test (Debian package `prometheus`; .ci/run installs it)",
        );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{report}"
    );
    assert!(!report.to_lowercase().contains("error"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_real_traffic_counts_exactly_and_passes_promtool() {
    let bg = BlueGreen::start(2, "", "").await;
    let client = client();
    for _ in 0..40 {
        assert_eq!(
            send(&client, get(bg.addr(), "/")).await.status,
            StatusCode::OK
        );
    }
    for _ in 0..7 {
        assert_eq!(
            send(&client, get(bg.addr(), "/status/404")).await.status,
            StatusCode::NOT_FOUND
        );
    }
    for _ in 0..3 {
        assert_eq!(
            send(&client, get(bg.addr(), "/status/503")).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let (text, samples) = scrape(bg.admin()).await;
    promtool_check(&text);

    let total = |code: &str| {
        value(
            &samples,
            "switchyard_requests_total",
            &[("service", "app"), ("pool", "blue"), ("code", code)],
        )
    };
    assert_eq!(total("200"), 40.0);
    assert_eq!(total("404"), 7.0);
    assert_eq!(total("503"), 3.0);
    for upstream in &bg.blue {
        let served = value(
            &samples,
            "switchyard_requests_total",
            &[("pool", "blue"), ("backend", &upstream.addr.to_string())],
        );
        assert_eq!(served, upstream.hits() as f64, "{}", upstream.name);
    }
    assert_eq!(
        value(
            &samples,
            "switchyard_request_duration_seconds_count",
            &[("service", "app"), ("pool", "blue")]
        ),
        50.0,
        "one histogram observation per request"
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_active_pool",
            &[("service", "app"), ("pool", "blue")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_active_pool",
            &[("service", "app"), ("pool", "green")]
        ),
        0.0
    );
    assert_eq!(
        value(&samples, "switchyard_backend_healthy", &[("pool", "green")]),
        2.0
    );
    // The test client keeps its keep-alive connection(s) open: at least one.
    assert!(
        value(
            &samples,
            "switchyard_connections_open",
            &[("listener", "http")]
        ) >= 1.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(
        value(
            &samples,
            "switchyard_health_checks_total",
            &[("result", "success")]
        ) >= 4.0
    );
    assert!(
        value(
            &samples,
            "switchyard_upstream_connect_duration_seconds_count",
            &[("pool", "blue")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn errors_that_never_reached_a_backend_have_an_empty_backend_label() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = socket.local_addr().unwrap();
    let config = config_text(
        "",
        &[("blue", &[dead])],
        "[services.shop]\nhosts = [\"shop.example.com\"]\nactive = \"blue\"\n",
    );
    let config = config.replace("[services.app]\nactive = \"blue\"\n", "");
    let proxy = start_proxy(&config).await;
    for _ in 0..4 {
        let request = http::Request::get(format!("http://{}/", proxy.proxy_addr))
            .header("host", "shop.example.com")
            .body(empty())
            .unwrap();
        assert_eq!(
            send(&client(), request).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    for _ in 0..2 {
        assert_eq!(
            send(&client(), get(proxy.proxy_addr, "/")).await.status,
            StatusCode::NOT_FOUND
        );
    }
    let (text, samples) = scrape(proxy.admin_addr).await;
    promtool_check(&text);
    assert_eq!(
        value(
            &samples,
            "switchyard_requests_total",
            &[
                ("service", "shop"),
                ("pool", "blue"),
                ("backend", ""),
                ("code", "503")
            ]
        ),
        4.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_requests_total",
            &[("service", ""), ("backend", ""), ("code", "404")]
        ),
        2.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_follow_in_flight_requests_health_and_admin_calls() {
    let bg = BlueGreen::start(1, "", "").await;
    let blue = bg.blue[0].addr.to_string();
    let addr = bg.addr();
    let slow = tokio::spawn(async move { send(&client(), get(addr, "/slow/1000")).await });
    eventually(Duration::from_secs(10), "slow request upstream", || {
        bg.blue[0].hits() == 1
    })
    .await;
    let (_, samples) = scrape(bg.admin()).await;
    assert_eq!(
        value(
            &samples,
            "switchyard_backend_in_flight",
            &[("backend", &blue)]
        ),
        1.0
    );
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    let (_, samples) = scrape(bg.admin()).await;
    assert_eq!(
        value(
            &samples,
            "switchyard_backend_in_flight",
            &[("backend", &blue)]
        ),
        0.0
    );

    let canary = json!({"pool": "green", "weight": 12.5});
    assert_eq!(
        admin(
            bg.admin(),
            "PUT",
            "/api/v1/services/app/canary",
            Some(canary),
            &[]
        )
        .await
        .0,
        StatusCode::OK
    );
    let drain = format!("/api/v1/pools/blue/backends/{blue}/drain");
    assert_eq!(
        admin(bg.admin(), "POST", &drain, None, &[]).await.0,
        StatusCode::OK
    );
    let (text, samples) = scrape(bg.admin()).await;
    promtool_check(&text);
    assert_eq!(
        value(
            &samples,
            "switchyard_canary_weight",
            &[("service", "app"), ("pool", "green")]
        ),
        12.5
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_traffic_changes_total",
            &[("service", "app"), ("kind", "canary")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_backend_state",
            &[("backend", &blue), ("state", "draining")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_backend_state",
            &[("backend", &blue), ("state", "active")]
        ),
        0.0
    );
    assert_eq!(value(&samples, "switchyard_config_generation", &[]), 2.0);

    assert_eq!(
        admin(
            bg.admin(),
            "POST",
            "/api/v1/services/app/promote",
            None,
            &[]
        )
        .await
        .0,
        StatusCode::OK
    );
    let (_, samples) = scrape(bg.admin()).await;
    assert_eq!(
        value(
            &samples,
            "switchyard_active_pool",
            &[("service", "app"), ("pool", "green")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_canary_weight",
            &[("service", "app"), ("pool", "green")]
        ),
        0.0
    );

    // Health flips with the backend.
    bg.green[0].kill();
    let green = bg.green[0].addr.to_string();
    let admin_addr = bg.admin();
    let mut down = false;
    for _ in 0..1000 {
        let (_, samples) = scrape(admin_addr).await;
        if value(
            &samples,
            "switchyard_backend_healthy",
            &[("backend", &green)],
        ) == 0.0
        {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(down, "switchyard_backend_healthy never turned 0");
}

#[tokio::test]
async fn metrics_can_require_the_token() {
    let dir = state_dir();
    let token = dir.join("token");
    std::fs::write(&token, "m3trics").unwrap();
    let bg = BlueGreen::start(
        1,
        "",
        &format!(
            "token_file = \"{}\"\nmetrics_require_token = true",
            token.display()
        ),
    )
    .await;
    assert_eq!(
        send(&client(), get(bg.admin(), "/metrics")).await.status,
        StatusCode::UNAUTHORIZED
    );
    let request = http::Request::get(format!("http://{}/metrics", bg.admin()))
        .header("authorization", "Bearer m3trics")
        .body(empty())
        .unwrap();
    assert_eq!(send(&client(), request).await.status, StatusCode::OK);
    assert_eq!(
        send(&client(), get(bg.admin(), "/healthz")).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_and_name_the_pool_and_backend() {
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let config = config_text(
        "",
        &[("blue", &[blue.addr]), ("green", &[green.addr])],
        "[log]\naccess = \"stdout\"\nformat = \"json\"\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, &config).unwrap();
    let mut command = Command::new(binary());
    command
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::piped());
    let Switchyard {
        mut child,
        proxy_addr: proxy,
        admin_addr,
        ..
    } = Switchyard::start(command, true).unwrap();
    set_header_canary(admin_addr, "green").await;
    assert_eq!(
        send(&client(), get(proxy, "/download/1234?secret=1"))
            .await
            .status,
        StatusCode::OK
    );
    let request = canary_request(proxy, "/echo");
    assert_eq!(send(&client(), request).await.status, StatusCode::OK);

    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take(2)
            .collect::<Vec<_>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(20), lines)
        .await
        .expect("two access log lines")
        .unwrap();
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        first["path"], "/download/1234",
        "no query string in the log"
    );
    assert_eq!(first["status"], 200);
    assert_eq!(first["bytes"], 1234);
    assert_eq!(first["pool"], "blue");
    assert_eq!(first["backend"], blue.addr.to_string());
    assert_eq!(first["service"], "app");
    assert_eq!(first["decision"], "weight");
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["pool"], "green");
    assert_eq!(second["backend"], green.addr.to_string());
    assert_eq!(second["decision"], "header");
    let _ = child.kill();
    let _ = child.wait();
}

/// Every `switchyard_*` metric name in `text` (histogram suffixes removed).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("switchyard_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end] == b'_'
                || bytes[end].is_ascii_digit())
        {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(base.to_string());
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_only_use_metrics_a_live_scrape_has_and_pass_promtool() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("contrib/prometheus/alerts.yml");
    for args in [vec!["check", "rules"], vec!["test", "rules"]] {
        let file = if args[0] == "check" {
            rules.clone()
        } else {
            root.join("contrib/prometheus/alerts_test.yml")
        };
        let out = Command::new("promtool")
            .args(&args)
            .arg(&file)
            .output()
            .expect(
            "promtool is needed for this test (Debian package `prometheus`; .ci/run installs it)",
        );
        assert!(
            out.status.success(),
            "promtool {} {}:\n{}{}",
            args.join(" "),
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Traffic that brings every metric family into existence, retries included: the
    // pool has a backend that refuses connections.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = socket.local_addr().unwrap();
    let live = Upstream::start("live").await;
    let green = Upstream::start("green").await;
    // A TLS listener too, for the certificate metrics.
    let certs = tempfile::tempdir().unwrap();
    let pair = common::tls::TestCa::new("ca")
        .issue(&["app.test"])
        .write(certs.path(), "app");
    let config = config_text(
        &format!(
            "connect_attempts = 3\n{}",
            common::tls::tls_table(&[pair], "")
        ),
        &[("blue", &[dead, live.addr]), ("green", &[green.addr])],
        "",
    );
    let proxy = start_proxy(&config).await;
    let canary = json!({"pool": "green", "weight": 10});
    assert_eq!(
        admin(
            proxy.admin_addr,
            "PUT",
            "/api/v1/services/app/canary",
            Some(canary),
            &[]
        )
        .await
        .0,
        StatusCode::OK
    );
    for _ in 0..30 {
        assert_eq!(
            send(&client(), get(proxy.proxy_addr, "/")).await.status,
            StatusCode::OK
        );
    }
    let control = std::sync::Arc::clone(&proxy.shared.control);
    eventually(Duration::from_secs(20), "health checks ran", || {
        control.first_round_done()
    })
    .await;
    // A mirror and a rollout, for their families (a family shows once it has a series).
    for (method, path, body) in [
        (
            "PUT",
            "/api/v1/services/app/mirror",
            json!({"pool": "green", "percent": 100}),
        ),
        (
            "POST",
            "/api/v1/services/app/rollout",
            json!({"pool": "green", "steps": [50, 100], "hold": "1h",
                "analysis": {"interval": "100ms", "min_requests": 1}}),
        ),
    ] {
        let (status, answer) = admin(proxy.admin_addr, method, path, Some(body), &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let scrape_text = loop {
        send(&client(), get(proxy.proxy_addr, "/")).await;
        let (text, _) = scrape(proxy.admin_addr).await;
        if text.contains("switchyard_rollout_analysis_total{") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no analysis window judged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let available = metric_names(&scrape_text);

    let dashboard_text =
        std::fs::read_to_string(root.join("contrib/grafana/switchyard.json")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard_text).expect("dashboard is valid JSON");
    let mut exprs = String::new();
    collect_exprs(&dashboard, &mut exprs);
    let used = metric_names(&exprs);
    assert!(
        used.len() >= 8,
        "the dashboard queries switchyard metrics: {used:?}"
    );
    let missing: Vec<_> = used.difference(&available).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries metrics the scrape does not have: {missing:?}"
    );

    let alerts = std::fs::read_to_string(&rules).unwrap();
    let missing: Vec<_> = metric_names(&alerts)
        .difference(&available)
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "alerts use metrics the scrape does not have: {missing:?}"
    );
    proxy.shutdown().await;
}

/// Every `expr` and `query` string in a Grafana dashboard, panels and annotations alike.
fn collect_exprs(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                if let (true, Some(text)) = (key == "expr" || key == "query", v.as_str()) {
                    out.push_str(text);
                    out.push('\n');
                }
                collect_exprs(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn recent_traffic_counts_each_pools_requests_errors_and_latency() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let config = config_text("", &[("blue", &[blue.addr]), ("green", &[green.addr])], "");
    let proxy = start_proxy(&config).await;
    // 30 answers of which 10 are 500s, interleaved so that any interval they straddle
    // holds both kinds.
    for i in 0..30 {
        let path = if i % 3 == 2 { "/status/500" } else { "/" };
        let status = send(&client(), get(proxy.proxy_addr, path)).await.status;
        assert_eq!(status.as_u16(), if i % 3 == 2 { 500 } else { 200 });
    }
    let admin = proxy.admin_addr;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let view = loop {
        let (status, view) = common::admin(admin, "GET", "/api/v1/traffic", None, &[]).await;
        assert_eq!(status, StatusCode::OK);
        let counted: f64 = view["pools"]["blue"]
            .as_array()
            .map(|points| {
                points
                    .iter()
                    .map(|p| p["requests_per_second"].as_f64().unwrap())
                    .sum::<f64>()
                    * view["interval_seconds"].as_f64().unwrap()
            })
            .unwrap_or(0.0);
        // Each interval's rate is over its measured length, close to the nominal 2 s.
        if (counted - 30.0).abs() < 1.0 {
            break view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "30 requests not all counted in /api/v1/traffic: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let points = view["pools"]["blue"].as_array().unwrap();
    let busy: Vec<_> = points
        .iter()
        .filter(|p| p["requests_per_second"].as_f64().unwrap() > 0.0)
        .collect();
    for point in &busy {
        let errors = point["error_rate"].as_f64().unwrap();
        assert!(errors > 0.0 && errors < 1.0, "{point}");
        assert!(point["p99_seconds"].as_f64().unwrap() > 0.0, "{point}");
    }
    // A pool without traffic (green serves no service) has no points, or points of
    // zero without rates that would mean nothing.
    for point in view["pools"]["green"].as_array().into_iter().flatten() {
        assert_eq!(point["requests_per_second"], 0.0, "{point}");
        assert!(point.get("error_rate").is_none() && point.get("p99_seconds").is_none());
    }
    proxy.shutdown().await;
}
