//! `ctl rollout` and `ctl mirror`: start, watch and steer a rollout the proxy judges,
//! and mirror a share of a service's requests.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};

use super::{s, segment, Api, CtlError};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub action: Option<RolloutAction>,
    #[command(flatten)]
    pub start: StartArgs,
}

/// `ctl rollout SERVICE POOL --steps ...`: start one.
#[derive(Debug, Args)]
pub struct StartArgs {
    pub service: Option<String>,
    /// The canary pool.
    pub pool: Option<String>,
    /// Weights in percent, rising, comma-separated; `pause` waits for `resume`.
    #[arg(long, default_value = "10,50,100")]
    pub steps: String,
    /// How long each step holds, with every analysis window passing.
    #[arg(long)]
    pub hold: Option<String>,
    /// Length of one analysis window.
    #[arg(long)]
    pub interval: Option<String>,
    /// A window in which the canary answered fewer requests is inconclusive.
    #[arg(long)]
    pub min_requests: Option<u64>,
    /// Highest canary error rate (5xx), e.g. `1%` or `0.01`.
    #[arg(long, value_parser = rate)]
    pub max_error_rate: Option<f64>,
    /// Highest canary error rate minus the stable pool's, e.g. `0.5%`.
    #[arg(long, value_parser = rate)]
    pub max_error_rate_increase: Option<f64>,
    /// Highest canary p99 over the stable pool's p99.
    #[arg(long)]
    pub max_p99_ratio: Option<f64>,
    /// Failed windows tolerated before the rollout fails.
    #[arg(long)]
    pub failure_limit: Option<u32>,
    /// What a failure past the limit does: rollback or pause.
    #[arg(long)]
    pub on_failure: Option<String>,
    /// Keep each user on one side as the weight grows: header:NAME or cookie:NAME.
    #[arg(long)]
    pub sticky: Option<String>,
    /// A URL that must answer 2xx to a POST before each step.
    #[arg(long)]
    pub pre_step: Option<String>,
    /// A URL that must answer 2xx to a POST before promotion.
    #[arg(long)]
    pub pre_promote: Option<String>,
    /// Then follow it to its verdict: exit 0 when promoted, 1 otherwise.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit 1, the rollout goes on) after this long.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Where SERVICE's rollout stands, with the last analysis windows.
    Status {
        service: String,
        /// Follow it to its verdict: exit 0 when promoted, 1 otherwise.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Hold it where it is.
    Pause { service: String },
    /// Go on: past a pause step, or the current step again after a pause.
    Resume { service: String },
    /// End it: back to the stable pool, weight 0.
    Abort { service: String },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MirrorArgs {
    #[command(subcommand)]
    pub action: Option<MirrorAction>,
    pub service: Option<String>,
    /// The pool that gets the copies.
    pub pool: Option<String>,
    /// Percent of SERVICE's requests copied.
    pub percent: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub enum MirrorAction {
    /// Stop mirroring SERVICE.
    Off { service: String },
}

fn rate(text: &str) -> Result<f64, String> {
    let (number, scale) = match text.strip_suffix('%') {
        Some(number) => (number, 100.0),
        None => (text, 1.0),
    };
    number
        .trim()
        .parse::<f64>()
        .map(|v| v / scale)
        .map_err(|_| format!("expected a rate such as 1% or 0.01, got `{text}`"))
}

fn path(service: &str, tail: &str) -> String {
    format!("/api/v1/services/{}/{tail}", segment(service))
}

pub(super) async fn rollout(
    api: &Api,
    args: &RolloutArgs,
    json_out: bool,
) -> Result<String, CtlError> {
    let (service, answer, wait) = match &args.action {
        Some(RolloutAction::Status {
            service,
            wait,
            timeout,
        }) => {
            let answer = api
                .call(Method::GET, &path(service, "rollout"), None)
                .await?;
            (service.as_str(), answer, wait.then_some(*timeout))
        }
        Some(RolloutAction::Pause { service }) => (
            service.as_str(),
            api.call(Method::POST, &path(service, "rollout/pause"), None)
                .await?,
            None,
        ),
        Some(RolloutAction::Resume { service }) => (
            service.as_str(),
            api.call(Method::POST, &path(service, "rollout/resume"), None)
                .await?,
            None,
        ),
        Some(RolloutAction::Abort { service }) => (
            service.as_str(),
            api.call(Method::POST, &path(service, "rollout/abort"), None)
                .await?,
            None,
        ),
        None => {
            let start = &args.start;
            let (Some(service), Some(pool)) = (&start.service, &start.pool) else {
                return Err(CtlError::Usage(
                    "usage: ctl rollout SERVICE POOL [--steps 10,50,100] [--hold 1m] ..., or ctl rollout status|pause|resume|abort SERVICE".into(),
                ));
            };
            let answer = api
                .call(
                    Method::POST,
                    &path(service, "rollout"),
                    Some(start_body(start, pool)?),
                )
                .await?;
            (
                service.as_str(),
                answer,
                start.wait.then_some(start.timeout),
            )
        }
    };
    let Some(timeout) = wait else {
        return Ok(if json_out {
            pretty(&answer)
        } else {
            rollout_text(&answer)
        });
    };
    follow(api, service, answer, timeout, json_out).await
}

fn start_body(start: &StartArgs, pool: &str) -> Result<Value, CtlError> {
    let steps: Vec<Value> = start
        .steps
        .split(',')
        .map(|step| {
            let step = step.trim();
            if step == "pause" {
                return Ok(json!("pause"));
            }
            step.trim_end_matches('%')
                .parse::<f64>()
                .map(|w| json!(w))
                .map_err(|_| {
                    CtlError::Usage(format!("--steps: `{step}` is neither a weight nor `pause`"))
                })
        })
        .collect::<Result<_, _>>()?;
    let mut analysis = json!({});
    if let Some(v) = &start.interval {
        analysis["interval"] = json!(v);
    }
    if let Some(v) = start.min_requests {
        analysis["min_requests"] = json!(v);
    }
    if let Some(v) = start.max_error_rate {
        analysis["max_error_rate"] = json!(v);
    }
    if let Some(v) = start.max_error_rate_increase {
        analysis["max_error_rate_increase"] = json!(v);
    }
    if let Some(v) = start.max_p99_ratio {
        analysis["max_p99_ratio"] = json!(v);
    }
    if let Some(v) = start.failure_limit {
        analysis["failure_limit"] = json!(v);
    }
    let mut body = json!({ "pool": pool, "steps": steps, "analysis": analysis });
    if let Some(v) = &start.hold {
        body["hold"] = json!(v);
    }
    if let Some(v) = &start.on_failure {
        body["on_failure"] = json!(v);
    }
    if let Some(v) = &start.sticky {
        body["sticky"] = json!(v);
    }
    if start.pre_step.is_some() || start.pre_promote.is_some() {
        body["gates"] = json!({});
        if let Some(v) = &start.pre_step {
            body["gates"]["pre_step"] = json!(v);
        }
        if let Some(v) = &start.pre_promote {
            body["gates"]["pre_promote"] = json!(v);
        }
    }
    Ok(body)
}

/// Prints each step and each analysis window as they come, until the rollout ends.
async fn follow(
    api: &Api,
    service: &str,
    mut answer: Value,
    timeout: Duration,
    json_out: bool,
) -> Result<String, CtlError> {
    let deadline = Instant::now() + timeout;
    let mut seen: HashSet<String> = HashSet::new();
    let mut last_step = 0;
    loop {
        if !json_out {
            let mut out = String::new();
            let step = answer["step"].as_u64().unwrap_or(0);
            if step != last_step {
                last_step = step;
                let _ = writeln!(
                    out,
                    "step {step}: {}% to {}",
                    number(&answer["weight"]),
                    s(&answer["pool"])
                );
            }
            for window in answer["results"].as_array().into_iter().flatten() {
                let key = format!("{}{}", s(&window["at"]), s(&window["step"]));
                if seen.insert(key) {
                    out.push_str(&window_line(window));
                }
            }
            print!("{out}");
        }
        let status = answer["status"].as_str().unwrap_or("").to_string();
        if !matches!(status.as_str(), "progressing" | "paused") {
            let text = if json_out {
                pretty(&answer)
            } else {
                rollout_text(&answer)
            };
            return if status == "promoted" {
                Ok(text)
            } else {
                print!("{text}");
                Err(CtlError::Verdict(format!(
                    "the rollout of `{service}` ended {status}"
                )))
            };
        }
        if Instant::now() > deadline {
            return Err(CtlError::Verdict(format!(
                "the rollout of `{service}` is still {status} after {}; it goes on",
                humantime::format_duration(timeout)
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        answer = api
            .call(Method::GET, &path(service, "rollout"), None)
            .await?;
    }
}

/// A percentage or step as a person writes it: `20`, `12.5`, `pause`.
pub(super) fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(n) if n.fract() == 0.0 => format!("{n:.0}"),
        Some(n) => n.to_string(),
        None => s(v),
    }
}

fn pretty(value: &Value) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

fn side(v: &Value) -> String {
    let rate = v["error_rate"]
        .as_f64()
        .map_or("-".into(), |r| format!("{:.2}%", r * 100.0));
    let p99 = v["p99_seconds"]
        .as_f64()
        .map_or("-".into(), |p| format!("{:.1}ms", p * 1000.0));
    format!("{} req, errors {rate}, p99 {p99}", s(&v["requests"]))
}

fn window_line(window: &Value) -> String {
    let mut line = format!(
        "  {} step {} {:<12} canary {} | stable {}",
        s(&window["at"]),
        s(&window["step"]),
        s(&window["verdict"]),
        side(&window["canary"]),
        side(&window["stable"])
    );
    for reason in window["reasons"].as_array().into_iter().flatten() {
        let _ = write!(line, "\n      {}", s(reason));
    }
    line.push('\n');
    line
}

pub(super) fn rollout_text(v: &Value) -> String {
    let steps: Vec<String> = v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(number)
        .collect();
    let live = matches!(v["status"].as_str(), Some("progressing" | "paused"));
    let weight = if live {
        format!(", weight {}%", number(&v["weight"]))
    } else {
        String::new()
    };
    let mut text = format!(
        "{}: rollout to {} {} at step {} of {} [{}]{weight}, failures {}\n",
        s(&v["service"]),
        s(&v["pool"]),
        s(&v["status"]),
        s(&v["step"]),
        steps.len(),
        steps.join(", "),
        s(&v["failures"])
    );
    if let Some(reason) = v["reason"].as_str() {
        let _ = writeln!(text, "  reason: {reason}");
    }
    if let Some(left) = v["step_time_left_seconds"].as_f64() {
        let _ = writeln!(text, "  step holds {left:.1}s more if every window passes");
    }
    for window in v["results"].as_array().into_iter().flatten() {
        text.push_str(&window_line(window));
    }
    text
}

pub(super) async fn mirror(api: &Api, args: &MirrorArgs) -> Result<Value, CtlError> {
    match (&args.action, &args.service, &args.pool, args.percent) {
        (Some(MirrorAction::Off { service }), _, _, _) => {
            api.call(Method::DELETE, &path(service, "mirror"), None)
                .await
        }
        (None, Some(service), Some(pool), Some(percent)) => {
            api.call(
                Method::PUT,
                &path(service, "mirror"),
                Some(json!({ "pool": pool, "percent": percent })),
            )
            .await
        }
        _ => Err(CtlError::Usage(
            "usage: ctl mirror SERVICE POOL PERCENT, or ctl mirror off SERVICE".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_take_percent_or_fraction() {
        assert_eq!(rate("1%"), Ok(0.01));
        assert_eq!(rate("0.5"), Ok(0.5));
        assert!(rate("lots").is_err());
    }
}
