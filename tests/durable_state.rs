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
    let state_path: std::path::PathBuf = config
        .lines()
        .find_map(|l| l.strip_prefix("path = \""))
        .map(|p| p.trim_end_matches('"').into())
        .unwrap();

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
    assert_eq!(state["generation"], 0);
    assert_eq!(state["services"][0]["active"], "blue");
    let dir = state_path.parent().unwrap();
    let aside: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "corrupt file moved aside: {aside:?}");
    assert_eq!(
        send(&client(), get(third.proxy_addr, "/")).await.text(),
        "blue-1"
    );
    stop(third);
}
