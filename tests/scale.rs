//! A table of thousands of services, on real sockets: every kind of route finds its
//! service (exact host, `*.suffix`, longest path prefix, catch-all), an admin change
//! reaches the request path while the rest keeps its route and counters, and the
//! scrape stays linear in services. Speed is measured by `benches/scale.sh`, not here.

mod common;

use std::net::SocketAddr;

use common::*;
use http::{Request, StatusCode};
use serde_json::json;

const EXACT: usize = 1000;
const SUFFIX: usize = 500;
const PREFIXES: usize = 500;

/// One pool per service (so the scrape has thousands of pools too), each on one of
/// four upstreams that name themselves in `x-upstream`.
fn big_config(upstreams: &[(&str, SocketAddr)]) -> String {
    let addr = |name: &str| upstreams.iter().find(|(n, _)| *n == name).unwrap().1;
    let mut extra = String::new();
    let mut service = |name: String, upstream: &str, hosts: &str, prefix: &str| {
        extra.push_str(&format!(
            "[pools.{name}]\nbackends = [\"{}\"]\n[services.{name}]\nactive = \"{name}\"\nhosts = [{hosts}]\npath_prefix = \"{prefix}\"\n",
            addr(upstream)
        ));
    };
    for i in 0..EXACT {
        service(
            format!("exact{i}"),
            "exact",
            &format!("\"s{i}.example.com\""),
            "/",
        );
    }
    for i in 0..SUFFIX {
        service(
            format!("suffix{i}"),
            "suffix",
            &format!("\"*.w{i}.example.com\""),
            "/",
        );
    }
    for i in 0..PREFIXES {
        service(
            format!("prefix{i}"),
            "prefix",
            "\"app.example.com\"",
            &format!("/p{i}/"),
        );
    }
    service("approot".into(), "prefix", "\"app.example.com\"", "/");
    extra.push_str("[services.app]\nactive = \"anything\"\nhosts = [\"*\"]\n");
    config_text(
        "",
        &[("anything", &[addr("any")]), ("spare", &[addr("any")])],
        &extra,
    )
}

async fn upstream_for(proxy: SocketAddr, host: &str, path: &str) -> String {
    let request = Request::get(format!("http://{proxy}{path}"))
        .header("host", host)
        .body(empty())
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::OK, "{host}{path}");
    answer.header("x-upstream").unwrap().to_string()
}

/// `switchyard_requests_total` of one service, summed over codes and backends.
fn requests_of(scrape: &str, service: &str) -> u64 {
    let label = format!("service=\"{service}\"");
    scrape
        .lines()
        .filter(|l| l.starts_with("switchyard_requests_total{") && l.contains(&label))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum()
}

async fn scrape(admin_addr: SocketAddr) -> String {
    let answer = send(&client(), get(admin_addr, "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_services_each_get_their_own_requests() {
    let mut upstreams = Vec::new();
    for name in ["exact", "suffix", "prefix", "any"] {
        upstreams.push(Upstream::start(name).await);
    }
    let named: Vec<(&str, SocketAddr)> = ["exact", "suffix", "prefix", "any"]
        .into_iter()
        .zip(upstreams.iter().map(|u| u.addr))
        .collect();
    let config = big_config(&named);
    check(&config).expect("the big config is valid");
    let proxy = start_proxy(&config).await;
    let at = proxy.proxy_addr;

    let cases = [
        ("s999.example.com", "/", "exact", "exact999"),
        ("S0.Example.COM", "/p1/x", "exact", "exact0"),
        ("x.w499.example.com", "/", "suffix", "suffix499"),
        ("deep.er.w7.example.com", "/", "suffix", "suffix7"),
        ("app.example.com", "/p499/x", "prefix", "prefix499"),
        ("app.example.com", "/p4/", "prefix", "prefix4"),
        ("app.example.com", "/p4", "prefix", "approot"),
        ("w3.example.com", "/", "any", "app"),
        ("nobody.example.org", "/p1/", "any", "app"),
    ];
    for (host, path, upstream, _) in cases {
        assert_eq!(upstream_for(at, host, path).await, upstream, "{host}{path}");
    }
    let text = scrape(proxy.admin_addr).await;
    for (host, path, _, service) in cases {
        assert!(
            requests_of(&text, service) >= 1,
            "{host}{path} was counted for {service}"
        );
    }
    assert_eq!(
        requests_of(&text, "exact998"),
        0,
        "no other service counted"
    );

    // One series per service for the traffic gauges, not one per service and pool.
    let services = EXACT + SUFFIX + PREFIXES + 2;
    let active_series = text
        .lines()
        .filter(|l| l.starts_with("switchyard_active_pool{"))
        .count();
    assert_eq!(active_series, services);

    // A change to one service reaches the request path; the others keep their route
    // and their counters.
    let (status, _) = admin(
        proxy.admin_addr,
        "PUT",
        "/api/v1/services/exact999/canary",
        Some(json!({"pool": "spare", "weight": 100})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream_for(at, "s999.example.com", "/").await, "any");
    assert_eq!(upstream_for(at, "s998.example.com", "/").await, "exact");
    assert_eq!(
        upstream_for(at, "app.example.com", "/p499/").await,
        "prefix"
    );
    let text = scrape(proxy.admin_addr).await;
    assert_eq!(
        requests_of(&text, "prefix499"),
        2,
        "kept across the rebuild"
    );
    assert!(text.contains("switchyard_canary_weight{pool=\"spare\",service=\"exact999\"} 100"));
    assert!(text.contains("switchyard_active_pool{pool=\"exact999\",service=\"exact999\"} 1"));

    // Back out: the canary's pool still reads 0 for the service rather than vanishing.
    let (status, _) = admin(
        proxy.admin_addr,
        "DELETE",
        "/api/v1/services/exact999/canary",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = scrape(proxy.admin_addr).await;
    assert!(text.contains("switchyard_canary_weight{pool=\"spare\",service=\"exact999\"} 0"));
    assert!(
        !text.contains("switchyard_canary_weight{pool=\"spare\",service=\"exact998\"}"),
        "a pool a service never used has no series for it"
    );
    proxy.shutdown().await;
}

#[test]
fn a_route_another_service_already_has_is_refused_by_name() {
    let config = config_text(
        "",
        &[("blue", &["127.0.0.1:1".parse().unwrap()])],
        "[services.a]\nactive = \"blue\"\nhosts = [\"x.example.com\", \"*.y.example.com\"]\npath_prefix = \"/v1/\"\n\
         [services.b]\nactive = \"blue\"\nhosts = [\"*.Y.example.com\"]\npath_prefix = \"/v1/\"\n",
    );
    let Err(error) = check(&config) else {
        panic!("two services with the same host and prefix were accepted");
    };
    assert!(
        error.to_string().contains("same requests as service `a`"),
        "{error}"
    );
}
