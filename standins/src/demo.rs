//! `switchyard demo`: stand-in app servers on every backend address of the config, so a
//! new user sees the proxy move traffic without deploying anything, and the guide it
//! prints.

use std::io::Write;
use std::net::SocketAddr;

use bytes::Bytes;
use tokio::net::TcpListener;

use crate::app::{AppServer, Identity};

/// A pool of the config, as far as the demo cares.
pub struct Pool {
    pub name: String,
    pub backends: Vec<SocketAddr>,
}

/// A service of the config: its name and active pool.
pub struct Service {
    pub name: String,
    pub active: String,
}

#[derive(Debug)]
pub struct DemoError {
    pool: String,
    addr: SocketAddr,
    source: std::io::Error,
}

impl std::fmt::Display for DemoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot start the stand-in app server for pool `{}` on {}: {}",
            self.pool, self.addr, self.source
        )
    }
}

impl std::error::Error for DemoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A stand-in greeting as `hello from NAME (ADDR)`; `/health` answers 503 while
/// `health_file` exists.
pub fn greeter(name: &str, addr: SocketAddr, health_file: Option<std::path::PathBuf>) -> Identity {
    Identity {
        name: name.to_string(),
        greeting: Some(Bytes::from(format!("hello from {name} ({addr})\n"))),
        health_file,
    }
}

/// Binds a stand-in on each backend address, named after its pool; they run until the
/// returned servers are dropped.
pub async fn start_app_servers(pools: &[Pool]) -> Result<Vec<AppServer>, DemoError> {
    let mut started = Vec::new();
    for pool in pools {
        for &addr in &pool.backends {
            let listener = TcpListener::bind(addr).await.map_err(|source| DemoError {
                pool: pool.name.clone(),
                addr,
                source,
            })?;
            started.push(AppServer::serve(greeter(&pool.name, addr, None), listener));
        }
    }
    Ok(started)
}

/// What to try next, printed once the proxy listens.
pub fn print_guide(pools: &[Pool], services: &[Service], proxy: SocketAddr, admin: SocketAddr) {
    let mut pool_lines = String::new();
    for pool in pools {
        let addrs: Vec<String> = pool.backends.iter().map(|b| b.to_string()).collect();
        pool_lines.push_str(&format!("  {:<8} {}\n", pool.name, addrs.join(" ")));
    }
    let service_list: Vec<String> = services
        .iter()
        .map(|s| format!("{} -> {}", s.name, s.active))
        .collect();
    let service = services.first().map_or("app", |s| s.name.as_str());
    let active = services.first().map_or("blue", |s| s.active.as_str());
    let other = pools
        .iter()
        .map(|p| p.name.as_str())
        .find(|p| *p != active)
        .unwrap_or("green");
    let backend = pools
        .iter()
        .find(|p| p.name == active)
        .and_then(|p| p.backends.first())
        .map_or_else(|| "127.0.0.1:9001".to_string(), |b| b.to_string());
    let ctl = if admin.to_string() == "127.0.0.1:9901" {
        "switchyard ctl".to_string()
    } else {
        format!("switchyard ctl --admin http://{admin}")
    };
    // A closed stdout must not stop the demo, so no println!.
    let _ = writeln!(
        std::io::stdout(),
        "\nswitchyard demo is running (Ctrl-C stops it).\n\
         stand-in app servers:\n{pool_lines}\
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
        service_list.join(", ")
    );
}
