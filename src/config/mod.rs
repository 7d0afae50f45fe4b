//! Configuration as data: what the file says, checked, and nothing more. `raw` is the
//! serde shape of the TOML file, `validate` turns it into the types below (every value
//! in its range, every name it refers to defined), and `locate` finds the line of a key.
//! Nothing here reads another file or builds a runtime object: `setup` does that from
//! these values and reports its errors the same way, so every error names the file,
//! the key and, when it can be found, the line, and `switchyard check` points an
//! operator at the exact spot.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod diff;
mod locate;
mod raw;
mod validate;

pub use diff::ConfigChange;
pub use locate::Origin;
pub use raw::{parse_byte_size, ByteSize};
pub use validate::MAX_BACKENDS_PER_POOL;

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": `{}`: {}", self.key, self.message)
        }
    }
}

/// `[log]`: the access log, opt-in.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub access: AccessLogSink,
    pub format: AccessLogFormat,
    /// Lines held while the sink is slow; beyond this they are dropped and counted.
    pub buffer: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            access: AccessLogSink::Off,
            format: AccessLogFormat::Json,
            buffer: 8192,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogSink {
    Off,
    Stdout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    Json,
    Text,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Per-request counters and histograms; off only to measure what they cost.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true }
    }
}

// Validated types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted power of two choices on in-flight requests.
    #[default]
    P2c,
    RoundRobin,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub state: StateConfig,
    pub pools: Vec<PoolConfig>,
    pub services: Vec<ServiceConfig>,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// `[cluster]`: the traffic state lives in etcd, shared by every instance.
    pub cluster: Option<ClusterConfig>,
    /// The file this came from, for errors found after validation.
    pub origin: Origin,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// etcd v3 endpoints, `http://` or `https://`.
    pub etcd: Vec<String>,
    /// Key prefix of this fleet, ending in `/`.
    pub prefix: String,
    /// This instance's name in the fleet; default: the host name and the admin port.
    pub name: Option<String>,
    /// How long a dead instance stays listed.
    pub lease_ttl: Duration,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub workers: usize,
    pub connect_timeout: Duration,
    pub upstream_header_timeout: Duration,
    /// Longest wait on a backend in the middle of a body: for the next part of its
    /// response, or for it to take more of the request.
    pub upstream_body_timeout: Duration,
    pub client_header_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub connect_attempts: u32,
    pub max_header_size: usize,
    pub max_request_body: Option<u64>,
    /// Largest request body a mirrored copy carries; larger ones are not mirrored.
    pub mirror_max_body: u64,
    pub max_connections: usize,
    pub shutdown_delay: Duration,
    pub shutdown_timeout: Duration,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain listener.
    pub h2c: bool,
    pub http2_max_concurrent_streams: u32,
    /// An HTTP/2 client connection with no stream in progress for this long is closed
    /// (GOAWAY); HTTP/1 connections have `client_header_timeout` for that.
    pub http2_idle_timeout: Duration,
    /// Longest wait for the next piece of a request body the client is sending.
    pub client_body_timeout: Duration,
    /// Longest wait for the client to take more of the response.
    pub send_timeout: Duration,
    /// The most backends one pool may have, from the config or the membership API.
    pub max_backends_per_pool: usize,
    /// A hosts file consulted before the system resolver for backend host names.
    pub hosts_file: Option<PathBuf>,
    pub tls: Option<TlsListenerConfig>,
}

/// `[proxy.tls]`: the HTTPS listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsListenerConfig {
    pub listen: SocketAddr,
    pub certificates: Vec<CertificatePaths>,
    pub client_auth: Option<ClientAuth>,
    /// The plain listener answers every request with a redirect to HTTPS.
    pub redirect_http: bool,
    /// The port in the redirect's `Location`, when clients reach the HTTPS listener
    /// on another port than it listens on (NAT, container port mapping); default: its
    /// own port.
    pub redirect_port: Option<u16>,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
    /// How often the certificate files are checked for changes; zero: never.
    pub reload_interval: Duration,
    pub min_version: MinVersion,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Holds the bearer token every `/api/` call must carry (read by `setup`).
    pub token_file: Option<PathBuf>,
    /// `/metrics` needs the token too.
    pub metrics_require_token: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    /// The backends given as IP addresses.
    pub backends: Vec<BackendConfig>,
    /// The backends given as host names: each address a name resolves to is a backend.
    pub named: Vec<NamedBackend>,
    /// How often the names are resolved again.
    pub dns_refresh: Duration,
    pub balance: Balance,
    pub health: HealthConfig,
    pub passive: PassiveConfig,
    pub panic_mode: PanicMode,
    pub slow_start: Option<Duration>,
    pub upstream: UpstreamConfig,
}

/// What a pool does when none of its active backends is healthy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PanicMode {
    /// Spread requests over every active backend regardless of health (with a warning):
    /// if the checks are wrong the app keeps serving, and if the backends are really
    /// down the client gets the same 503 it would have had.
    #[default]
    FailOpen,
    /// Answer 503 at once.
    FailClosed,
}

/// Outlier detection on real traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct PassiveConfig {
    /// Consecutive connect failures or 5xx answers that eject a backend; 0 turns it off.
    pub consecutive_failures: u32,
    pub ejection_time: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// A backend written as `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedBackend {
    pub host: String,
    pub port: u16,
    /// The weight of each address it resolves to.
    pub weight: u32,
}

impl NamedBackend {
    /// `host:port`, as written.
    pub fn target(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthConfig {
    /// `None`: a TCP connect check (a pool without a `[health]` table).
    pub http: Option<Box<HttpCheck>>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Each wait between checks varies by up to this much either way.
    pub jitter: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    pub path: String,
    pub host: Option<String>,
    /// Empty: any 2xx.
    pub expected_status: Vec<u16>,
}

impl HealthConfig {
    /// The check a pool without a `[health]` table gets: a TCP connect every 2 s.
    pub fn tcp_default() -> HealthConfig {
        HealthConfig {
            http: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            jitter: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub hosts: Vec<HostMatch>,
    pub path_prefix: String,
    pub active: String,
    pub preview: Option<PreviewConfig>,
}

/// `preview = { header, pools }`: a request whose `header` names one of `pools` goes to
/// that pool, whatever the split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewConfig {
    /// Lower case.
    pub header: String,
    pub pools: Vec<String>,
}

/// How a service matches the request's host (port removed, lower case).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    Any,
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
    Exact(String),
}

impl HostMatch {
    fn parse(text: &str) -> Result<HostMatch, String> {
        let host = text.trim().to_ascii_lowercase();
        if host == "*" {
            return Ok(HostMatch::Any);
        }
        let (name, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (rest.to_string(), true),
            None => (host.clone(), false),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            && !name.starts_with('.')
            && !name.ends_with('.');
        if !valid {
            return Err(format!(
                "`{text}` is not a host name (use \"*\", \"example.com\" or \"*.example.com\", without a port)"
            ));
        }
        Ok(if wildcard {
            HostMatch::Suffix(format!(".{name}"))
        } else {
            HostMatch::Exact(name)
        })
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(name) => name.eq_ignore_ascii_case(host),
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }

    /// Higher is more specific; an exact name beats a wildcard, which beats `*`.
    pub fn specificity(&self) -> usize {
        match self {
            HostMatch::Any => 0,
            HostMatch::Suffix(s) => 1 + s.len(),
            HostMatch::Exact(_) => usize::MAX,
        }
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostMatch::Any => f.write_str("*"),
            HostMatch::Suffix(s) => write!(f, "*{s}"),
            HostMatch::Exact(s) => f.write_str(s),
        }
    }
}

/// What a pool's backends speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge, without TLS (gRPC servers, typically).
    H2c,
    /// HTTP/2 over TLS, negotiated by ALPN.
    H2,
}

impl Protocol {
    pub fn is_h2(self) -> bool {
        self != Protocol::Http1
    }
}

/// How a pool's backends are reached, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub protocol: Protocol,
    /// Boxed, as the HTTP check is: most pools have neither, and there may be
    /// thousands of pools.
    pub tls: Option<Box<UpstreamTlsConfig>>,
}

/// TLS to a pool's backends: `tls = true` or `protocol = "h2"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    pub ca_file: Option<PathBuf>,
    /// The name to send as SNI and verify; without it, the backend's IP address.
    pub server_name: Option<String>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

/// A certificate and key pair as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificatePaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How the listener treats client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub ca_file: PathBuf,
    /// Clients without a certificate are let through (those with one are verified).
    pub optional: bool,
}

/// Lowest TLS version the listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum MinVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    ///
    /// Parsing a config of thousands of services allocates many times what the result
    /// keeps (the TOML document, the raw tables). Done on a thread of its own (so in
    /// another malloc arena) and copied out, that garbage is not left interleaved with
    /// the config the proxy keeps: at 10,000 services RSS after start is 45 MB this way
    /// and 59 MB parsing in place.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let parsed = std::thread::scope(|s| s.spawn(|| Config::load_here(path)).join());
        match parsed {
            // The copy is the point: made here, in this thread's arena, compactly.
            Ok(Ok(parsed)) => Ok(parsed.clone()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConfigError {
                file: path.to_path_buf(),
                key: String::new(),
                line: None,
                message: "the config parser panicked".into(),
            }),
        }
    }

    fn load_here(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            key: String::new(),
            line: None,
            message: format!("cannot read the file: {e}"),
        })?;
        Config::parse(&source, path)
    }

    /// Parses and validates `source`; `path` is only used to name the file in errors.
    pub fn parse(source: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(source).map_err(|e| locate::parse_error(source, path, &e))?;
        let origin = Origin::new(path, source);
        validate::Validator { origin: &origin }.validate(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[pools.blue]
backends = ["127.0.0.1:9001"]

[services.app]
active = "blue"
"#;

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::parse(src, Path::new("test.toml"))
    }

    fn err(src: &str) -> ConfigError {
        parse(src).expect_err("config should be rejected")
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.proxy.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.proxy.connect_attempts, 2);
        assert_eq!(c.services[0].hosts, vec![HostMatch::Any]);
        assert_eq!(c.services[0].path_prefix, "/");
        assert_eq!(c.pools[0].balance, Balance::P2c);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = err("[proxy]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key, "proxy.lisen");
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(e.to_string().starts_with("test.toml:3:"), "{e}");
    }

    #[test]
    fn active_pool_must_exist() {
        let e = err(&MINIMAL.replace("active = \"blue\"", "active = \"green\""));
        assert_eq!(e.key, "services.app.active");
        assert_eq!(e.line, Some(6));
        assert!(e.message.contains("`green` does not exist"));
    }

    #[test]
    fn pool_without_backends_is_rejected() {
        let e = err(&MINIMAL.replace("[\"127.0.0.1:9001\"]", "[]"));
        assert_eq!(e.key, "pools.blue.backends");
    }

    #[test]
    fn unparsable_backend_address_is_rejected() {
        let e = err(&MINIMAL.replace("127.0.0.1:9001", "127.0.0.1"));
        assert_eq!(e.key, "pools.blue.backends");
        assert!(e.message.contains("`127.0.0.1`"));
    }

    #[test]
    fn duplicate_backends_are_rejected() {
        let e = err(&MINIMAL.replace(
            "[\"127.0.0.1:9001\"]",
            "[\"127.0.0.1:9001\", { addr = \"127.0.0.1:9001\", weight = 2 }]",
        ));
        assert!(e.message.contains("listed twice"), "{e}");
    }

    #[test]
    fn health_timeout_must_be_below_interval() {
        let src = format!("{MINIMAL}\n[pools.blue.health]\ninterval = \"1s\"\ntimeout = \"1s\"\n");
        let e = err(&src);
        assert_eq!(e.key, "pools.blue.health.timeout");
        assert_eq!(e.line, Some(10));
    }

    #[test]
    fn thresholds_must_be_at_least_one() {
        let src = format!("{MINIMAL}\n[pools.blue.health]\nunhealthy_threshold = 0\n");
        assert_eq!(err(&src).key, "pools.blue.health.unhealthy_threshold");
        let src = format!("{MINIMAL}\n[pools.blue.health]\nhealthy_threshold = 0\n");
        assert_eq!(err(&src).key, "pools.blue.health.healthy_threshold");
    }

    #[test]
    fn absurd_values_are_refused_with_the_range() {
        for (key, value, expected) in [
            ("workers", "100000", "between 0 and 1024"),
            ("max_connections", "0", "between 1 and 1000000"),
            ("max_connections", "100000000", "between 1 and 1000000"),
            ("send_timeout", "\"100d\"", "at most 24h"),
            ("client_body_timeout", "\"0s\"", "greater than zero"),
            ("shutdown_timeout", "\"48h\"", "at most 24h"),
            ("max_backends_per_pool", "0", "between 1 and 100000"),
        ] {
            let e = err(&format!("[proxy]\n{key} = {value}\n{MINIMAL}"));
            assert_eq!(e.key, format!("proxy.{key}"), "{key} = {value}");
            assert!(e.message.contains(expected), "{key} = {value}: {e}");
        }
        let e = err(&format!(
            "{MINIMAL}\n[pools.blue.health]\nunhealthy_threshold = 1000000\n"
        ));
        assert_eq!(e.key, "pools.blue.health.unhealthy_threshold");
    }

    #[test]
    fn a_pool_over_max_backends_per_pool_is_refused() {
        let src = "[proxy]\nmax_backends_per_pool = 2\n[pools.blue]\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\"]\n[services.app]\nactive = \"blue\"\n";
        let e = err(src);
        assert_eq!(e.key, "pools.blue.backends");
        assert!(e.message.contains("max_backends_per_pool (2)"), "{e}");
    }

    #[test]
    fn services_with_identical_match_rules_are_rejected() {
        let src = format!("{MINIMAL}\n[services.other]\nhosts = [\"*\"]\nactive = \"blue\"\n");
        let e = err(&src);
        assert!(e.message.contains("same requests"), "{e}");
    }

    #[test]
    fn different_prefixes_on_the_same_host_are_fine() {
        let src = format!("{MINIMAL}\n[services.api]\npath_prefix = \"/api\"\nactive = \"blue\"\n");
        assert_eq!(parse(&src).unwrap().services.len(), 2);
    }

    #[test]
    fn a_misspelled_backend_key_gets_a_readable_error() {
        let e = err(&MINIMAL.replace(
            "[\"127.0.0.1:9001\"]",
            "[{ addr = \"127.0.0.1:9001\", wieght = 2 }]",
        ));
        assert_eq!(e.key, "pools.blue.backends");
        assert!(e.message.contains("keys: addr, weight"), "{e}");
    }

    #[test]
    fn an_admin_listener_off_loopback_needs_a_token() {
        let src = format!("[admin]\nlisten = \"0.0.0.0:9901\"\n{MINIMAL}");
        let e = err(&src);
        assert_eq!(e.key, "admin.listen");
        let token = std::path::PathBuf::from("/etc/switchyard/token");
        let src = format!(
            "[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"{}\"\n{MINIMAL}",
            token.display()
        );
        assert_eq!(parse(&src).unwrap().admin.token_file, Some(token));
    }

    #[test]
    fn byte_sizes_accept_units() {
        assert_eq!(parse_byte_size("64KiB"), Ok(65536));
        assert_eq!(parse_byte_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_byte_size("123"), Ok(123));
        assert!(parse_byte_size("12 parsecs").is_err());
    }

    #[test]
    fn host_patterns_match_as_documented() {
        let wild = HostMatch::parse("*.example.com").unwrap();
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("A.Example.COM"));
        assert!(!wild.matches("example.com"));
        assert!(HostMatch::parse("example.com:80").is_err());
        assert!(HostMatch::Exact("x".into()).specificity() > wild.specificity());
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/switchyard.toml");
        Config::load(&path).unwrap();
    }
}
