//! Binary upgrade of the real binary: the running process starts the executable at its
//! own path and hands it the listening sockets; under keep-alive load, with slow
//! requests in flight, no request fails, and a new binary that cannot start leaves the
//! old process serving.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// A copy of the switchyard binary in its own directory, so a test can install
/// "another version" at that path without touching the build's.
fn installed_copy(dir: &Path) -> PathBuf {
    let path = dir.join("switchyard");
    copy_out_of_process(&binary(), &path);
    path
}

/// Replaces the file at `path` with a copy of `source` the way an installer does: a new
/// file renamed over it (the running process keeps its own, now unlinked, executable).
fn install(path: &Path, source: &Path) {
    let staged = path.with_extension("new");
    copy_out_of_process(source, &staged);
    std::fs::rename(&staged, path).unwrap();
}

/// An executable script at `dir/name` that exits 3 at once.
fn script_exiting_at_once(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("exits-at-once");
    std::fs::write(&path, b"#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Copies by `cp`, not in this process: a descriptor of the copy open for writing here
/// is inherited by whatever another test forks at that moment, and until that child
/// execs, running the copy fails with "Text file busy" (ETXTBSY).
fn copy_out_of_process(from: &Path, to: &Path) {
    let status = Command::new("cp").arg(from).arg(to).status().unwrap();
    assert!(status.success(), "cp {} {}", from.display(), to.display());
}

/// Kills a process by pid when dropped (the new process of an upgrade is not a child
/// of the test).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}

async fn pid_serving_admin(admin_addr: std::net::SocketAddr) -> u64 {
    let (status, info) = admin(admin_addr, "GET", "/api/v1/info", None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    info["pid"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_fails_nothing_and_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let executable = installed_copy(dir.path());
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let text = config_text("", &[("blue", &[blue.addr]), ("green", &[green.addr])], "");
    let mut old = ProxyProcess::start_binary(&executable, &text);
    wait_ready(old.admin_addr).await;
    set_header_canary(old.admin_addr, "green").await;

    let load = LoadRun::start(old.proxy_addr, "/", 4);
    load.wait_for(200).await;
    let addr = old.proxy_addr;
    let slow: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { send(&client(), get(addr, "/slow/1500")).await }))
        .collect();
    eventually(
        Duration::from_secs(10),
        "slow requests to reach the backend",
        || blue.hits() > 200,
    )
    .await;
    // "A new version" installed at the path the process was started from.
    install(&executable, &binary());
    let out = Command::new(binary())
        .args([
            "ctl",
            "--admin",
            &format!("http://{}", old.admin_addr),
            "upgrade",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pid: u32 = stdout
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in `{stdout}`"));
    let _new = KillOnDrop(new_pid);
    assert_ne!(new_pid, old.pid());

    // The old process finishes its slow requests, then exits 0; the new one serves.
    for request in slow {
        assert_eq!(
            request.await.unwrap().status,
            StatusCode::OK,
            "a request in flight failed"
        );
    }
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "the old process exited with {status:?}");
    assert_eq!(pid_serving_admin(old.admin_addr).await, u64::from(new_pid));
    load.wait_for(300).await;
    // The runtime state came along: the canary still routes.
    let canary = canary_request(old.proxy_addr, "/");
    assert_eq!(
        send(&client(), canary).await.header("x-upstream"),
        Some("green-1")
    );

    // The new process can be upgraded in turn, by SIGUSR2.
    let status = Command::new("kill")
        .args(["-USR2", &new_pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let third = loop {
        let pid = pid_serving_admin(old.admin_addr).await;
        if pid != u64::from(new_pid) && !alive(new_pid) {
            break pid as u32;
        }
        assert!(Instant::now() < deadline, "SIGUSR2 did not hand over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _third = KillOnDrop(third);
    load.wait_for(300).await;
    let records = load.finish().await;
    assert_no_failures(&records);
    assert!(records.len() > 800, "only {} requests", records.len());
    assert!(
        old.log
            .wait_for("took over the listeners", Duration::from_secs(1))
            .is_some(),
        "the new process did not log the takeover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_binary_that_exits_at_once_leaves_the_old_process_serving() {
    let dir = tempfile::tempdir().unwrap();
    let executable = installed_copy(dir.path());
    let blue = Upstream::start("blue-1").await;
    let text = config_text("", &[("blue", &[blue.addr])], "");
    let proxy = ProxyProcess::start_binary(&executable, &text);
    wait_ready(proxy.admin_addr).await;
    let load = LoadRun::start(proxy.proxy_addr, "/", 4);
    load.wait_for(200).await;

    install(&executable, &script_exiting_at_once(dir.path()));
    for _ in 0..2 {
        let (status, answer) = admin(proxy.admin_addr, "POST", "/api/v1/upgrade", None, &[]).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
        assert_eq!(answer["code"], "upgrade_failed");
        assert!(
            answer["error"].as_str().unwrap().contains("exited"),
            "{answer}"
        );
    }
    // A new binary that starts but cannot serve (here: a config it refuses) says why.
    install(&executable, &binary());
    let config = proxy.dir.path().join("switchyard.toml");
    std::fs::write(&config, text.replace("[proxy]", "[proxy]\nlisen = 1")).unwrap();
    let (status, answer) = admin(proxy.admin_addr, "POST", "/api/v1/upgrade", None, &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("proxy.lisen"),
        "{answer}"
    );

    assert_eq!(
        pid_serving_admin(proxy.admin_addr).await,
        u64::from(proxy.pid())
    );
    // Changes work again: the state is not left frozen.
    let (status, answer) = admin(
        proxy.admin_addr,
        "POST",
        &format!("/api/v1/pools/blue/backends/{}/enable", blue.addr),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    load.wait_for(200).await;
    assert_no_failures(&load.finish().await);
    assert!(proxy
        .log
        .wait_for(
            "upgrade refused, this process keeps serving",
            Duration::from_secs(1)
        )
        .is_some());
}
