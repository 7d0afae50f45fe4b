//! Configuration: the raw serde shape of the TOML file, and the validated types the rest
//! of the program uses. Every error names the file, the key and, when it can be found,
//! the line, so `switchyard check` points an operator at the exact spot.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::Protocol;
use serde::Deserialize;

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

// ---------------------------------------------------------------------------------------
// Raw shape, exactly as written in the file.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    pools: BTreeMap<String, RawPool>,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    metrics: MetricsConfig,
}

/// `[log]`: the access log, opt-in.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    listen: String,
    workers: usize,
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    upstream_header_timeout: Duration,
    #[serde(with = "humantime_serde")]
    client_header_timeout: Duration,
    #[serde(with = "humantime_serde")]
    upstream_idle_timeout: Duration,
    connect_attempts: u32,
    max_header_size: ByteSize,
    max_request_body: Option<ByteSize>,
    max_connections: usize,
    #[serde(with = "humantime_serde")]
    shutdown_delay: Duration,
    #[serde(with = "humantime_serde")]
    shutdown_timeout: Duration,
    h2c: bool,
    http2_max_concurrent_streams: u32,
    #[serde(with = "humantime_serde")]
    http2_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    client_body_timeout: Duration,
    #[serde(with = "humantime_serde")]
    send_timeout: Duration,
    max_backends_per_pool: usize,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: String,
    certificates: Vec<RawCertificate>,
    client_ca_file: Option<PathBuf>,
    client_auth: Option<RawClientAuth>,
    #[serde(default)]
    redirect_http: bool,
    redirect_port: Option<u16>,
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    handshake_timeout: Duration,
    #[serde(default = "default_max_handshakes")]
    max_handshakes: usize,
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    reload_interval: Duration,
    #[serde(default)]
    min_version: crate::tls::MinVersion,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawClientAuth {
    Required,
    Optional,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_handshakes() -> usize {
    1024
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            listen: "127.0.0.1:8080".into(),
            workers: 0,
            connect_timeout: Duration::from_secs(2),
            upstream_header_timeout: Duration::from_secs(60),
            client_header_timeout: Duration::from_secs(30),
            upstream_idle_timeout: Duration::from_secs(4),
            connect_attempts: 2,
            max_header_size: ByteSize(64 * 1024),
            max_request_body: None,
            max_connections: 10_000,
            shutdown_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(30),
            h2c: false,
            http2_max_concurrent_streams: 100,
            http2_idle_timeout: Duration::from_secs(180),
            client_body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_backends_per_pool: 1000,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: String,
    token_file: Option<PathBuf>,
    metrics_require_token: bool,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: "127.0.0.1:9901".into(),
            token_file: None,
            metrics_require_token: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawState {
    path: PathBuf,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            path: PathBuf::from("switchyard.state.json"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    backends: Vec<RawBackend>,
    #[serde(default)]
    balance: Balance,
    health: Option<RawHealth>,
    #[serde(default)]
    passive: RawPassive,
    #[serde(default)]
    panic_mode: PanicMode,
    #[serde(default, with = "humantime_serde")]
    slow_start: Option<Duration>,
    #[serde(default)]
    protocol: Protocol,
    tls: Option<bool>,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPassive {
    consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    ejection_time: Duration,
    max_ejection_percent: u32,
}

impl Default for RawPassive {
    fn default() -> Self {
        RawPassive {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a backend: \"IP:port\" or { addr = \"IP:port\", weight = N } (keys: addr, weight)"
)]
enum RawBackend {
    Addr(String),
    Weighted(RawWeightedBackend),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeightedBackend {
    addr: String,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    path: String,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    expected_status: Vec<u16>,
    host: Option<String>,
    #[serde(with = "humantime_serde")]
    jitter: Option<Duration>,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expected_status: Vec::new(),
            host: None,
            jitter: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default = "default_hosts")]
    hosts: Vec<String>,
    #[serde(default = "default_prefix")]
    path_prefix: String,
    active: String,
}

fn default_hosts() -> Vec<String> {
    vec!["*".into()]
}

fn default_prefix() -> String {
    "/".into()
}

/// A byte count written either as an integer or as a string with a unit ("64KiB", "10MB").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "a size: a whole number of bytes or a string such as \"64KiB\""
        )]
        enum Either {
            Int(u64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Int(n) => Ok(ByteSize(n)),
            Either::Text(s) => parse_byte_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 65536, \"64KiB\" or \"10MB\""))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KB, KiB, MB, MiB, GB or GiB)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}

// ---------------------------------------------------------------------------------------
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
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub workers: usize,
    pub connect_timeout: Duration,
    pub upstream_header_timeout: Duration,
    pub client_header_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub connect_attempts: u32,
    pub max_header_size: usize,
    pub max_request_body: Option<u64>,
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
    pub tls: Option<TlsListenerConfig>,
}

/// `[proxy.tls]`: the HTTPS listener.
#[derive(Debug, Clone)]
pub struct TlsListenerConfig {
    pub listen: SocketAddr,
    pub certificates: Vec<crate::tls::CertificatePaths>,
    pub client_auth: Option<crate::tls::ClientAuth>,
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
    pub min_version: crate::tls::MinVersion,
}

#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The bearer token every `/api/` call must carry, read from `token_file`.
    pub token: Option<String>,
    /// `/metrics` needs the token too.
    pub metrics_require_token: bool,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub backends: Vec<BackendConfig>,
    pub balance: Balance,
    pub health: HealthConfig,
    pub passive: PassiveConfig,
    pub panic_mode: PanicMode,
    pub slow_start: Option<Duration>,
    pub upstream: crate::client::Upstream,
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
#[derive(Debug, Clone)]
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

#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// `None`: a TCP connect check (a pool without a `[health]` table).
    pub http: Option<HttpCheck>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Each wait between checks varies by up to this much either way.
    pub jitter: Duration,
}

#[derive(Debug, Clone)]
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

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub hosts: Vec<HostMatch>,
    pub path_prefix: String,
    pub active: String,
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

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
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
        let raw: RawConfig = toml::from_str(source).map_err(|e| parse_error(source, path, &e))?;
        Validator { source, path }.validate(raw)
    }
}

fn parse_error(source: &str, path: &Path, error: &toml::de::Error) -> ConfigError {
    let (line, key) = match error.span() {
        Some(span) => {
            let line = source[..span.start.min(source.len())].matches('\n').count() + 1;
            let table = enclosing_table(source, line);
            // The span is the key (unknown field) or the value (wrong type); either way
            // the key is what stands before `=` on that line.
            let line_start = source[..span.start.min(source.len())]
                .rfind('\n')
                .map_or(0, |i| i + 1);
            let line_text = source[line_start..].lines().next().unwrap_or("");
            let name = match line_text.split_once('=') {
                Some((name, _)) if !line_text.trim_start().starts_with('[') => {
                    name.trim().trim_matches('"').to_string()
                }
                _ => String::new(),
            };
            let key = match (table.is_empty(), name.is_empty()) {
                (_, true) => table,
                (true, false) => name,
                (false, false) => format!("{table}.{name}"),
            };
            (Some(line), key)
        }
        None => (None, String::new()),
    };
    ConfigError {
        file: path.to_path_buf(),
        key,
        line,
        message: error.message().trim().to_string(),
    }
}

/// The `[table]` header in force at 1-based `line`, or "" at the top level.
fn enclosing_table(source: &str, line: usize) -> String {
    source
        .lines()
        .take(line)
        .filter_map(|l| {
            let t = l.trim();
            t.starts_with('[')
                .then(|| t.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        })
        .last()
        .unwrap_or_default()
}

/// Best-effort line of `key` inside `[table]` (or of the header itself when `key` is
/// empty); `None` for inline tables and other shapes it does not understand.
fn locate(source: &str, table: &str, key: &str) -> Option<usize> {
    let mut in_table = table.is_empty();
    for (index, line) in source.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_table = name == table;
            if in_table && key.is_empty() {
                return Some(index + 1);
            }
            continue;
        }
        if in_table && !key.is_empty() {
            if let Some(rest) = t.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return Some(index + 1);
                }
            }
        }
    }
    None
}

struct Validator<'a> {
    source: &'a str,
    path: &'a Path,
}

impl Validator<'_> {
    fn error(&self, table: &str, key: &str, message: impl Into<String>) -> ConfigError {
        let line = locate(self.source, table, key).or_else(|| locate(self.source, table, ""));
        let full_key = match (table.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => table.to_string(),
            (false, false) => format!("{table}.{key}"),
        };
        ConfigError {
            file: self.path.to_path_buf(),
            key: full_key,
            line,
            message: message.into(),
        }
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

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
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
        let token = match &raw.admin.token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    self.error(
                        "admin",
                        "token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let token = text.trim().to_string();
                if token.is_empty() || token.contains(char::is_whitespace) {
                    return Err(self.error(
                        "admin",
                        "token_file",
                        format!("{} must hold one token without spaces", path.display()),
                    ));
                }
                Some(token)
            }
        };
        if token.is_none() && !admin_listen.ip().is_loopback() {
            return Err(self.error(
                "admin",
                "listen",
                format!(
                    "{admin_listen} is not a loopback address: set admin.token_file so the admin API needs a token, or bind it to 127.0.0.1"
                ),
            ));
        }
        if raw.admin.metrics_require_token && token.is_none() {
            return Err(self.error("admin", "metrics_require_token", "needs admin.token_file"));
        }
        let admin = AdminConfig {
            listen: admin_listen,
            token,
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
        let mut services: Vec<ServiceConfig> = Vec::with_capacity(raw.services.len());
        for (name, service) in raw.services {
            let table = format!("services.{name}");
            check_name(&name).map_err(|m| self.error(&table, "", m))?;
            if !pools.iter().any(|p| p.name == service.active) {
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
            if let Some(other) = services.iter().find(|s| {
                s.path_prefix == service.path_prefix && s.hosts.iter().any(|h| hosts.contains(h))
            }) {
                return Err(self.error(
                    &table,
                    "hosts",
                    format!(
                        "matches the same requests as service `{}` (same host and path_prefix `{}`)",
                        other.name, service.path_prefix
                    ),
                ));
            }
            services.push(ServiceConfig {
                name,
                hosts,
                path_prefix: service.path_prefix,
                active: service.active,
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
        let mut seen = HashSet::new();
        for backend in pool.backends {
            let (text, weight) = match backend {
                RawBackend::Addr(addr) => (addr, 1),
                RawBackend::Weighted(b) => (b.addr, b.weight),
            };
            let addr = self.addr(&table, "backends", &text)?;
            if !(1..=1000).contains(&weight) {
                return Err(self.error(
                    &table,
                    "backends",
                    format!("weight of `{text}` must be between 1 and 1000 (drain a backend to take it out)"),
                ));
            }
            if !seen.insert(addr) {
                return Err(self.error(&table, "backends", format!("`{text}` is listed twice")));
            }
            backends.push(BackendConfig { addr, weight });
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
                    http: Some(HttpCheck {
                        path: h.path,
                        host: h.host,
                        expected_status: h.expected_status,
                    }),
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

    fn upstream(
        &self,
        table: &str,
        pool: &RawPool,
    ) -> Result<crate::client::Upstream, ConfigError> {
        use crate::tls::UpstreamTlsError;
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
            return Ok(crate::client::Upstream {
                protocol: pool.protocol,
                tls: None,
            });
        }
        let settings = crate::tls::UpstreamTlsSettings {
            ca_file: pool.ca_file.clone(),
            server_name: pool.server_name.clone(),
            client_cert_file: pool.client_cert_file.clone(),
            client_key_file: pool.client_key_file.clone(),
            insecure_skip_verify: pool.insecure_skip_verify,
            h2: pool.protocol.is_h2(),
        };
        let upstream_tls = crate::tls::upstream_tls(&settings).map_err(|e| match e {
            UpstreamTlsError::CaFile(e) => self.error(table, "ca_file", e.to_string()),
            UpstreamTlsError::ServerName(m) => self.error(table, "server_name", m),
            UpstreamTlsError::ClientCert(e) => self.error(table, "client_cert_file", e.to_string()),
        })?;
        Ok(crate::client::Upstream {
            protocol: pool.protocol,
            tls: Some(std::sync::Arc::new(upstream_tls)),
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
        let certificates: Vec<crate::tls::CertificatePaths> = tls
            .certificates
            .into_iter()
            .map(|c| crate::tls::CertificatePaths {
                cert: c.cert,
                key: c.key,
            })
            .collect();
        // Loaded here so `switchyard check` reports a bad file; start loads them again.
        crate::tls::CertStore::load(&certificates, &crate::tls::provider())
            .map_err(|e| self.error(TABLE, "certificates", e.to_string()))?;
        let client_auth = match (tls.client_ca_file, tls.client_auth) {
            (Some(ca_file), mode) => Some(crate::tls::ClientAuth {
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
        if let Some(auth) = &client_auth {
            crate::tls::client_verifier(auth)
                .map_err(|e| self.error(TABLE, "client_ca_file", e.to_string()))?;
        }
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
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-token\n").unwrap();
        let src = format!(
            "[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"{}\"\n{MINIMAL}",
            token.display()
        );
        assert_eq!(
            parse(&src).unwrap().admin.token.as_deref(),
            Some("s3cret-token")
        );
        let missing = format!(
            "[admin]\ntoken_file = \"{}/nope\"\n{MINIMAL}",
            dir.path().display()
        );
        assert_eq!(err(&missing).key, "admin.token_file");
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
