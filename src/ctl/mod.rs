//! `switchyard ctl`: the admin API from a shell, for deploy scripts. Human-readable by
//! default, `--json` for scripts; the exit status is non-zero on any non-2xx answer.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

mod deploy;
mod rollout;

pub use rollout::{MirrorAction, MirrorArgs, RolloutAction, RolloutArgs};

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin API base URL.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN",
        default_value = "http://127.0.0.1:9901"
    )]
    pub admin: String,
    /// Bearer token for the admin API.
    #[arg(long, env = "SWITCHYARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON answer instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
    /// In a fleet: a change returns once every live instance has applied it
    /// (`?wait=converged`); exits non-zero naming the laggards otherwise.
    #[arg(long, global = true)]
    pub wait_converged: bool,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Services (active pool, canary) and backends (health, state, in flight).
    Status,
    /// Blue-green cutover: all of SERVICE's traffic to POOL.
    Switch {
        service: String,
        pool: String,
        /// Switch even if POOL has no healthy backend.
        #[arg(long)]
        force: bool,
    },
    /// Send PERCENT of SERVICE's traffic (0-100, decimals allowed) to the canary POOL.
    Canary {
        service: String,
        pool: String,
        percent: f64,
        /// Requests with this header go to the canary: NAME=VALUE.
        #[arg(long, value_parser = name_value)]
        header: Option<(String, String)>,
        /// Requests with this cookie go to the canary: NAME=VALUE.
        #[arg(long, value_parser = name_value)]
        cookie: Option<(String, String)>,
        /// Keep each user on one pool: header:NAME or cookie:NAME.
        #[arg(long)]
        sticky: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// Abort SERVICE's canary: all traffic back to the active pool.
    Abort { service: String },
    /// Make SERVICE's canary pool the active pool.
    Promote {
        service: String,
        #[arg(long)]
        force: bool,
    },
    /// Return SERVICE to its previous active pool.
    Rollback { service: String },
    /// Recent traffic changes of SERVICE.
    History { service: String },
    /// Take BACKEND out of rotation; in-flight requests finish.
    Drain {
        pool: String,
        backend: String,
        /// Wait until nothing is in flight on BACKEND (exit 1 on timeout).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Return BACKEND to rotation.
    Enable {
        pool: String,
        backend: String,
        /// Then wait until a health check that ran after the call passed.
        #[arg(long)]
        wait_healthy: bool,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Wait until BACKEND passes a health check that ran after this call.
    WaitHealthy {
        pool: String,
        backend: String,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// A rolling restart of POOL, backend by backend: drain, wait for nothing in flight,
    /// run `sh -c CMD` (with SWITCHYARD_POOL, SWITCHYARD_BACKEND, SWITCHYARD_BACKEND_HOST
    /// and SWITCHYARD_BACKEND_PORT set), wait until switchyard's health check passes,
    /// enable. Stops at the first failure with that backend drained.
    Roll {
        pool: String,
        #[arg(long = "exec", value_name = "CMD")]
        exec: String,
        /// Backends out of rotation at once.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        max_unavailable: u64,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        health_timeout: Duration,
        /// Skip the backends before this one (to resume a roll that stopped).
        #[arg(long, value_name = "ADDR")]
        start_at: Option<String>,
    },
    /// Blue-green in one command: run `--exec CMD` (deploy POOL), wait until every
    /// backend of POOL is healthy, run `--test CMD` (with SWITCHYARD_PROXY and
    /// SWITCHYARD_PREVIEW_HEADER to reach POOL through the proxy), then switch SERVICE
    /// to POOL. A failed step switches nothing.
    Release {
        service: String,
        #[arg(long = "to", value_name = "POOL")]
        to: String,
        #[arg(long = "exec", value_name = "CMD")]
        exec: Option<String>,
        #[arg(long = "test", value_name = "CMD")]
        test: Option<String>,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        health_timeout: Duration,
    },
    /// A step canary the proxy judges and moves itself: `rollout SERVICE POOL --steps
    /// 10,50,100 --hold 1m --max-error-rate 1% [--wait]` starts one (`--wait` follows
    /// it and exits 0 only when promoted); `rollout status|pause|resume|abort SERVICE`.
    Rollout(Box<RolloutArgs>),
    /// Copy PERCENT of SERVICE's requests to POOL (answers discarded):
    /// `mirror SERVICE POOL PERCENT`; `mirror off SERVICE` stops it.
    Mirror(MirrorArgs),
    /// The fleet (`[cluster]`): this instance's connection to etcd and the live members
    /// with the generation each has applied.
    Cluster,
    /// Re-read the config file, TLS files included: prints what changed, or the error
    /// (file, key and line) and exits non-zero with nothing changed.
    Reload,
    /// Replace the running binary without dropping a connection: the process starts the
    /// executable at its own path (install the new one there first) and hands it the
    /// listeners; prints both pids, or why not (the old process keeps serving).
    Upgrade,
    /// The HTTPS listener's certificates: `tls` shows them, `tls reload` reads the
    /// files again (a bad file is refused and the old certificates stay).
    Tls {
        #[command(subcommand)]
        action: Option<TlsAction>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TlsAction {
    /// Read the certificate files again.
    Reload,
}

fn certificate_lines(answer: &Value) -> String {
    let mut out = String::new();
    for cert in answer["certificates"].as_array().into_iter().flatten() {
        let names: Vec<&str> = cert["names"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        out.push_str(&format!(
            "{}  expires {}  {}\n",
            s(&cert["cert_file"]),
            cert["not_after"].as_str().unwrap_or("?"),
            names.join(",")
        ));
    }
    out
}

fn name_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got `{text}`"))
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("{0}")]
    Verdict(String),
}

/// Runs one ctl command and returns what to print on stdout.
pub async fn run(args: &CtlArgs) -> Result<String, CtlError> {
    let api = Api::new(args)?;
    let (answer, summary): (Value, fn(&Value) -> String) = match &args.action {
        Action::Status => {
            let mut state = api.call(Method::GET, "/api/v1/state", None).await?;
            // An older switchyard has no /api/v1/info; the status is still worth showing.
            if let Ok(info) = api.call(Method::GET, "/api/v1/info", None).await {
                state["process"] = info;
            }
            (state, status_table)
        }
        Action::Upgrade => (
            api.call(Method::POST, "/api/v1/upgrade", None).await?,
            |v: &Value| {
                format!(
                    "upgraded: pid {} serves now ({}); pid {} drains and exits\n",
                    s(&v["new_pid"]),
                    s(&v["executable"]),
                    s(&v["old_pid"])
                )
            },
        ),
        Action::Cluster => (
            api.call(Method::GET, "/api/v1/cluster", None).await?,
            cluster_lines,
        ),
        Action::Reload => (
            api.call(Method::POST, "/api/v1/config/reload", None)
                .await?,
            reload_lines,
        ),
        Action::Switch {
            service,
            pool,
            force,
        } => (
            api.call(
                Method::POST,
                &format!("/api/v1/services/{}/switch", segment(service)),
                Some(json!({ "to": pool, "force": force })),
            )
            .await?,
            service_line,
        ),
        Action::Canary {
            service,
            pool,
            percent,
            header,
            cookie,
            sticky,
            force,
        } => {
            let mut body = json!({ "pool": pool, "weight": percent, "force": force });
            if let Some((name, value)) = header {
                body["header"] = json!({ "name": name, "value": value });
            }
            if let Some((name, value)) = cookie {
                body["cookie"] = json!({ "name": name, "value": value });
            }
            if let Some(sticky) = sticky {
                body["sticky"] = json!(sticky);
            }
            let path = format!("/api/v1/services/{}/canary", segment(service));
            (
                api.call(Method::PUT, &path, Some(body)).await?,
                service_line,
            )
        }
        Action::Abort { service } => (
            api.call(
                Method::DELETE,
                &format!("/api/v1/services/{}/canary", segment(service)),
                None,
            )
            .await?,
            service_line,
        ),
        Action::Promote { service, force } => (
            api.call(
                Method::POST,
                &format!("/api/v1/services/{}/promote", segment(service)),
                Some(json!({ "force": force })),
            )
            .await?,
            service_line,
        ),
        Action::Rollback { service } => (
            api.call(
                Method::POST,
                &format!("/api/v1/services/{}/rollback", segment(service)),
                None,
            )
            .await?,
            service_line,
        ),
        Action::History { service } => (
            api.call(
                Method::GET,
                &format!("/api/v1/services/{}/history", segment(service)),
                None,
            )
            .await?,
            history_lines,
        ),
        Action::Drain {
            pool,
            backend,
            wait,
            timeout,
        } => {
            let base = format!(
                "/api/v1/pools/{}/backends/{}",
                segment(pool),
                segment(backend)
            );
            let drained = api
                .call(Method::POST, &format!("{base}/drain"), None)
                .await?;
            if !*wait {
                (drained, backend_line)
            } else {
                let timeout = humantime::format_duration(*timeout);
                let path = format!(
                    "{base}/wait-drained?timeout={}",
                    timeout.to_string().replace(' ', "")
                );
                let waited = api.call(Method::GET, &path, None).await?;
                (waited, |v: &Value| {
                    format!(
                        "{} {}: drained, nothing in flight\n",
                        s(&v["pool"]),
                        s(&v["addr"])
                    )
                })
            }
        }
        Action::Tls { action: None } => (
            api.call(Method::GET, "/api/v1/tls", None).await?,
            certificate_lines,
        ),
        Action::Tls {
            action: Some(TlsAction::Reload),
        } => (
            api.call(Method::POST, "/api/v1/tls/reload", None).await?,
            certificate_lines,
        ),
        Action::Enable {
            pool,
            backend,
            wait_healthy,
            timeout,
        } => {
            let enabled = api
                .call(
                    Method::POST,
                    &format!(
                        "/api/v1/pools/{}/backends/{}/enable",
                        segment(pool),
                        segment(backend)
                    ),
                    None,
                )
                .await?;
            if *wait_healthy {
                (
                    deploy::wait_healthy(&api, pool, backend, *timeout).await?,
                    healthy_line,
                )
            } else {
                (enabled, backend_line)
            }
        }
        Action::WaitHealthy {
            pool,
            backend,
            timeout,
        } => (
            deploy::wait_healthy(&api, pool, backend, *timeout).await?,
            healthy_line,
        ),
        Action::Roll {
            pool,
            exec,
            max_unavailable,
            drain_timeout,
            health_timeout,
            start_at,
        } => {
            let roll = deploy::Roll {
                pool,
                exec,
                max_unavailable: *max_unavailable as usize,
                drain_timeout: *drain_timeout,
                health_timeout: *health_timeout,
                start_at: start_at.as_deref(),
                json: args.json,
            };
            // Progress went to stdout as it happened.
            return deploy::roll(&api, &roll).await;
        }
        Action::Rollout(rollout_args) => {
            return rollout::rollout(&api, rollout_args, args.json).await;
        }
        Action::Mirror(mirror_args) => (rollout::mirror(&api, mirror_args).await?, service_line),
        Action::Release {
            service,
            to,
            exec,
            test,
            health_timeout,
        } => {
            let release = deploy::Release {
                service,
                to,
                exec: exec.as_deref(),
                test: test.as_deref(),
                health_timeout: *health_timeout,
                json: args.json,
            };
            return deploy::release(&api, &release).await;
        }
    };
    Ok(if args.json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        )
    } else {
        summary(&answer)
    })
}

struct Api {
    base: String,
    wait_converged: bool,
    token: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Api {
    fn new(args: &CtlArgs) -> Result<Api, CtlError> {
        let base = args.admin.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(CtlError::Usage(format!(
                "--admin must be an http:// URL such as http://127.0.0.1:9901, got `{base}`"
            )));
        }
        Ok(Api {
            base,
            wait_converged: args.wait_converged,
            token: args.token.clone(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        let mut url = format!("{}{path}", self.base);
        if self.wait_converged && method != Method::GET {
            url.push(if path.contains('?') { '&' } else { '?' });
            url.push_str("wait=converged");
        }
        let mut request = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(value) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(value.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .map_err(|e| CtlError::Usage(format!("bad URL `{url}`: {e}")))?;
        let unreachable = |reason: String| CtlError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        // The long poll may take up to ten minutes; anything else answers at once.
        let response = tokio::time::timeout(Duration::from_secs(660), self.client.request(request))
            .await
            .map_err(|_| unreachable("no answer".into()))?
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes) }));
        if !status.is_success() {
            let message = match (value["code"].as_str(), value["error"].as_str()) {
                (Some(code), Some(error)) => format!("{code}: {error}"),
                (_, Some(error)) => error.to_string(),
                _ => value.to_string(),
            };
            return Err(CtlError::Api { status, message });
        }
        Ok(value)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Percent-encodes what cannot stand in a path segment (IPv6 brackets stay readable).
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:[]".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn s(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn canary_text(canary: &Value) -> String {
    if canary.is_null() {
        return "-".into();
    }
    let mut text = format!("{} {}%", s(&canary["pool"]), s(&canary["weight"]));
    if !canary["header"].is_null() {
        let _ = write!(
            text,
            " header {}={}",
            s(&canary["header"]["name"]),
            s(&canary["header"]["value"])
        );
    }
    if !canary["cookie"].is_null() {
        let _ = write!(
            text,
            " cookie {}={}",
            s(&canary["cookie"]["name"]),
            s(&canary["cookie"]["value"])
        );
    }
    if !canary["sticky"].is_null() {
        let _ = write!(text, " sticky {}", s(&canary["sticky"]));
    }
    text
}

fn service_line(v: &Value) -> String {
    let mirror = match v["mirror"]["pool"].as_str() {
        Some(pool) => format!(
            ", mirror {pool} {}%",
            rollout::number(&v["mirror"]["percent"])
        ),
        None => String::new(),
    };
    format!(
        "{}: active {}, canary {}{mirror} (generation {})\n",
        s(&v["name"]),
        s(&v["active"]),
        canary_text(&v["canary"]),
        s(&v["generation"])
    )
}

fn backend_line(v: &Value) -> String {
    format!(
        "{} {}: {}, health {}, {} in flight (generation {})\n",
        s(&v["pool"]),
        s(&v["addr"]),
        s(&v["state"]),
        s(&v["health"]),
        s(&v["in_flight"]),
        s(&v["generation"])
    )
}

fn history_lines(v: &Value) -> String {
    let mut out = format!(
        "{} (generation {})\n",
        s(&v["service"]),
        s(&v["generation"])
    );
    for entry in v["history"].as_array().into_iter().flatten() {
        let canary = match entry["canary_pool"].as_str() {
            Some(pool) => format!(", canary {pool} {}%", s(&entry["canary_weight"])),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  {}  #{:<4} {:<13} active {}{canary}",
            s(&entry["at"]),
            s(&entry["generation"]),
            s(&entry["kind"]),
            s(&entry["active"])
        );
        if let Some(reason) = entry["reason"].as_str() {
            let _ = writeln!(out, "      {reason}");
        }
    }
    out
}

fn cluster_lines(v: &Value) -> String {
    let mut out = format!(
        "{} connected={} generation {}\n",
        s(&v["name"]),
        s(&v["connected"]),
        s(&v["generation"])
    );
    for member in v["members"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<20} generation {:<8} {}  seen {}\n",
            s(&member["name"]),
            s(&member["generation"]),
            s(&member["admin"]),
            s(&member["last_seen"])
        ));
    }
    out
}

fn healthy_line(v: &Value) -> String {
    format!(
        "{} {}: healthy ({})\n",
        s(&v["pool"]),
        s(&v["addr"]),
        s(&v["state"])
    )
}

fn reload_lines(v: &Value) -> String {
    let changes = v["changes"].as_array().map_or(&[][..], |c| c.as_slice());
    let mut out = format!(
        "reloaded: generation {}, {} changes\n",
        s(&v["generation"]),
        changes.len()
    );
    for change in changes {
        out.push_str(&format!(
            "  {} {}: {}\n",
            s(&change["change"]),
            s(&change["key"]),
            s(&change["detail"])
        ));
    }
    out
}

fn status_table(v: &Value) -> String {
    let mut rows = vec![["SERVICE", "ACTIVE", "CANARY", "PREVIOUS"]
        .map(String::from)
        .to_vec()];
    for service in v["services"].as_array().into_iter().flatten() {
        rows.push(vec![
            s(&service["name"]),
            s(&service["active"]),
            canary_text(&service["canary"]),
            s(&service["previous_active"]),
        ]);
    }
    let mut out = String::new();
    if let Some(process) = v.get("process") {
        out.push_str(&format!(
            "switchyard {} pid {} since {}\n",
            s(&process["version"]),
            s(&process["pid"]),
            s(&process["started_at"])
        ));
    }
    out.push_str(&format!("generation {}\n\n", s(&v["generation"])));
    out.push_str(&table(&rows));
    let mut rows = vec![
        ["POOL", "BACKEND", "WEIGHT", "HEALTH", "STATE", "IN-FLIGHT"]
            .map(String::from)
            .to_vec(),
    ];
    for pool in v["pools"].as_array().into_iter().flatten() {
        for b in pool["backends"].as_array().into_iter().flatten() {
            rows.push(vec![
                s(&pool["name"]),
                s(&b["addr"]),
                s(&b["weight"]),
                s(&b["health"]),
                s(&b["state"]),
                s(&b["in_flight"]),
            ]);
        }
    }
    out.push('\n');
    out.push_str(&table(&rows));
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|t| t.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_keep_addresses_readable_and_escape_the_rest() {
        assert_eq!(segment("127.0.0.1:9001"), "127.0.0.1:9001");
        assert_eq!(segment("[::1]:80"), "[::1]:80");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn the_status_table_lines_up() {
        let v = json!({
            "generation": 3,
            "services": [{"name": "app", "active": "blue", "canary": {"pool": "green", "weight": 12.5}, "previous_active": null}],
            "pools": [{"name": "blue", "backends": [{"addr": "127.0.0.1:9001", "weight": 1, "health": "healthy", "state": "draining", "in_flight": 2}]}]
        });
        let text = status_table(&v);
        assert!(text.contains("app      blue    green 12.5%  -"), "{text}");
        assert!(
            text.contains("blue  127.0.0.1:9001  1       healthy  draining  2"),
            "{text}"
        );
    }
}
