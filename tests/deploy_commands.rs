//! The deploys as one command each, on real processes: `ctl roll` restarting stand-in
//! server processes under load, its failures and limits, `enable --wait-healthy`, the
//! preview route and `ctl release`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use switchyard_standins::app::Identity;

/// Health checks fast enough for a test: a restarted server is seen within ~200 ms.
const FAST_HEALTH: &str =
    "path = \"/health\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\njitter = \"10ms\"";

fn ctl(admin_addr: std::net::SocketAddr, args: &[&str]) -> Output {
    Command::new(binary())
        .args(["ctl", "--admin", &format!("http://{admin_addr}")])
        .args(args)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A pool of `ports.len()` stand-in server *processes* (`switchyard stand-in`), each
/// started by `start.sh PORT` and restarted by `restart.sh` (what `--exec` runs), with
/// their pids in `DIR/PORT.pid` and every restart logged in `DIR/log`.
struct Processes {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
}

impl Processes {
    fn start(count: usize) -> Processes {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let binary = binary();
        std::fs::write(
            dir.path().join("start.sh"),
            format!(
                "nohup {} stand-in --listen 127.0.0.1:$1 --name roll-$1 >/dev/null 2>&1 &\necho $! > {d}/$1.pid\n",
                binary.display()
            ),
        )
        .unwrap();
        // Stop the old process (waiting until it is gone, zombie or not), start anew.
        std::fs::write(
            dir.path().join("restart.sh"),
            format!(
                "set -e\nport=$SWITCHYARD_BACKEND_PORT\necho \"start $port\" >> {d}/log\nold=$(cat {d}/$port.pid)\nkill $old\nwhile kill -0 $old 2>/dev/null && ! grep -q '^State:.*Z' /proc/$old/status 2>/dev/null; do sleep 0.02; done\nsh {d}/start.sh $port\necho \"end $port\" >> {d}/log\necho restarted $SWITCHYARD_BACKEND\n"
            ),
        )
        .unwrap();
        let ports: Vec<u16> = (0..count)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        for port in &ports {
            let status = Command::new("sh")
                .arg(dir.path().join("start.sh"))
                .arg(port.to_string())
                .status()
                .unwrap();
            assert!(status.success());
        }
        let processes = Processes { dir, ports };
        for addr in processes.addrs() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(addr).is_err() {
                assert!(Instant::now() < deadline, "stand-in {addr} did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        processes
    }

    fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect()
    }

    fn pid(&self, port: u16) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{port}.pid")))
            .unwrap()
            .trim()
            .to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn restart_cmd(&self) -> String {
        format!("sh {}", self.dir.path().join("restart.sh").display())
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for port in &self.ports {
            let _ = Command::new("kill").arg(self.pid(*port)).status();
        }
    }
}

fn pool_config(pools: &[(&str, &[std::net::SocketAddr])], extra: &str) -> String {
    let mut text = config_text("", pools, extra);
    for (name, _) in pools {
        text = text.replace(
            &format!("[pools.{name}]\n"),
            &format!("[pools.{name}.health]\n{FAST_HEALTH}\n\n[pools.{name}]\n"),
        );
    }
    text
}

async fn backend_states(admin_addr: std::net::SocketAddr, pool: &str) -> Vec<(String, String)> {
    let (_, view) = admin(
        admin_addr,
        "GET",
        &format!("/api/v1/pools/{pool}"),
        None,
        &[],
    )
    .await;
    view["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["addr"].as_str().unwrap().to_string(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn run_ctl(admin_addr: std::net::SocketAddr, args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(admin_addr, &args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roll_restarts_every_backend_under_load_and_fails_nothing() {
    let servers = Processes::start(3);
    let addrs = servers.addrs();
    let proxy = start_proxy(&pool_config(&[("blue", &addrs)], "")).await;
    wait_ready(proxy.admin_addr).await;
    let pids_before: Vec<String> = servers.ports.iter().map(|p| servers.pid(*p)).collect();
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(200).await;

    let started = Instant::now();
    let out = run_ctl(
        proxy.admin_addr,
        &["roll", "blue", "--exec", &servers.restart_cmd()],
    )
    .await;
    let took = started.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    let output = text(&out);
    for addr in &addrs {
        assert!(
            output.contains(&format!("{addr} | restarted {addr}")),
            "{output}"
        );
        assert!(output.contains(&format!("enabled   {addr}")), "{output}");
    }
    load.wait_for(200).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    println!(
        "roll of 3 backends: {:.1}s, {} requests under load, 0 failed",
        took.as_secs_f64(),
        records.len()
    );
    let log = servers.log();
    for port in &servers.ports {
        assert_eq!(log.matches(&format!("start {port}\n")).count(), 1, "{log}");
    }
    for (port, before) in servers.ports.iter().zip(&pids_before) {
        assert_ne!(&servers.pid(*port), before, "{port} was not restarted");
    }
    let states = backend_states(proxy.admin_addr, "blue").await;
    assert!(states.iter().all(|(_, s)| s == "active"), "{states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_exec_stops_the_roll_with_that_backend_drained_and_the_rest_untouched() {
    let servers = Processes::start(3);
    let addrs = servers.addrs();
    let proxy = start_proxy(&pool_config(&[("blue", &addrs)], "")).await;
    wait_ready(proxy.admin_addr).await;
    let second = servers.ports[1];
    let third_pid = servers.pid(servers.ports[2]);
    let exec = format!(
        "if [ $SWITCHYARD_BACKEND_PORT = {second} ]; then echo broken >&2; exit 3; fi; {}",
        servers.restart_cmd()
    );
    let out = run_ctl(proxy.admin_addr, &["roll", "blue", "--exec", &exec]).await;
    assert!(!out.status.success());
    let output = text(&out);
    assert!(output.contains("exited with exit status: 3"), "{output}");
    assert!(
        output.contains(&format!("{} stays drained", addrs[1])),
        "{output}"
    );
    assert!(
        output.contains(&format!("--start-at {}", addrs[1])),
        "{output}"
    );
    let states = backend_states(proxy.admin_addr, "blue").await;
    assert_eq!(states[0].1, "active", "{states:?}");
    assert_eq!(states[1].1, "draining", "{states:?}");
    assert_eq!(states[2].1, "active", "{states:?}");
    assert_eq!(
        servers.pid(servers.ports[2]),
        third_pid,
        "the third was touched"
    );
    assert!(!servers
        .log()
        .contains(&format!("start {}", servers.ports[2])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_unavailable_takes_backends_two_at_a_time_and_never_empties_the_pool() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let addrs = [a.addr, b.addr, c.addr];
    let proxy = start_proxy(&pool_config(&[("blue", &addrs)], "")).await;
    wait_ready(proxy.admin_addr).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let exec = format!(
        "echo start $SWITCHYARD_BACKEND >> {0}; sleep 0.3; echo end $SWITCHYARD_BACKEND >> {0}",
        log.display()
    );
    let out = run_ctl(
        proxy.admin_addr,
        &[
            "roll",
            "blue",
            "--max-unavailable",
            "2",
            "--exec",
            &exec,
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(events.last().unwrap()["event"], "done");
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert!(
        lines[0].starts_with("start") && lines[1].starts_with("start"),
        "the first two did not run side by side: {lines:?}"
    );
    assert_eq!(lines.len(), 6, "{lines:?}");

    // Three at a time would leave nothing healthy in rotation: refused up front.
    let out = run_ctl(
        proxy.admin_addr,
        &["roll", "blue", "--max-unavailable", "3", "--exec", "true"],
    )
    .await;
    assert!(!out.status.success());
    assert!(text(&out).contains("refusing to drain"), "{}", text(&out));
    let states = backend_states(proxy.admin_addr, "blue").await;
    assert!(states.iter().all(|(_, s)| s == "active"), "{states:?}");
}

/// A stand-in whose /health fails while `DIR/fail-PORT` exists.
async fn with_health_file(name: &str, dir: &Path) -> (Upstream, PathBuf) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let file = dir.join(format!("fail-{port}"));
    let identity = Identity {
        name: name.to_string(),
        greeting: None,
        health_file: Some(file.clone()),
    };
    (Upstream::serve(identity, listener), file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stays_unhealthy_stops_the_roll_and_enable_can_wait_for_health() {
    let dir = tempfile::tempdir().unwrap();
    let (first, first_file) = with_health_file("a", dir.path()).await;
    let (second, _) = with_health_file("b", dir.path()).await;
    let proxy = start_proxy(&pool_config(&[("blue", &[first.addr, second.addr])], "")).await;
    wait_ready(proxy.admin_addr).await;
    // The "deploy" breaks the health check of the first backend.
    let exec = format!(
        "touch {}/fail-$SWITCHYARD_BACKEND_PORT",
        dir.path().display()
    );
    let out = run_ctl(
        proxy.admin_addr,
        &["roll", "blue", "--exec", &exec, "--health-timeout", "1s"],
    )
    .await;
    assert!(!out.status.success());
    assert!(text(&out).contains("health timeout"), "{}", text(&out));
    let states = backend_states(proxy.admin_addr, "blue").await;
    assert_eq!(states[0].1, "draining");
    assert_eq!(states[1].1, "active");

    let addr = first.addr.to_string();
    let out = run_ctl(
        proxy.admin_addr,
        &["enable", "blue", &addr, "--wait-healthy", "--timeout", "1s"],
    )
    .await;
    assert!(
        !out.status.success(),
        "enable --wait-healthy returned on an unhealthy backend"
    );
    std::fs::remove_file(&first_file).unwrap();
    let out = run_ctl(
        proxy.admin_addr,
        &["enable", "blue", &addr, "--wait-healthy"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("{addr}: healthy")),
        "{}",
        text(&out)
    );
    let out = run_ctl(proxy.admin_addr, &["wait-healthy", "blue", &addr]).await;
    assert!(out.status.success(), "{}", text(&out));
}

const PREVIEW: &str = "preview = { header = \"x-preview-pool\", pools = [\"green\"] }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preview_header_reaches_green_while_blue_is_active() {
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let extra = format!("[services.app]\nactive = \"blue\"\n{PREVIEW}");
    let proxy = start_proxy(&config_text(
        "",
        &[("blue", &[blue.addr]), ("green", &[green.addr])],
        &extra,
    ))
    .await;
    let previewed = |value: &str, path: &str| {
        http::Request::get(format!("http://{}{path}", proxy.proxy_addr))
            .header("x-preview-pool", value)
            .body(empty())
            .unwrap()
    };
    let answer = send(&client(), previewed("green", "/echo")).await;
    assert_eq!(answer.header("x-upstream"), Some("green-1"));
    assert!(
        answer.json()["headers"].get("x-preview-pool").is_none(),
        "the preview header was forwarded: {}",
        answer.text()
    );
    // Values that name no preview pool are ignored.
    for other in ["blue", "red", ""] {
        let answer = send(&client(), previewed(other, "/")).await;
        assert_eq!(answer.header("x-upstream"), Some("blue-1"), "{other}");
    }
    assert_eq!(
        send(&client(), get(proxy.proxy_addr, "/"))
            .await
            .header("x-upstream"),
        Some("blue-1")
    );
    let scrape = send(&client(), get(proxy.admin_addr, "/metrics"))
        .await
        .text();
    assert!(
        scrape.contains("switchyard_preview_requests_total{pool=\"green\",service=\"app\"} 1"),
        "{scrape}"
    );
    let (_, state) = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(state["services"][0]["preview"]["header"], "x-preview-pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_switches_only_after_its_test_passes_through_the_preview_route() {
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let extra = format!("[services.app]\nactive = \"blue\"\n{PREVIEW}");
    let text_config = pool_config(&[("blue", &[blue.addr]), ("green", &[green.addr])], &extra);
    let proxy = start_proxy(&text_config).await;
    wait_ready(proxy.admin_addr).await;
    let dir = tempfile::tempdir().unwrap();
    let deployed = dir.path().join("deployed");
    let seen = dir.path().join("env");
    let exec = format!("touch {}", deployed.display());

    let out = run_ctl(
        proxy.admin_addr,
        &[
            "release", "app", "--to", "green", "--exec", &exec, "--test", "exit 1",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(text(&out).contains("nothing switched"), "{}", text(&out));
    assert!(deployed.exists(), "the exec did not run");
    let active =
        |state: &serde_json::Value| state["services"][0]["active"].as_str().unwrap().to_string();
    let (_, state) = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(active(&state), "blue");

    let test = format!(
        "echo \"$SWITCHYARD_PROXY|$SWITCHYARD_PREVIEW_HEADER\" > {}",
        seen.display()
    );
    let out = run_ctl(
        proxy.admin_addr,
        &[
            "release", "app", "--to", "green", "--exec", &exec, "--test", &test,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("to roll back: switchyard ctl switch app blue"),
        "{}",
        text(&out)
    );
    let (_, state) = admin(proxy.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(active(&state), "green");
    let env = std::fs::read_to_string(&seen).unwrap();
    let (url, header) = env.trim().split_once('|').unwrap();
    assert_eq!(url, format!("http://{}", proxy.proxy_addr));
    assert_eq!(header, "x-preview-pool: green");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_roll_once_the_backend_in_hand_is_back() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let proxy = start_proxy(&pool_config(&[("blue", &[a.addr, b.addr, c.addr])], "")).await;
    wait_ready(proxy.admin_addr).await;
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let exec = format!("touch {}; sleep 0.5", started.display());
    let mut child = Command::new(binary())
        .args(["ctl", "--admin", &format!("http://{}", proxy.admin_addr)])
        .args(["roll", "blue", "--exec", &exec])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the first exec to start", || {
        started.exists()
    })
    .await;
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || {
        let _ = &mut child;
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let output = text(&out);
    assert!(
        output.contains(&format!("interrupted: rolled {}", a.addr)),
        "{output}"
    );
    assert!(
        output.contains(&format!("--start-at {}", b.addr)),
        "{output}"
    );
    let states = backend_states(proxy.admin_addr, "blue").await;
    assert!(states.iter().all(|(_, s)| s == "active"), "{states:?}");
}
