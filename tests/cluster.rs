//! A fleet on a real etcd (started by the test): several switchyard processes share one
//! traffic state. A change through one instance reaches the others; two racing
//! conditional changes through two instances: exactly one wins; a dead instance leaves
//! the member list; etcd down: serving goes on, changes are refused, then accepted.

mod common;

use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::*;
use http::StatusCode;
use serde_json::json;

fn fleet_config(etcd: &Etcd, name: &str, pools: &[(&str, &[std::net::SocketAddr])]) -> String {
    config_text(
        "",
        pools,
        &format!(
            "[cluster]\netcd = [\"{}\"]\nprefix = \"/test/\"\nname = \"{name}\"\nlease_ttl = \"2s\"\n",
            etcd.client_url
        ),
    )
}

/// `POST /api/v1/services/{service}/switch{query}` to `to`, through `addr`.
async fn switch(
    addr: std::net::SocketAddr,
    service: &str,
    to: &str,
    query: &str,
) -> (StatusCode, serde_json::Value) {
    admin(
        addr,
        "POST",
        &format!("/api/v1/services/{service}/switch{query}"),
        Some(json!({ "to": to })),
        &[],
    )
    .await
}

async fn get_json(addr: std::net::SocketAddr, path: &str) -> (StatusCode, serde_json::Value) {
    admin(addr, "GET", path, None, &[]).await
}

async fn generation(addr: std::net::SocketAddr) -> u64 {
    get_json(addr, "/api/v1/state").await.1["generation"]
        .as_u64()
        .unwrap()
}

async fn members(addr: std::net::SocketAddr) -> Vec<String> {
    let (_, view) = get_json(addr, "/api/v1/cluster").await;
    view["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_members(addr: std::net::SocketAddr, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = members(addr).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "members {now:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Blue and green stand-ins, and one switchyard process per name on `etcd`, ready.
struct Fleet {
    blue: Upstream,
    green: Upstream,
    instances: Vec<ProxyProcess>,
}

impl Fleet {
    async fn start(etcd: &Etcd, names: &[&str]) -> Fleet {
        let (blue, green) = (
            Upstream::start("blue-1").await,
            Upstream::start("green-1").await,
        );
        let mut instances = Vec::new();
        for name in names {
            instances.push(ProxyProcess::start(&fleet_config(
                etcd,
                name,
                &[("blue", &[blue.addr]), ("green", &[green.addr])],
            )));
        }
        for instance in &instances {
            wait_ready(instance.admin_addr).await;
        }
        Fleet {
            blue,
            green,
            instances,
        }
    }

    /// Another instance on the same etcd and stand-ins.
    fn another(&self, etcd: &Etcd, name: &str) -> ProxyProcess {
        ProxyProcess::start(&fleet_config(
            etcd,
            name,
            &[("blue", &[self.blue.addr]), ("green", &[self.green.addr])],
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_through_one_instance_reaches_the_others_under_load() {
    let etcd = Etcd::start();
    let fleet = Fleet::start(&etcd, &["lb-1", "lb-2", "lb-3"]).await;
    let [a, b, c] = &fleet.instances[..] else {
        unreachable!()
    };
    wait_members(a.admin_addr, &["lb-1", "lb-2", "lb-3"]).await;
    let (_, info) = get_json(b.admin_addr, "/api/v1/info").await;
    assert_eq!(info["cluster"]["connected"], true, "{info}");

    let load_b = LoadRun::start(b.proxy_addr, "/", 3);
    let load_c = LoadRun::start(c.proxy_addr, "/", 3);
    load_b.wait_for(200).await;
    let started = Instant::now();
    let (status, answer) = switch(a.admin_addr, "app", "green", "?wait=converged").await;
    let converged_in = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{answer}");
    let switched_at = answer["generation"].as_u64().unwrap();
    // Converged: every instance routes to green now.
    for p in [&b, &c] {
        assert_eq!(generation(p.admin_addr).await, switched_at);
        let answer = send(&client(), get(p.proxy_addr, "/")).await;
        assert_eq!(answer.header("x-upstream"), Some("green-1"));
    }
    let (status, converged) = get_json(
        c.admin_addr,
        &format!("/api/v1/cluster/converged?generation={switched_at}&timeout=5s"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{converged}");
    load_b.wait_for(200).await;
    let records: Vec<Record> = [load_b.finish().await, load_c.finish().await].concat();
    assert_no_failures(&records);
    println!(
        "switch through lb-1 converged on 3 instances in {:.1} ms; {} requests on lb-2 and lb-3, 0 failed",
        converged_in.as_secs_f64() * 1000.0,
        records.len()
    );
    // A generation no one reaches: 504, naming the laggards.
    let (status, answer) = get_json(
        a.admin_addr,
        &format!(
            "/api/v1/cluster/converged?generation={}&timeout=200ms",
            switched_at + 1000
        ),
    )
    .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{answer}");
    assert_eq!(answer["laggards"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racing_conditional_changes_through_two_instances_one_wins() {
    let etcd = Etcd::start();
    let fleet = Fleet::start(&etcd, &["lb-1", "lb-2"]).await;
    let [a, b] = &fleet.instances[..] else {
        unreachable!()
    };
    for round in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let current = loop {
            let (ga, gb) = (
                generation(a.admin_addr).await,
                generation(b.admin_addr).await,
            );
            if ga == gb {
                break ga;
            }
            assert!(Instant::now() < deadline, "the instances never agreed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let if_match = current.to_string();
        let to = if round % 2 == 0 { "green" } else { "blue" };
        let canary = json!({"pool": if to == "green" { "blue" } else { "green" }, "weight": 10});
        let condition = [("if-match", if_match.as_str())];
        let (first, second) = tokio::join!(
            admin(
                a.admin_addr,
                "POST",
                "/api/v1/services/app/switch",
                Some(json!({"to": to})),
                &condition,
            ),
            admin(
                b.admin_addr,
                "PUT",
                "/api/v1/services/app/canary",
                Some(canary),
                &condition,
            ),
        );
        let statuses = [first.0, second.0];
        assert_eq!(
            statuses.iter().filter(|s| **s == StatusCode::OK).count(),
            1,
            "round {round}: {first:?} {second:?}"
        );
        let loser = if first.0 == StatusCode::OK {
            &second
        } else {
            &first
        };
        assert_eq!(loser.0, StatusCode::CONFLICT, "{loser:?}");
        // Clear the canary, if it won, for the next round.
        let _ = admin(
            b.admin_addr,
            "DELETE",
            "/api/v1/services/app/canary",
            None,
            &[],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_keeps_serving_refuses_changes_then_accepts_them() {
    let mut etcd = Etcd::start();
    let mut fleet = Fleet::start(&etcd, &["lb-1", "lb-2"]).await;
    let mut b = fleet.instances.pop().unwrap();
    let a = &fleet.instances[0];
    wait_members(a.admin_addr, &["lb-1", "lb-2"]).await;

    // SIGKILL of an instance: its entry expires with its lease.
    b.signal("KILL");
    b.wait_exit(Duration::from_secs(5));
    wait_members(a.admin_addr, &["lb-1"]).await;

    let load = LoadRun::start(a.proxy_addr, "/", 3);
    load.wait_for(100).await;
    etcd.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let (status, answer) = switch(a.admin_addr, "app", "green", "").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "changes still accepted without etcd: {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused["code"], "cluster-unavailable", "{refused}");
    let scrape = send(&client(), get(a.admin_addr, "/metrics")).await.text();
    assert!(
        scrape.contains("switchyard_cluster_connected 0"),
        "{scrape}"
    );
    load.wait_for(200).await;
    assert_eq!(
        send(&client(), get(a.proxy_addr, "/"))
            .await
            .header("x-upstream"),
        Some("blue-1"),
        "the last applied state serves"
    );

    // An instance started while etcd is down serves from its cache.
    let c = fleet.another(&etcd, "lb-3");
    wait_ready(c.admin_addr).await;
    assert_eq!(
        send(&client(), get(c.proxy_addr, "/")).await.status,
        StatusCode::OK
    );

    etcd.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = switch(a.admin_addr, "app", "green", "").await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "changes still refused after etcd came back: {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The instance that started during the outage joins and applies the change.
    let deadline = Instant::now() + Duration::from_secs(30);
    while send(&client(), get(c.proxy_addr, "/"))
        .await
        .header("x-upstream")
        != Some("green-1")
    {
        assert!(Instant::now() < deadline, "lb-3 never applied the change");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_no_failures(&load.finish().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_drained_waits_for_requests_in_flight_on_other_instances() {
    let etcd = Etcd::start();
    let (first, second) = (
        Upstream::start("blue-1").await,
        Upstream::start("blue-2").await,
    );
    let config = |name: &str| fleet_config(&etcd, name, &[("blue", &[first.addr, second.addr])]);
    let a = ProxyProcess::start(&config("lb-1"));
    let b = ProxyProcess::start(&config("lb-2"));
    wait_ready(a.admin_addr).await;
    wait_ready(b.admin_addr).await;
    wait_members(a.admin_addr, &["lb-1", "lb-2"]).await;
    // Slow requests through lb-2 only.
    let proxy_b = b.proxy_addr;
    let slow: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let answer = send(&client(), get(proxy_b, "/slow/1500")).await;
                (answer.status, Instant::now())
            })
        })
        .collect();
    let target = first.addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, state) = get_json(b.admin_addr, "/api/v1/pools/blue").await;
        let busy = state["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["addr"] == target.as_str() && x["in_flight"].as_u64() > Some(0));
        if busy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slow request reached {target} through lb-2"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let base = format!("/api/v1/pools/blue/backends/{target}");
    let (status, answer) = admin(a.admin_addr, "POST", &format!("{base}/drain"), None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // lb-1 itself has nothing in flight on it; lb-2 has.
    let (status, answer) =
        get_json(a.admin_addr, &format!("{base}/wait-drained?timeout=200ms")).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("lb-2"),
        "{answer}"
    );
    let (status, answer) =
        get_json(a.admin_addr, &format!("{base}/wait-drained?timeout=20s")).await;
    let returned = Instant::now();
    assert_eq!(status, StatusCode::OK, "{answer}");
    for request in slow {
        let (status, finished) = request.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(
            finished <= returned,
            "wait-drained returned while lb-2 still had requests in flight"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_frozen_through_a_compaction_reads_the_whole_state_again() {
    let etcd = Etcd::start();
    let fleet = Fleet::start(&etcd, &["lb-1", "lb-2"]).await;
    let [a, b] = &fleet.instances[..] else {
        unreachable!()
    };
    wait_members(a.admin_addr, &["lb-1", "lb-2"]).await;
    b.signal("STOP");
    let mut last = 0;
    for to in ["green", "blue", "green"] {
        let (status, answer) = switch(a.admin_addr, "app", to, "").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        last = answer["generation"].as_u64().unwrap();
    }
    let compacted = etcd.etcdctl(&["compact", &last.to_string()]);
    assert!(
        compacted.status.success(),
        "{}",
        String::from_utf8_lossy(&compacted.stderr)
    );
    b.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    while generation(b.admin_addr).await < last {
        assert!(
            Instant::now() < deadline,
            "lb-2 did not catch up after the compaction"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = send(&client(), get(b.proxy_addr, "/")).await;
    assert_eq!(answer.header("x-upstream"), Some("green-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_an_etcd_that_wants_tls_client_certificates() {
    use common::tls::TestCa;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("etcd CA");
    let ca_file = ca.write(dir.path());
    let (server_cert, server_key) = ca
        .issue(&["127.0.0.1", "localhost"])
        .write(dir.path(), "etcd");
    let (client_cert, client_key) = ca.issue_client("switchyard").write(dir.path(), "client");
    let etcd = Etcd::start_tls(&ca_file, &server_cert, &server_key);
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let config = fleet_config(
        &etcd,
        "lb-tls",
        &[("blue", &[blue.addr]), ("green", &[green.addr])],
    )
    .replace(
        "lease_ttl = \"2s\"\n",
        &format!(
            "lease_ttl = \"2s\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            ca_file.display(),
            client_cert.display(),
            client_key.display()
        ),
    );
    let proxy = ProxyProcess::start(&config);
    wait_ready(proxy.admin_addr).await;
    wait_members(proxy.admin_addr, &["lb-tls"]).await;
    let (status, answer) = switch(proxy.admin_addr, "app", "green", "").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, view) = get_json(proxy.admin_addr, "/api/v1/cluster").await;
    assert_eq!(view["connected"], true, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_an_etcd_with_authentication() {
    let mut etcd = Etcd::start();
    for args in [
        &["user", "add", "root", "--new-user-password=s3cret"][..],
        &["auth", "enable"][..],
    ] {
        let out = etcd.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let blue = Upstream::start("blue-1").await;
    let green = Upstream::start("green-1").await;
    let config = fleet_config(
        &etcd,
        "lb-auth",
        &[("blue", &[blue.addr]), ("green", &[green.addr])],
    );
    let with_password = config.replace(
        "lease_ttl = \"2s\"\n",
        &format!(
            "lease_ttl = \"2s\"\nusername = \"root\"\npassword_file = \"{}\"\n",
            password.display()
        ),
    );
    let proxy = ProxyProcess::start(&with_password);
    wait_ready(proxy.admin_addr).await;
    wait_members(proxy.admin_addr, &["lb-auth"]).await;
    let (status, answer) = switch(proxy.admin_addr, "app", "green", "").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // Started while etcd is down, an instance serves, refuses changes, then joins.
    etcd.kill();
    let late = ProxyProcess::start(&with_password.replace("lb-auth", "lb-late"));
    wait_ready(late.admin_addr).await;
    assert_eq!(
        send(&client(), get(late.proxy_addr, "/")).await.status,
        StatusCode::OK
    );
    let (status, answer) = switch(late.admin_addr, "app", "blue", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["code"], "cluster-unavailable");
    etcd.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while send(&client(), get(late.proxy_addr, "/"))
        .await
        .header("x-upstream")
        != Some("green-1")
    {
        assert!(Instant::now() < deadline, "the late instance never joined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Without the password etcd refuses, and switchyard says so at start.
    std::fs::write(&password, "wrong\n").unwrap();
    // Bounded: an instance that took the refusal for an outage would run on.
    let mut command = std::process::Command::new("timeout");
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, &with_password).unwrap();
    command
        .arg("20")
        .arg(binary())
        .args(["run", "--config"])
        .arg(&path);
    let out = command.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cluster"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_config_lags_keeps_what_it_does_not_know() {
    let etcd = Etcd::start();
    let (blue, green) = (
        Upstream::start("blue-1").await,
        Upstream::start("green-1").await,
    );
    let pools: &[(&str, &[std::net::SocketAddr])] =
        &[("blue", &[blue.addr]), ("green", &[green.addr])];
    // lb-1 knows a service `api` that lb-2 (an older config) does not.
    let newer = fleet_config(&etcd, "lb-1", pools)
        + "[services.api]\npath_prefix = \"/api\"\nactive = \"green\"\n";
    let a = ProxyProcess::start(&newer);
    let b = ProxyProcess::start(&fleet_config(&etcd, "lb-2", pools));
    wait_ready(a.admin_addr).await;
    wait_ready(b.admin_addr).await;
    let (status, answer) = switch(a.admin_addr, "api", "blue", "?wait=converged").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // A change through lb-2 writes the whole state: `api` must survive it.
    let (status, answer) = switch(b.admin_addr, "app", "green", "?wait=converged").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, state) = get_json(a.admin_addr, "/api/v1/state").await;
    let api = state["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "api")
        .cloned()
        .expect("api is gone from lb-1");
    assert_eq!(api["active"], "blue", "{state}");
    let app = state["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "app")
        .unwrap()
        .clone();
    assert_eq!(app["active"], "green");
}

/// The rollout of `app`, through `addr`, once `done` says so.
async fn rollout_until(
    addr: std::net::SocketAddr,
    limit: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let (_, view) = get_json(addr, "/api/v1/services/app/rollout").await;
        if done(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which of `instances` logged that it drives the fleet's rollouts.
fn driver_of(instances: &[ProxyProcess]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let driving: Vec<usize> = (0..instances.len())
            .filter(|&i| {
                instances[i]
                    .log
                    .lines()
                    .iter()
                    .any(|l| l.contains("drives the fleet's rollouts"))
            })
            .collect();
        if let [one] = driving[..] {
            return one;
        }
        assert!(driving.len() < 2, "two instances drive rollouts");
        assert!(Instant::now() < deadline, "no instance drives rollouts");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_drives_a_rollout_on_the_whole_fleets_counts_and_another_takes_over() {
    let etcd = Etcd::start();
    let mut fleet = Fleet::start(&etcd, &["lb-1", "lb-2"]).await;
    wait_members(fleet.instances[0].admin_addr, &["lb-1", "lb-2"]).await;
    let driver = driver_of(&fleet.instances);
    let other = 1 - driver;
    let (driver_addr, other_admin, other_proxy) = (
        fleet.instances[driver].admin_addr,
        fleet.instances[other].admin_addr,
        fleet.instances[other].proxy_addr,
    );
    // All traffic through the instance that does not drive: the driver's own counts
    // are 0, so only the fleet's counts can make a window conclusive.
    let load = LoadRun::start(other_proxy, "/", 4);
    load.wait_for(100).await;
    let (status, started) = admin(
        other_admin,
        "POST",
        "/api/v1/services/app/rollout",
        Some(
            json!({"pool": "green", "steps": [20, 60, 100], "hold": "600ms",
            "analysis": {"interval": "300ms", "min_requests": 20}}),
        ),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let ended = rollout_until(driver_addr, Duration::from_secs(30), "the promotion", |v| {
        v["status"] != "progressing"
    })
    .await;
    assert_eq!(ended["status"], "promoted", "{ended:#}");
    let judged = ended["results"].as_array().unwrap();
    assert!(
        judged
            .iter()
            .any(|w| w["verdict"] == "pass" && w["canary"]["requests"].as_u64() >= Some(20)),
        "judged on the other instance's requests: {ended:#}"
    );
    let (_, history) = get_json(other_admin, "/api/v1/services/app/history").await;
    let kinds: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    // Each move made once, by one instance.
    assert_eq!(
        kinds
            .iter()
            .filter(|k| k.starts_with("rollout_"))
            .copied()
            .collect::<Vec<_>>(),
        [
            "rollout_start",
            "rollout_step",
            "rollout_step",
            "rollout_promote"
        ],
        "{kinds:?}"
    );

    // The driver dies mid-rollout: the other instance takes the seat and finishes it.
    let (status, started) = admin(
        other_admin,
        "POST",
        "/api/v1/services/app/rollout",
        Some(json!({"pool": "blue", "steps": [30, 100], "hold": "1500ms",
            "analysis": {"interval": "300ms", "min_requests": 20}})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    // Windows are judged (and shown) where the rollout is driven.
    let judging = rollout_until(
        driver_addr,
        Duration::from_secs(10),
        "a judged window",
        |v| !v["results"].as_array().is_none_or(|r| r.is_empty()) || v["status"] != "progressing",
    )
    .await;
    assert_eq!(judging["status"], "progressing", "{judging:#}");
    let _ = fleet.instances[driver].child.kill();
    let _ = fleet.instances[driver].child.wait();
    let ended = rollout_until(other_admin, Duration::from_secs(30), "the promotion", |v| {
        v["status"] != "progressing"
    })
    .await;
    assert_eq!(ended["status"], "promoted", "{ended:#}");
    let log = fleet.instances[other].log.lines();
    assert!(
        log.iter()
            .any(|l| l.contains("drives the fleet's rollouts")),
        "{}",
        log.join("\n")
    );
    let records = load.finish().await;
    assert_no_failures(&records);
}
