//! `switchyard demo`: stand-in app servers on every backend address of the config, so a
//! new user sees the proxy move traffic without deploying anything.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
#[error("cannot start the stand-in app server for pool `{pool}` on {addr}: {source}")]
pub struct DemoError {
    pool: String,
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds a tiny app server on each backend address; each answers with its pool and
/// address, and `/health` with 200.
pub async fn start_app_servers(config: &Config) -> Result<Vec<SocketAddr>, DemoError> {
    let mut started = Vec::new();
    for pool in &config.pools {
        for backend in &pool.backends {
            let listener = TcpListener::bind(backend.addr)
                .await
                .map_err(|source| DemoError {
                    pool: pool.name.clone(),
                    addr: backend.addr,
                    source,
                })?;
            let greeting = Bytes::from(format!("hello from {} ({})\n", pool.name, backend.addr));
            tokio::spawn(serve(listener, greeting, None));
            started.push(backend.addr);
        }
    }
    Ok(started)
}

/// Serves the stand-in app on `listener` until the task is dropped. `/health` answers
/// 200, or 503 while `health_file` exists (a maintenance switch for demos and tests).
pub async fn serve(listener: TcpListener, greeting: Bytes, health_file: Option<Arc<PathBuf>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let greeting = greeting.clone();
        let health_file = health_file.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = if req.uri().path() == "/health" {
                    if health_file.as_deref().is_some_and(|f| f.exists()) {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"failing\n")));
                        *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        r
                    } else {
                        Response::new(Full::new(Bytes::from_static(b"ok\n")))
                    }
                } else {
                    Response::new(Full::new(greeting.clone()))
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

pub fn print_guide(config: &Config, proxy: SocketAddr, admin: SocketAddr) {
    let mut pools = String::new();
    for pool in &config.pools {
        let addrs: Vec<String> = pool.backends.iter().map(|b| b.addr.to_string()).collect();
        pools.push_str(&format!("  {:<8} {}\n", pool.name, addrs.join(" ")));
    }
    let services: Vec<String> = config
        .services
        .iter()
        .map(|s| format!("{} -> {}", s.name, s.active))
        .collect();
    let service = config.services.first().map_or("app", |s| s.name.as_str());
    let active = config
        .services
        .first()
        .map_or("blue", |s| s.active.as_str());
    let other = config
        .pools
        .iter()
        .map(|p| p.name.as_str())
        .find(|p| *p != active)
        .unwrap_or("green");
    let backend = config
        .pools
        .iter()
        .find(|p| p.name == active)
        .and_then(|p| p.backends.first())
        .map_or_else(|| "127.0.0.1:9001".to_string(), |b| b.addr.to_string());
    let ctl = if admin.to_string() == "127.0.0.1:9901" {
        "switchyard ctl".to_string()
    } else {
        format!("switchyard ctl --admin http://{admin}")
    };
    // A closed stdout must not stop the demo, so no println!.
    let _ = writeln!(
        std::io::stdout(),
        "\nswitchyard demo is running (Ctrl-C stops it).\n\
         stand-in app servers:\n{pools}\
         services: {}\n\n\
         try (in another terminal; `switchyard` is target/release/switchyard):\n  \
         curl -s http://{proxy}/                 (answered by the active pool)\n  \
         {ctl} status\n  \
         {ctl} canary {service} {other} 10       (10% of requests to {other})\n  \
         {ctl} promote {service}                 ({other} takes all traffic)\n  \
         {ctl} rollback {service}                (back to {active})\n  \
         {ctl} switch {service} {other}          (blue-green cutover)\n  \
         {ctl} drain {active} {backend} --wait\n  \
         curl -s http://{admin}/api/v1/state\n",
        services.join(", ")
    );
}
