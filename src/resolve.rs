//! Host names of backends to addresses: the `[proxy] hosts_file` first, when there is
//! one (read again at every lookup, so an edit is seen at the next refresh), then the
//! system resolver (getaddrinfo on a blocking thread, as tokio's `lookup_host` does),
//! each lookup bounded by a timeout. Never on the request path: the control plane
//! resolves on its own schedule and swaps the routing table.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Longest wait for one name.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default)]
pub struct Resolver {
    hosts_file: Option<PathBuf>,
}

impl Resolver {
    pub fn new(hosts_file: Option<PathBuf>) -> Resolver {
        Resolver { hosts_file }
    }

    /// The addresses of `host`, sorted, without duplicates; an error says why there
    /// are none.
    pub async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        if let Some(path) = &self.hosts_file {
            let path = path.clone();
            let text = tokio::task::spawn_blocking(move || std::fs::read_to_string(&path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot read the hosts file: {e}"))?;
            let found = hosts_lookup(&text, host);
            if !found.is_empty() {
                return Ok(with_port(found, port));
            }
        }
        let lookup = tokio::net::lookup_host((host, port));
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
            .await
            .map_err(|_| format!("no answer within {}s", LOOKUP_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())?;
        let addrs: Vec<IpAddr> = found.map(|a| a.ip()).collect();
        if addrs.is_empty() {
            return Err("the name has no address".into());
        }
        Ok(with_port(addrs, port))
    }
}

fn with_port(mut ips: Vec<IpAddr>, port: u16) -> Vec<SocketAddr> {
    ips.sort();
    ips.dedup();
    ips.into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// The addresses `text` (in /etc/hosts format) gives `host`.
fn hosts_lookup(text: &str, host: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let ip: IpAddr = words.next()?.parse().ok()?;
            words
                .any(|name| name.trim_end_matches('.').eq_ignore_ascii_case(host))
                .then_some(ip)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_file_gives_every_address_of_a_name() {
        let text = "# comment\n127.0.0.2 app-blue app\n127.0.0.3\tapp-blue # second\n::1 other\nnot-an-ip app-blue\n";
        let ips = hosts_lookup(text, "APP-BLUE");
        assert_eq!(
            ips,
            [
                "127.0.0.2".parse::<IpAddr>().unwrap(),
                "127.0.0.3".parse().unwrap()
            ]
        );
        assert!(hosts_lookup(text, "missing").is_empty());
    }

    #[tokio::test]
    async fn the_hosts_file_comes_first_and_the_system_resolver_after() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, "127.0.0.9 app-blue\n127.0.0.8 app-blue\n").unwrap();
        let resolver = Resolver::new(Some(file));
        assert_eq!(
            resolver.lookup("app-blue", 80).await.unwrap(),
            [
                "127.0.0.8:80".parse().unwrap(),
                "127.0.0.9:80".parse().unwrap()
            ]
        );
        // Not in the file: the system resolver, which knows localhost.
        let local = resolver.lookup("localhost", 81).await.unwrap();
        assert!(local.iter().all(|a| a.ip().is_loopback() && a.port() == 81));
        assert!(resolver.lookup("no-such-name.invalid", 80).await.is_err());
    }
}
