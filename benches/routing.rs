//! The per-request routing decision: one `ArcSwap` load, the service match and the
//! backend pick. `cargo bench --bench routing`.

use std::hint::black_box;
use std::path::Path;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::balancer;
use switchyard::config::Config;
use switchyard::routing::RoutingTable;
use switchyard::state::TrafficState;

const CONFIG: &str = r#"
[pools.blue]
backends = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003", { addr = "127.0.0.1:9004", weight = 3 }]
[pools.green]
balance = "round_robin"
backends = ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103", { addr = "127.0.0.1:9104", weight = 3 }]
[pools.api]
backends = ["127.0.0.1:9201", "127.0.0.1:9202"]

[services.web]
active = "blue"
[services.shop]
hosts = ["shop.example.com", "*.shop.example.com"]
active = "green"
[services.api]
path_prefix = "/api/"
active = "api"
"#;

/// The table a fresh start builds from `config`, without metrics.
fn table_of(config: &Config) -> RoutingTable {
    RoutingTable::build(
        config,
        &switchyard::routing::PoolSettings::for_config(config, &Default::default()),
        &Default::default(),
        &TrafficState::from_config(config),
        None,
        None,
    )
}

fn routing(c: &mut Criterion) {
    let config = Config::parse(CONFIG, Path::new("bench.toml")).unwrap();
    let table = ArcSwap::from_pointee(table_of(&config));

    c.bench_function("arcswap_load", |b| {
        b.iter(|| black_box(table.load().services.len()))
    });
    c.bench_function("route_and_pick_p2c", |b| {
        b.iter(|| {
            let t = table.load();
            let service = t
                .route(black_box("www.example.com"), black_box("/index.html"))
                .unwrap();
            black_box(balancer::pick(&service.active, &[]))
        })
    });
    c.bench_function("route_and_pick_round_robin", |b| {
        b.iter(|| {
            let t = table.load();
            let service = t
                .route(black_box("eu.shop.example.com"), black_box("/cart"))
                .unwrap();
            black_box(balancer::pick(&service.active, &[]))
        })
    });
    c.bench_function("route_prefix_and_pick_p2c", |b| {
        b.iter(|| {
            let t = table.load();
            let service = t
                .route(black_box("www.example.com"), black_box("/api/users/42"))
                .unwrap();
            black_box(balancer::pick(&service.active, &[]))
        })
    });
}

/// The same decision in a table of 10,000 services (one host each, and 1,000 path
/// prefixes under one host): it should cost what it costs in a table of three.
fn routing_at_scale(c: &mut Criterion) {
    let mut text = String::new();
    for i in 0..10_000 {
        text.push_str(&format!(
            "[pools.p{i}]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n\
             [services.s{i}]\nactive = \"p{i}\"\nhosts = [\"s{i}.example.com\", \"*.w{i}.example.com\"]\n"
        ));
    }
    for i in 0..1_000 {
        text.push_str(&format!(
            "[services.prefix{i}]\nactive = \"p0\"\nhosts = [\"app.example.com\"]\npath_prefix = \"/p{i}/\"\n"
        ));
    }
    text.push_str("[services.any]\nactive = \"p0\"\n");
    let config = Config::parse(&text, Path::new("bench.toml")).unwrap();
    let table = table_of(&config);
    for (name, host, path) in [
        ("route_10000_exact", "s9999.example.com", "/"),
        ("route_10000_suffix", "www.w9999.example.com", "/"),
        ("route_10000_catch_all", "nobody.example.org", "/"),
        ("route_1000_prefixes", "app.example.com", "/p999/index.html"),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                black_box(
                    table
                        .route(black_box(host), black_box(path))
                        .map(|s| &s.name),
                )
            })
        });
    }
}

fn split(c: &mut Criterion) {
    use http::{HeaderMap, HeaderName, HeaderValue};
    use switchyard::split::{Split, StickyKey};
    let random = Split {
        weight: 1000,
        header: Some((
            HeaderName::from_static("x-canary"),
            HeaderValue::from_static("1"),
        )),
        cookie: None,
        sticky: None,
    };
    let sticky = Split {
        weight: 1000,
        header: None,
        cookie: None,
        sticky: Some(StickyKey::parse("cookie:session").unwrap()),
    };
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("www.example.com"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    headers.insert(
        "cookie",
        HeaderValue::from_static(
            "theme=dark; session=3f2a9c1e-77b4-4c0e-9a51-0d5e2b8c4f10; lang=en",
        ),
    );
    c.bench_function("split_random_with_header_rule", |b| {
        b.iter(|| black_box(random.to_canary(black_box(&headers))))
    });
    c.bench_function("split_sticky_cookie", |b| {
        b.iter(|| black_box(sticky.to_canary(black_box(&headers))))
    });
}

/// What metrics add to one request: a counter for its status code and a histogram
/// observation, through the children resolved at table-build time.
fn metrics(c: &mut Criterion) {
    use std::sync::Arc;
    use switchyard::metrics::{LiveState, Metrics};
    let config = Config::parse(CONFIG, Path::new("bench.toml")).unwrap();
    let table = Arc::new(table_of(&config));
    let metrics = Metrics::new(Arc::new(LiveState::default));
    let pool = &table.pools[0];
    let route = metrics.route(
        &"web".into(),
        &pool.name,
        pool.backends.iter().map(|b| &b.name),
    );
    c.bench_function("record_request_metrics", |b| {
        b.iter(|| {
            route.count(black_box(Some(1)), black_box(200));
            route.duration().observe(black_box(0.0007));
        })
    });
}

criterion_group!(benches, routing, routing_at_scale, split, metrics);
criterion_main!(benches);
