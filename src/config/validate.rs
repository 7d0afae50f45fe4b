//! From the raw shape to `Config`: every value in its range, every name it refers to
//! defined, settings that cannot work together refused. Pure: files named in the
//! config are read by `setup`.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::locate::Origin;
use super::raw::{RawBackend, RawClientAuth, RawCluster, RawConfig, RawPool, RawPreview, RawTls};
use super::{
    AdminConfig, BackendConfig, CertificatePaths, ClientAuth, ClusterConfig, Config, ConfigError,
    HealthConfig, HostMatch, HttpCheck, NamedBackend, PassiveConfig, PoolConfig, PreviewConfig,
    Protocol, ProxyConfig, ServiceConfig, StateConfig, TlsListenerConfig, UpstreamConfig,
    UpstreamTlsConfig,
};

pub(super) struct Validator<'a> {
    pub(super) origin: &'a Origin,
}

impl Validator<'_> {
    fn error(&self, table: &str, key: &str, message: impl Into<String>) -> ConfigError {
        self.origin.error(table, key, message)
    }

    fn addr(&self, table: &str, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.parse().map_err(|_| {
            self.error(
                table,
                key,
                format!("`{text}` is not an IP address with a port, such as \"127.0.0.1:8080\""),
            )
        })
    }

    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let p = raw.proxy;
        const TABLE: &str = "proxy";
        let proxy = ProxyConfig {
            listen: self.addr(TABLE, "listen", &p.listen)?,
            workers: self.within(TABLE, "workers", p.workers, 0..=MAX_WORKERS)?,
            connect_timeout: self.timeout(TABLE, "connect_timeout", p.connect_timeout)?,
            upstream_header_timeout: self.timeout(
                TABLE,
                "upstream_header_timeout",
                p.upstream_header_timeout,
            )?,
            upstream_body_timeout: self.timeout(
                TABLE,
                "upstream_body_timeout",
                p.upstream_body_timeout,
            )?,
            client_header_timeout: self.timeout(
                TABLE,
                "client_header_timeout",
                p.client_header_timeout,
            )?,
            upstream_idle_timeout: self.timeout(
                TABLE,
                "upstream_idle_timeout",
                p.upstream_idle_timeout,
            )?,
            connect_attempts: self.within(TABLE, "connect_attempts", p.connect_attempts, 1..=16)?,
            max_header_size: self.within(
                TABLE,
                "max_header_size",
                p.max_header_size.0,
                8192..=1_048_576,
            )? as usize,
            max_request_body: p.max_request_body.map(|b| b.0),
            mirror_max_body: self.within(
                TABLE,
                "mirror_max_body",
                p.mirror_max_body.0,
                0..=16 * 1024 * 1024,
            )?,
            max_connections: self.within(
                TABLE,
                "max_connections",
                p.max_connections,
                1..=MAX_CONNECTIONS,
            )?,
            shutdown_delay: self.at_most_a_day(TABLE, "shutdown_delay", p.shutdown_delay)?,
            shutdown_timeout: self.at_most_a_day(TABLE, "shutdown_timeout", p.shutdown_timeout)?,
            h2c: p.h2c,
            http2_max_concurrent_streams: self.within(
                TABLE,
                "http2_max_concurrent_streams",
                p.http2_max_concurrent_streams,
                1..=10_000,
            )?,
            http2_idle_timeout: self.timeout(TABLE, "http2_idle_timeout", p.http2_idle_timeout)?,
            client_body_timeout: self.timeout(
                TABLE,
                "client_body_timeout",
                p.client_body_timeout,
            )?,
            send_timeout: self.timeout(TABLE, "send_timeout", p.send_timeout)?,
            max_backends_per_pool: self.within(
                TABLE,
                "max_backends_per_pool",
                p.max_backends_per_pool,
                1..=MAX_BACKENDS_PER_POOL,
            )?,
            hosts_file: p.hosts_file,
            tls: match p.tls {
                None => None,
                Some(tls) => Some(self.tls_listener(tls)?),
            },
        };
        if let Some(tls) = &proxy.tls {
            if tls.listen == proxy.listen && tls.listen.port() != 0 {
                return Err(self.error("proxy.tls", "listen", "must differ from proxy.listen"));
            }
        }
        let tls_listen = proxy.tls.as_ref().map(|t| t.listen);
        let admin_listen = self.addr("admin", "listen", &raw.admin.listen)?;
        let token_file = raw.admin.token_file;
        if token_file.is_none() && !admin_listen.ip().is_loopback() {
            return Err(self.error(
                "admin",
                "listen",
                format!(
                    "{admin_listen} is not a loopback address: set admin.token_file so the admin API needs a token, or bind it to 127.0.0.1"
                ),
            ));
        }
        if raw.admin.metrics_require_token && token_file.is_none() {
            return Err(self.error("admin", "metrics_require_token", "needs admin.token_file"));
        }
        let admin = AdminConfig {
            listen: admin_listen,
            token_file,
            metrics_require_token: raw.admin.metrics_require_token,
        };
        if admin.listen == proxy.listen && proxy.listen.port() != 0 {
            return Err(self.error("admin", "listen", "must differ from proxy.listen"));
        }
        if Some(admin.listen) == tls_listen && admin.listen.port() != 0 {
            return Err(self.error("admin", "listen", "must differ from proxy.tls.listen"));
        }

        if raw.pools.is_empty() {
            return Err(self.error("", "pools", "at least one pool is required ([pools.NAME])"));
        }
        let mut pools = Vec::with_capacity(raw.pools.len());
        for (name, pool) in raw.pools {
            pools.push(self.pool(name, pool, proxy.max_backends_per_pool)?);
        }

        if raw.services.is_empty() {
            return Err(self.error(
                "",
                "services",
                "at least one service is required ([services.NAME])",
            ));
        }
        // Lookups by name and by (host, prefix), so checking stays linear at 10,000
        // services rather than comparing each with every other.
        let pool_names: std::collections::HashSet<&str> =
            pools.iter().map(|p| p.name.as_str()).collect();
        let mut routes: std::collections::HashMap<(HostMatch, String), usize> =
            std::collections::HashMap::new();
        let mut services: Vec<ServiceConfig> = Vec::with_capacity(raw.services.len());
        for (name, service) in raw.services {
            let table = format!("services.{name}");
            check_name(&name).map_err(|m| self.error(&table, "", m))?;
            if !pool_names.contains(service.active.as_str()) {
                return Err(self.error(
                    &table,
                    "active",
                    format!(
                        "pool `{}` does not exist (pools: {})",
                        service.active,
                        pools
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            if !service.path_prefix.starts_with('/') {
                return Err(self.error(&table, "path_prefix", "must start with `/`"));
            }
            if service.hosts.is_empty() {
                return Err(self.error(
                    &table,
                    "hosts",
                    "must list at least one host (\"*\" for any)",
                ));
            }
            let mut hosts = Vec::with_capacity(service.hosts.len());
            for host in &service.hosts {
                let parsed = HostMatch::parse(host).map_err(|m| self.error(&table, "hosts", m))?;
                if !hosts.contains(&parsed) {
                    hosts.push(parsed);
                }
            }
            let same = hosts.iter().find_map(|host| {
                routes
                    .get(&(host.clone(), service.path_prefix.clone()))
                    .map(|&i| &services[i])
            });
            if let Some(other) = same {
                return Err(self.error(
                    &table,
                    "hosts",
                    format!(
                        "matches the same requests as service `{}` (same host and path_prefix `{}`)",
                        other.name, service.path_prefix
                    ),
                ));
            }
            let preview = match service.preview {
                None => None,
                Some(preview) => Some(self.preview(&table, preview, &pool_names)?),
            };
            for host in &hosts {
                routes.insert((host.clone(), service.path_prefix.clone()), services.len());
            }
            services.push(ServiceConfig {
                name,
                hosts,
                path_prefix: service.path_prefix,
                active: service.active,
                preview,
            });
        }

        Ok(Config {
            proxy,
            admin,
            state: StateConfig {
                path: raw.state.path,
            },
            pools,
            services,
            log: raw.log,
            metrics: raw.metrics,
            cluster: match raw.cluster {
                None => None,
                Some(cluster) => Some(self.cluster(cluster)?),
            },
            origin: self.origin.clone(),
        })
    }

    fn cluster(&self, raw: RawCluster) -> Result<ClusterConfig, ConfigError> {
        const TABLE: &str = "cluster";
        if raw.etcd.is_empty() {
            return Err(self.error(
                TABLE,
                "etcd",
                "list at least one etcd endpoint, such as \"http://127.0.0.1:2379\"",
            ));
        }
        for endpoint in &raw.etcd {
            let valid = (endpoint.starts_with("http://") || endpoint.starts_with("https://"))
                && endpoint
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.authority().is_some());
            if !valid {
                return Err(self.error(
                    TABLE,
                    "etcd",
                    format!("`{endpoint}` is not an http:// or https:// URL with a host and port"),
                ));
            }
        }
        if !raw.prefix.starts_with('/') || !raw.prefix.ends_with('/') || raw.prefix.len() < 2 {
            return Err(self.error(
                TABLE,
                "prefix",
                "must start and end with `/`, such as \"/switchyard/\"",
            ));
        }
        if let Some(name) = &raw.name {
            check_name(name).map_err(|m| self.error(TABLE, "name", m))?;
        }
        let lease_ttl = self.timeout(TABLE, "lease_ttl", raw.lease_ttl)?;
        if lease_ttl < Duration::from_secs(2) {
            return Err(self.error(TABLE, "lease_ttl", "must be at least 2s"));
        }
        if raw.cert_file.is_some() != raw.key_file.is_some() {
            return Err(self.error(TABLE, "cert_file", "cert_file and key_file go together"));
        }
        if raw.username.is_some() != raw.password_file.is_some() {
            return Err(self.error(TABLE, "username", "username and password_file go together"));
        }
        let tls = raw.ca_file.is_some() || raw.cert_file.is_some();
        if tls && raw.etcd.iter().any(|e| e.starts_with("http://")) {
            return Err(self.error(TABLE, "etcd", "TLS settings need https:// endpoints"));
        }
        Ok(ClusterConfig {
            etcd: raw.etcd,
            prefix: raw.prefix,
            name: raw.name,
            lease_ttl,
            ca_file: raw.ca_file,
            cert_file: raw.cert_file,
            key_file: raw.key_file,
            username: raw.username,
            password_file: raw.password_file,
        })
    }

    fn preview(
        &self,
        table: &str,
        preview: RawPreview,
        pools: &std::collections::HashSet<&str>,
    ) -> Result<PreviewConfig, ConfigError> {
        let header = preview.header.trim().to_ascii_lowercase();
        // Headers the proxy itself sets or drops would never arrive as the client sent
        // them.
        let reserved = [
            "host",
            "connection",
            "upgrade",
            "te",
            "transfer-encoding",
            "content-length",
        ];
        if http::HeaderName::from_bytes(header.as_bytes()).is_err()
            || reserved.contains(&header.as_str())
        {
            return Err(self.error(
                table,
                "preview",
                format!("`{}` is not a header name a client can send for this (such as \"x-preview-pool\")", preview.header),
            ));
        }
        if preview.pools.is_empty() {
            return Err(self.error(table, "preview", "pools must list at least one pool"));
        }
        for pool in &preview.pools {
            if !pools.contains(pool.as_str()) {
                return Err(self.error(table, "preview", format!("pool `{pool}` does not exist")));
            }
        }
        Ok(PreviewConfig {
            header,
            pools: preview.pools,
        })
    }

    /// A number within `range`, or an error that names the range.
    fn within<T>(
        &self,
        table: &str,
        key: &str,
        value: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: PartialOrd + fmt::Display + Copy,
    {
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(self.error(
                table,
                key,
                format!(
                    "must be between {} and {}, got {value}",
                    range.start(),
                    range.end()
                ),
            ))
        }
    }

    /// A duration that may be zero, up to a day: longer is a typo, not a setting.
    fn at_most_a_day(&self, table: &str, key: &str, d: Duration) -> Result<Duration, ConfigError> {
        if d > MAX_DURATION {
            return Err(self.error(table, key, "must be at most 24h"));
        }
        Ok(d)
    }

    /// A timeout: above zero, at most a day.
    fn timeout(&self, table: &str, key: &str, d: Duration) -> Result<Duration, ConfigError> {
        self.positive(table, key, d)?;
        self.at_most_a_day(table, key, d)
    }

    fn positive(&self, table: &str, key: &str, d: Duration) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            Err(self.error(table, key, "must be greater than zero"))
        } else {
            Ok(d)
        }
    }

    fn pool(
        &self,
        name: String,
        pool: RawPool,
        max_backends: usize,
    ) -> Result<PoolConfig, ConfigError> {
        let table = format!("pools.{name}");
        check_name(&name).map_err(|m| self.error(&table, "", m))?;
        let upstream = self.upstream(&table, &pool)?;
        if pool.backends.is_empty() {
            return Err(self.error(&table, "backends", "a pool needs at least one backend"));
        }
        let dns_refresh = self.timeout(&table, "dns_refresh", pool.dns_refresh)?;
        if pool.backends.len() > max_backends {
            return Err(self.error(
                &table,
                "backends",
                format!(
                    "{} backends is more than proxy.max_backends_per_pool ({max_backends})",
                    pool.backends.len()
                ),
            ));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(pool.backends.len());
        let mut named: Vec<NamedBackend> = Vec::new();
        let mut seen = HashSet::new();
        for backend in pool.backends {
            let (text, weight) = match backend {
                RawBackend::Addr(addr) => (addr, 1),
                RawBackend::Weighted(b) => (b.addr, b.weight),
            };
            let target = backend_target(&text).map_err(|m| self.error(&table, "backends", m))?;
            if !(1..=1000).contains(&weight) {
                return Err(self.error(
                    &table,
                    "backends",
                    format!("weight of `{text}` must be between 1 and 1000 (drain a backend to take it out)"),
                ));
            }
            if !seen.insert(target.clone()) {
                return Err(self.error(&table, "backends", format!("`{text}` is listed twice")));
            }
            match target {
                Target::Addr(addr) => backends.push(BackendConfig { addr, weight }),
                Target::Name(host, port) => named.push(NamedBackend { host, port, weight }),
            }
        }
        let health = match pool.health {
            None => HealthConfig::tcp_default(),
            Some(h) => {
                let table = format!("{table}.health");
                if !h.path.starts_with('/') {
                    return Err(self.error(&table, "path", "must start with `/`"));
                }
                self.timeout(&table, "interval", h.interval)?;
                self.timeout(&table, "timeout", h.timeout)?;
                if h.timeout >= h.interval {
                    return Err(self.error(
                        &table,
                        "timeout",
                        format!(
                            "must be shorter than interval ({} >= {})",
                            humantime::format_duration(h.timeout),
                            humantime::format_duration(h.interval)
                        ),
                    ));
                }
                for (key, value) in [
                    ("healthy_threshold", h.healthy_threshold),
                    ("unhealthy_threshold", h.unhealthy_threshold),
                ] {
                    self.within(&table, key, value, 1..=100)?;
                }
                if let Some(bad) = h.expected_status.iter().find(|c| !(100..=599).contains(*c)) {
                    return Err(self.error(
                        &table,
                        "expected_status",
                        format!("{bad} is not an HTTP status"),
                    ));
                }
                let jitter = h.jitter.unwrap_or(h.interval / 10);
                if jitter >= h.interval {
                    return Err(self.error(&table, "jitter", "must be shorter than interval"));
                }
                if let Some(host) = &h.host {
                    if http::HeaderValue::from_str(host).is_err() || host.is_empty() {
                        return Err(self.error(
                            &table,
                            "host",
                            format!("`{host}` is not a valid Host header"),
                        ));
                    }
                }
                HealthConfig {
                    http: Some(Box::new(HttpCheck {
                        path: h.path,
                        host: h.host,
                        expected_status: h.expected_status,
                    })),
                    interval: h.interval,
                    timeout: h.timeout,
                    healthy_threshold: h.healthy_threshold,
                    unhealthy_threshold: h.unhealthy_threshold,
                    jitter,
                }
            }
        };
        if pool.passive.max_ejection_percent > 100 {
            return Err(self.error(
                &format!("{table}.passive"),
                "max_ejection_percent",
                "must be between 0 and 100",
            ));
        }
        if pool.slow_start.is_some_and(|d| d.is_zero()) {
            return Err(self.error(
                &table,
                "slow_start",
                "must be greater than zero (or left out)",
            ));
        }
        Ok(PoolConfig {
            name,
            backends,
            named,
            dns_refresh,
            balance: pool.balance,
            health,
            passive: PassiveConfig {
                consecutive_failures: pool.passive.consecutive_failures,
                ejection_time: pool.passive.ejection_time,
                max_ejection_percent: pool.passive.max_ejection_percent,
            },
            panic_mode: pool.panic_mode,
            slow_start: pool.slow_start,
            upstream,
        })
    }

    /// The pool's protocol and TLS settings, consistent with each other; the files they
    /// name are read by `setup`.
    fn upstream(&self, table: &str, pool: &RawPool) -> Result<UpstreamConfig, ConfigError> {
        let tls = match (pool.protocol, pool.tls) {
            (Protocol::H2, Some(false)) => {
                return Err(self.error(
                    table,
                    "tls",
                    "protocol \"h2\" is HTTP/2 over TLS; use \"h2c\" for HTTP/2 without TLS",
                ))
            }
            (Protocol::H2, _) => true,
            (Protocol::H2c, Some(true)) => {
                return Err(self.error(
                    table,
                    "tls",
                    "protocol \"h2c\" is HTTP/2 without TLS; use \"h2\" for HTTP/2 over TLS",
                ))
            }
            (_, tls) => tls.unwrap_or(false),
        };
        if !tls {
            for (key, set) in [
                ("ca_file", pool.ca_file.is_some()),
                ("server_name", pool.server_name.is_some()),
                ("client_cert_file", pool.client_cert_file.is_some()),
                ("client_key_file", pool.client_key_file.is_some()),
                ("insecure_skip_verify", pool.insecure_skip_verify),
            ] {
                if set {
                    return Err(self.error(
                        table,
                        key,
                        "only applies with tls = true (or protocol = \"h2\")",
                    ));
                }
            }
            return Ok(UpstreamConfig {
                protocol: pool.protocol,
                tls: None,
            });
        }
        if pool.client_cert_file.is_some() != pool.client_key_file.is_some() {
            return Err(self.error(
                table,
                "client_cert_file",
                "client_cert_file and client_key_file go together",
            ));
        }
        Ok(UpstreamConfig {
            protocol: pool.protocol,
            tls: Some(Box::new(UpstreamTlsConfig {
                ca_file: pool.ca_file.clone(),
                server_name: pool.server_name.clone(),
                client_cert_file: pool.client_cert_file.clone(),
                client_key_file: pool.client_key_file.clone(),
                insecure_skip_verify: pool.insecure_skip_verify,
            })),
        })
    }

    fn tls_listener(&self, tls: RawTls) -> Result<TlsListenerConfig, ConfigError> {
        const TABLE: &str = "proxy.tls";
        let listen = self.addr(TABLE, "listen", &tls.listen)?;
        if tls.certificates.is_empty() {
            return Err(self.error(
                TABLE,
                "certificates",
                "list at least one { cert = \"...\", key = \"...\" }",
            ));
        }
        let certificates: Vec<CertificatePaths> = tls
            .certificates
            .into_iter()
            .map(|c| CertificatePaths {
                cert: c.cert,
                key: c.key,
            })
            .collect();
        let client_auth = match (tls.client_ca_file, tls.client_auth) {
            (Some(ca_file), mode) => Some(ClientAuth {
                ca_file,
                optional: matches!(mode, Some(RawClientAuth::Optional)),
            }),
            // Written but without a CA, client certificates would silently not be
            // asked for: refuse rather than serve unauthenticated.
            (None, Some(_)) => {
                return Err(self.error(
                    TABLE,
                    "client_auth",
                    "needs client_ca_file (the CA that issues the client certificates)",
                ))
            }
            (None, None) => None,
        };
        let handshake_timeout = self.positive(TABLE, "handshake_timeout", tls.handshake_timeout)?;
        self.within(
            TABLE,
            "max_handshakes",
            tls.max_handshakes,
            1..=MAX_CONNECTIONS,
        )?;
        Ok(TlsListenerConfig {
            listen,
            certificates,
            client_auth,
            redirect_http: tls.redirect_http,
            redirect_port: match (tls.redirect_port, tls.redirect_http) {
                (Some(0), _) => {
                    return Err(self.error(
                        TABLE,
                        "redirect_port",
                        "must be a port number (1-65535)",
                    ))
                }
                (Some(_), false) => {
                    return Err(self.error(
                        TABLE,
                        "redirect_port",
                        "only applies with redirect_http = true",
                    ))
                }
                (port, _) => port,
            },
            handshake_timeout,
            max_handshakes: tls.max_handshakes,
            reload_interval: tls.reload_interval,
            min_version: tls.min_version,
        })
    }
}

/// Upper bounds that no real deployment reaches: past them a value is a typo, and taken
/// literally it would exhaust threads, memory or file descriptors.
const MAX_WORKERS: usize = 1024;
const MAX_CONNECTIONS: usize = 1_000_000;
pub const MAX_BACKENDS_PER_POOL: usize = 100_000;
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// A backend as written: an IP address with a port, or a host name with a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    Addr(SocketAddr),
    Name(String, u16),
}

fn backend_target(text: &str) -> Result<Target, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Target::Addr(addr));
    }
    let usage = format!(
        "`{text}` is not an address with a port, such as \"127.0.0.1:8080\" or \"app-blue:8080\""
    );
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(usage);
    };
    let port: u16 = port.parse().map_err(|_| usage.clone())?;
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    // All digits and dots is a mistyped IP address, not a name.
    let numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if port == 0 || host.len() > 253 || numeric || !host.split('.').all(valid_label) {
        return Err(usage);
    }
    Ok(Target::Name(host, port))
}

fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "name `{name}` must be 1-64 characters of letters, digits, `-` or `_`"
        ))
    }
}
