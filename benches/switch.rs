//! How long a blue-green switch takes end to end on this machine: the admin call
//! (validate, fsync the state file, swap the table) and the first request after it
//! returns, which must already be served by green. Real sockets on 127.0.0.1.
//!
//! `cargo bench --bench switch` (set SWITCHES to change the count, default 200).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

async fn app_server(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|_req| async move {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        name.as_bytes(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run briefly.
    let quick = !std::env::args().any(|a| a == "--bench");
    let switches: usize = std::env::var("SWITCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 5 } else { 200 });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let blue = app_server("blue").await;
        let green = app_server("green").await;
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n\
             [pools.blue]\nbackends = [\"{blue}\"]\n[pools.green]\nbackends = [\"{green}\"]\n[services.app]\nactive = \"blue\"\n",
            dir.path().join("state.json").display()
        );
        let config = switchyard::config::Config::parse(&config, std::path::Path::new("bench.toml")).unwrap();
        let running = switchyard::server::start(config).await.unwrap();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut calls = Vec::with_capacity(switches);
        let mut to_first_request = Vec::with_capacity(switches);
        for i in 0..switches {
            let to = if i % 2 == 0 { "green" } else { "blue" };
            let started = Instant::now();
            let request = hyper::Request::post(format!("http://{}/api/v1/services/app/switch", running.admin_addr))
                .body(Full::new(Bytes::from(format!("{{\"to\": \"{to}\"}}"))))
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert!(response.status().is_success());
            response.into_body().collect().await.unwrap();
            let returned = Instant::now();
            let answer = client
                .request(hyper::Request::get(format!("http://{}/", running.proxy_addr)).body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap()
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(&answer[..], to.as_bytes(), "the first request after the switch went to the new pool");
            calls.push(returned - started);
            to_first_request.push(returned.elapsed());
        }
        calls.sort();
        to_first_request.sort();
        println!("admin switch, {switches} switches (state file fsync included):");
        for (name, samples) in [("switch call", &calls), ("call returned -> first request answered by new pool", &to_first_request)] {
            println!(
                "  {name}: p50 {:?}  p99 {:?}  max {:?}",
                percentile(samples, 0.5),
                percentile(samples, 0.99),
                samples[samples.len() - 1]
            );
        }
        running.shutdown().await;
    });
}
