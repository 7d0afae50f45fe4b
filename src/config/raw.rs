//! The serde shape of the TOML file, exactly as written: defaults filled in, unknown
//! keys refused, nothing checked beyond the types. `validate` turns it into `Config`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Balance, LogConfig, MetricsConfig, MinVersion, PanicMode, Protocol};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) proxy: RawProxy,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) state: RawState,
    #[serde(default)]
    pub(super) pools: BTreeMap<String, RawPool>,
    #[serde(default)]
    pub(super) services: BTreeMap<String, RawService>,
    #[serde(default)]
    pub(super) log: LogConfig,
    #[serde(default)]
    pub(super) metrics: MetricsConfig,
    pub(super) cluster: Option<RawCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) etcd: Vec<String>,
    #[serde(default = "default_cluster_prefix")]
    pub(super) prefix: String,
    pub(super) name: Option<String>,
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub(super) lease_ttl: Duration,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<PathBuf>,
}

fn default_cluster_prefix() -> String {
    "/switchyard/".into()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawProxy {
    pub(super) listen: String,
    pub(super) workers: usize,
    #[serde(with = "humantime_serde")]
    pub(super) connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) upstream_header_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) upstream_body_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) client_header_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) upstream_idle_timeout: Duration,
    pub(super) connect_attempts: u32,
    pub(super) max_header_size: ByteSize,
    pub(super) max_request_body: Option<ByteSize>,
    pub(super) mirror_max_body: ByteSize,
    pub(super) max_connections: usize,
    #[serde(with = "humantime_serde")]
    pub(super) shutdown_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) shutdown_timeout: Duration,
    pub(super) h2c: bool,
    pub(super) http2_max_concurrent_streams: u32,
    #[serde(with = "humantime_serde")]
    pub(super) http2_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) client_body_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) send_timeout: Duration,
    pub(super) max_backends_per_pool: usize,
    pub(super) hosts_file: Option<PathBuf>,
    pub(super) tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) listen: String,
    pub(super) certificates: Vec<RawCertificate>,
    pub(super) client_ca_file: Option<PathBuf>,
    pub(super) client_auth: Option<RawClientAuth>,
    #[serde(default)]
    pub(super) redirect_http: bool,
    pub(super) redirect_port: Option<u16>,
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub(super) handshake_timeout: Duration,
    #[serde(default = "default_max_handshakes")]
    pub(super) max_handshakes: usize,
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub(super) reload_interval: Duration,
    #[serde(default)]
    pub(super) min_version: MinVersion,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawClientAuth {
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
            upstream_body_timeout: Duration::from_secs(60),
            client_header_timeout: Duration::from_secs(30),
            upstream_idle_timeout: Duration::from_secs(4),
            connect_attempts: 2,
            max_header_size: ByteSize(64 * 1024),
            max_request_body: None,
            mirror_max_body: ByteSize(64 * 1024),
            max_connections: 10_000,
            shutdown_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(30),
            h2c: false,
            http2_max_concurrent_streams: 100,
            http2_idle_timeout: Duration::from_secs(180),
            client_body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_backends_per_pool: 1000,
            hosts_file: None,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) listen: String,
    pub(super) token_file: Option<PathBuf>,
    pub(super) metrics_require_token: bool,
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
pub(super) struct RawState {
    pub(super) path: PathBuf,
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
pub(super) struct RawPool {
    pub(super) backends: Vec<RawBackend>,
    #[serde(default)]
    pub(super) balance: Balance,
    pub(super) health: Option<RawHealth>,
    #[serde(default)]
    pub(super) passive: RawPassive,
    #[serde(default)]
    pub(super) panic_mode: PanicMode,
    #[serde(default, with = "humantime_serde")]
    pub(super) slow_start: Option<Duration>,
    #[serde(default = "default_dns_refresh", with = "humantime_serde")]
    pub(super) dns_refresh: Duration,
    #[serde(default)]
    pub(super) protocol: Protocol,
    pub(super) tls: Option<bool>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) server_name: Option<String>,
    pub(super) client_cert_file: Option<PathBuf>,
    pub(super) client_key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPassive {
    pub(super) consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    pub(super) ejection_time: Duration,
    pub(super) max_ejection_percent: u32,
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
pub(super) enum RawBackend {
    Addr(String),
    Weighted(RawWeightedBackend),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWeightedBackend {
    pub(super) addr: String,
    #[serde(default = "default_weight")]
    pub(super) weight: u32,
}

fn default_dns_refresh() -> Duration {
    Duration::from_secs(5)
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHealth {
    pub(super) path: String,
    #[serde(with = "humantime_serde")]
    pub(super) interval: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) timeout: Duration,
    pub(super) healthy_threshold: u32,
    pub(super) unhealthy_threshold: u32,
    pub(super) expected_status: Vec<u16>,
    pub(super) host: Option<String>,
    #[serde(with = "humantime_serde")]
    pub(super) jitter: Option<Duration>,
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
pub(super) struct RawService {
    #[serde(default = "default_hosts")]
    pub(super) hosts: Vec<String>,
    #[serde(default = "default_prefix")]
    pub(super) path_prefix: String,
    pub(super) active: String,
    pub(super) preview: Option<RawPreview>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPreview {
    pub(super) header: String,
    pub(super) pools: Vec<String>,
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
