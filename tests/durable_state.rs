//! Traffic state survives a restart of the real process; a corrupt state file is moved
//! aside and the proxy starts from the config.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::json;

fn stop(mut proxy: ProxyProcess) {
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_state_survives_a_restart_and_a_corrupt_file_is_moved_aside() {
    let blue = Upstream::start("blue-1").await;
    let green1 = Upstream::start("green-1").await;
    let green2 = Upstream::start("green-2").await;
    let config = config_text(
        "",
        &[
            ("blue", &[blue.addr]),
            ("green", &[green1.addr, green2.addr]),
        ],
        "",
    );
    let state_path = state_path_of(&config);

    let first = ProxyProcess::start(&config);
    let admin_addr = first.admin_addr;
    assert_eq!(
        admin(
            admin_addr,
            "POST",
            "/api/v1/services/app/switch",
            Some(json!({"to": "green"})),
            &[]
        )
        .await
        .0,
        StatusCode::OK
    );
    let drain = format!("/api/v1/pools/green/backends/{}/drain", green1.addr);
    assert_eq!(
        admin(admin_addr, "POST", &drain, None, &[]).await.0,
        StatusCode::OK
    );
    let canary = json!({"pool": "blue", "weight": 20, "sticky": "cookie:session"});
    assert_eq!(
        admin(
            admin_addr,
            "PUT",
            "/api/v1/services/app/canary",
            Some(canary),
            &[]
        )
        .await
        .0,
        StatusCode::OK
    );
    let (_, before) = admin(admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(before["generation"], 3);
    stop(first);

    let second = ProxyProcess::start(&config);
    let (_, after) = admin(second.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(after["generation"], 3);
    assert_eq!(after["services"][0]["active"], "green");
    assert_eq!(after["services"][0]["previous_active"], "blue");
    assert_eq!(
        after["services"][0]["canary"],
        before["services"][0]["canary"]
    );
    let green_pool = after["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "green")
        .unwrap();
    let drained = green_pool["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == green1.addr.to_string())
        .unwrap();
    assert_eq!(drained["state"], "draining");
    // Traffic follows the restored state: nothing reaches the drained backend.
    let hits_before = green1.hits();
    for _ in 0..30 {
        assert_eq!(
            send(&client(), get(second.proxy_addr, "/")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(green1.hits(), hits_before);
    // Rollback still knows where to go back to.
    let (status, body) = admin(
        second.admin_addr,
        "POST",
        "/api/v1/services/app/rollback",
        None,
        &[],
    )
    .await;
    assert_eq!(
        (status, body["active"].as_str()),
        (StatusCode::OK, Some("blue"))
    );
    stop(second);

    std::fs::write(&state_path, b"{\"generation\": 4, \"services\": tru").unwrap();
    let third = ProxyProcess::start(&config);
    let (status, state) = admin(third.admin_addr, "GET", "/api/v1/state", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    // Never a generation an earlier state had: a script's old If-Match cannot match.
    let generation = state["generation"].as_u64().unwrap();
    assert!(generation > 4, "generation {generation} reuses an old one");
    assert_eq!(state["services"][0]["active"], "blue");
    let corrupt = &state["state_file"]["corrupt_at_start"];
    assert_eq!(corrupt["restarted_at_generation"], generation, "{state}");
    assert!(
        corrupt["error"].as_str().unwrap().contains("line 1"),
        "{corrupt}"
    );
    let dir = state_path.parent().unwrap();
    let aside: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "corrupt file moved aside: {aside:?}");
    assert!(corrupt["moved_to"].as_str().unwrap().ends_with(&aside[0]));
    for old in ["3", "4"] {
        let (status, body) = admin(
            third.admin_addr,
            "POST",
            "/api/v1/services/app/switch",
            Some(json!({"to": "green"})),
            &[("if-match", old)],
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "If-Match {old}: {body}");
    }
    let metrics = send(&client(), get(third.admin_addr, "/metrics"))
        .await
        .text();
    assert!(
        metrics.contains("switchyard_state_file_corrupt_total 1"),
        "{metrics}"
    );
    assert_eq!(
        send(&client(), get(third.proxy_addr, "/")).await.text(),
        "blue-1"
    );
    stop(third);
}

/// kill -9 right after each acknowledged change: the change is on disk already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_change_survives_sigkill_straight_after_the_answer() {
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let config = config_text("", &[("blue", &[blue.addr]), ("green", &[green.addr])], "");
    let mut expected_active = "blue";
    for round in 1..=5u64 {
        let proxy = ProxyProcess::start(&config);
        let to = if expected_active == "blue" {
            "green"
        } else {
            "blue"
        };
        let (status, body) = admin(
            proxy.admin_addr,
            "POST",
            "/api/v1/services/app/switch",
            Some(json!({"to": to, "force": true})),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        proxy.signal("KILL");
        drop(proxy);
        expected_active = to;

        let restarted = ProxyProcess::start(&config);
        let (_, state) = admin(restarted.admin_addr, "GET", "/api/v1/state", None, &[]).await;
        assert_eq!(state["generation"], round, "round {round}: {state}");
        assert_eq!(
            state["services"][0]["active"], expected_active,
            "round {round}"
        );
        assert_eq!(
            send(&client(), get(restarted.proxy_addr, "/")).await.text(),
            format!("{expected_active}-1")
        );
        restarted.signal("KILL");
    }
}

/// A state file that is there but cannot be read is not "missing": starting would
/// overwrite it, so the start stops with a clear error.
#[test]
fn an_unreadable_state_file_stops_the_start_and_is_left_alone() {
    let config = config_text("", &[("blue", &["127.0.0.1:1".parse().unwrap()])], "");
    let state_path = state_path_of(&config);
    // A directory where the file should be: unreadable as a file, even for root.
    std::fs::create_dir_all(&state_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, &config).unwrap();
    let output = std::process::Command::new(binary())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started anyway: {stderr}");
    assert!(stderr.contains("cannot read the state file"), "{stderr}");
    assert!(
        stderr.contains(&state_path.display().to_string()),
        "{stderr}"
    );
    assert!(state_path.is_dir(), "left as it was");
}
