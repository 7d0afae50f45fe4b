//! `switchyard ctl` against a running proxy: what a deploy script sees on stdout,
//! stderr and in the exit status.

mod common;

use std::process::Command;

use common::*;

fn ctl(admin: std::net::SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary())
        .arg("ctl")
        .arg("--admin")
        .arg(format!("http://{admin}"))
        .args(args)
        .env_remove("SWITCHYARD_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_drives_a_deploy_and_fails_loudly() {
    let bg = BlueGreen::start(2, "", "").await;
    let admin = bg.admin();
    let blocking = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ctl(admin, &args)
        })
    };
    let run = |args: &[&str]| blocking(args.iter().map(|s| s.to_string()).collect());

    let (ok, out, err) = run(&["status"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("SERVICE") && out.contains("app      blue"),
        "{out}"
    );
    assert!(out.contains(&bg.blue[0].addr.to_string()), "{out}");

    let (ok, out, err) = run(&[
        "canary",
        "app",
        "green",
        "12.5",
        "--sticky",
        "header:x-user",
        "--header",
        "x-canary=1",
    ])
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("canary green 12.5% header x-canary=1 sticky header:x-user"),
        "{out}"
    );

    let (ok, out, _) = run(&["promote", "app"]).await.unwrap();
    assert!(ok);
    assert!(out.starts_with("app: active green, canary -"), "{out}");

    let (ok, out, _) = run(&["--json", "status"]).await.unwrap();
    assert!(ok);
    let state: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(state["services"][0]["active"], "green");

    let (ok, out, _) = run(&["history", "app"]).await.unwrap();
    assert!(ok);
    assert!(out.contains("canary") && out.contains("promote"), "{out}");

    let (ok, out, _) = run(&["rollback", "app"]).await.unwrap();
    assert!(ok);
    assert!(out.starts_with("app: active blue"), "{out}");

    let backend = bg.blue[0].addr.to_string();
    let (ok, out, err) = run(&["drain", "blue", &backend, "--wait", "--timeout", "5s"])
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("drained, nothing in flight"), "{out}");
    let (ok, out, _) = run(&["enable", "blue", &backend]).await.unwrap();
    assert!(ok);
    assert!(out.contains(": active,"), "{out}");

    let (ok, _, err) = run(&["switch", "app", "purple"]).await.unwrap();
    assert!(!ok);
    assert!(err.contains("404") && err.contains("unknown_pool"), "{err}");
    let (ok, _, err) = run(&["canary", "app", "green", "150"]).await.unwrap();
    assert!(!ok);
    assert!(err.contains("400"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_uses_the_token_and_reports_an_unreachable_api() {
    let dir = state_dir();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "tok-123").unwrap();
    let bg = BlueGreen::start(1, "", &format!("token_file = \"{}\"", token_file.display())).await;
    let admin = bg.admin();
    let (ok, _, err) = tokio::task::spawn_blocking(move || ctl(admin, &["status"]))
        .await
        .unwrap();
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        ctl(admin, &["--token", "tok-123", "switch", "app", "green"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("active green"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .args(["ctl", "--admin", &format!("http://{admin}"), "status"])
            .env("SWITCHYARD_TOKEN", "tok-123")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "token from SWITCHYARD_TOKEN");

    // Nothing listens on a bound-but-not-listening port.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = socket.local_addr().unwrap();
    let (ok, _, err) = tokio::task::spawn_blocking(move || ctl(dead, &["status"]))
        .await
        .unwrap();
    assert!(!ok);
    assert!(err.contains("cannot reach the admin API"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_shows_and_reloads_certificates() {
    let upstream = Upstream::start("blue-1").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new("ca");
    let pair = ca
        .issue(&["app.test", "www.app.test"])
        .write(dir.path(), "app");
    let keys = common::tls::tls_table(&[pair], "reload_interval = \"0s\"");
    let proxy = start_proxy(&config_text(&keys, &[("blue", &[upstream.addr])], "")).await;
    let admin = proxy.admin_addr;
    let run = |args: &'static [&'static str]| tokio::task::spawn_blocking(move || ctl(admin, args));

    let (ok, out, err) = run(&["tls"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("app.pem") && out.contains("app.test,www.app.test"),
        "{out}"
    );

    ca.issue(&["app.test"]).write(dir.path(), "app");
    let (ok, out, err) = run(&["tls", "reload"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("app.pem") && !out.contains("www.app.test"),
        "{out}"
    );

    std::fs::write(dir.path().join("app.key"), "garbage").unwrap();
    let (ok, _, err) = run(&["tls", "reload"]).await.unwrap();
    assert!(!ok);
    assert!(
        err.contains("app.key") && err.contains("previous certificates stay"),
        "{err}"
    );
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_switchyard()"),
        ("zsh", "#compdef switchyard"),
        ("fish", "complete -c switchyard"),
    ] {
        let out = std::process::Command::new(binary())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains(marker),
            "{shell}: {}",
            &script[..script.len().min(200)]
        );
        assert!(script.contains("ctl"), "{shell} completes no ctl");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_output_to_a_pipe_has_no_terminal_escapes() {
    let blue = Upstream::start("blue-1").await;
    let proxy = start_proxy(&config_text("", &[("blue", &[blue.addr])], "")).await;
    let admin_url = format!("http://{}", proxy.admin_addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary())
            .args(["ctl", "--admin", &admin_url, "status"])
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    assert!(!out.stdout.contains(&0x1b), "an escape sequence on a pipe");
    assert!(String::from_utf8_lossy(&out.stdout).contains("blue"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_rollout_waits_for_the_verdict_and_ctl_mirror_sets_and_stops_a_mirror() {
    let bg = BlueGreen::start(1, "", "").await;
    let admin = bg.admin();
    let run = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ctl(admin, &args)
        })
    };
    let load = LoadRun::start(bg.addr(), "/", 2);
    let (ok, out, err) = run(&[
        "rollout",
        "app",
        "green",
        "--steps",
        "20,100",
        "--hold",
        "300ms",
        "--interval",
        "150ms",
        "--min-requests",
        "5",
        "--max-error-rate",
        "1%",
        "--wait",
    ])
    .await
    .unwrap();
    assert!(ok, "{out}{err}");
    assert!(out.contains("step 1: 20% to green"), "{out}");
    assert!(
        out.contains(" pass "),
        "each window is printed as it is judged: {out}"
    );
    assert!(
        out.contains("rollout to green promoted at step 2 of 2"),
        "{out}"
    );
    let (ok, out, _) = run(&["rollout", "status", "app"]).await.unwrap();
    assert!(ok && out.contains("promoted"), "{out}");
    load.finish().await;

    // Every answer a 503: the canary fails its first window, and --wait exits 1.
    let failing = LoadRun::start(bg.addr(), "/status/503", 2);
    let (ok, out, err) = run(&[
        "rollout",
        "app",
        "blue",
        "--steps",
        "50",
        "--interval",
        "150ms",
        "--min-requests",
        "5",
        "--max-error-rate",
        "1%",
        "--wait",
    ])
    .await
    .unwrap();
    failing.finish().await;
    assert!(!ok, "{out}");
    assert!(err.contains("ended rolled_back"), "{err}");
    assert!(out.contains("above max_error_rate 1.00%"), "{out}");

    let (ok, out, err) = run(&["mirror", "app", "blue", "10"]).await.unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("active green, canary -, mirror blue 10%"),
        "{out}"
    );
    let (ok, out, _) = run(&["mirror", "off", "app"]).await.unwrap();
    assert!(ok && !out.contains("mirror"), "{out}");
    let (ok, _, err) = run(&["rollout", "pause", "app"]).await.unwrap();
    assert!(!ok && err.contains("has ended (rolled_back)"), "{err}");
}
