//! Step canaries judged on live traffic: what a rollout request asks for, the durable
//! record of one (kept in the traffic state, so it survives restarts and lives in etcd
//! with the rest of a fleet's state), and the pure judgement of one analysis window.
//! When to judge and what to change is `control::rollouts`' job.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most steps one rollout may have.
pub const MAX_STEPS: usize = 20;
/// Shortest analysis interval: below this a window holds too few requests to judge.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// One step as the API takes it: a weight in percent, or `"pause"` (wait for resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StepSpec {
    Weight(f64),
    /// Only `"pause"`.
    Gate(String),
}

/// A step as kept: weights in basis points, like the canary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Weight(u32),
    Pause,
}

impl Serialize for Step {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Step::Weight(bp) => serializer.serialize_f64(f64::from(*bp) / 100.0),
            Step::Pause => serializer.serialize_str("pause"),
        }
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Step, D::Error> {
        let spec = StepSpec::deserialize(deserializer)?;
        Step::from_spec(&spec).map_err(serde::de::Error::custom)
    }
}

impl Step {
    fn from_spec(spec: &StepSpec) -> Result<Step, String> {
        match spec {
            StepSpec::Weight(w) if w.is_finite() && *w > 0.0 && *w <= 100.0 => {
                Ok(Step::Weight((w * 100.0).round() as u32))
            }
            StepSpec::Weight(w) => Err(format!(
                "a step's weight must be above 0 and at most 100, got {w}"
            )),
            StepSpec::Gate(word) if word == "pause" => Ok(Step::Pause),
            StepSpec::Gate(word) => Err(format!("a step is a weight or \"pause\", got \"{word}\"")),
        }
    }
}

/// The analysis settings as the API takes them; every key has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// Length of one analysis window, e.g. `"10s"` (at least 100ms).
    #[serde(default = "default_interval", with = "humantime_serde")]
    #[schema(value_type = String, example = "10s")]
    pub interval: Duration,
    /// A window in which the canary answered fewer requests is inconclusive: never a
    /// pass, never a failure.
    #[serde(default = "default_min_requests")]
    #[schema(minimum = 1)]
    pub min_requests: u64,
    /// Highest share of the canary's answers that may be 5xx (the app's and the
    /// proxy's own), 0 to 1. Default 0.01.
    /// `null` turns it off; kept as `null` in the state file, so a restart does not
    /// bring the default back.
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: Option<f64>,
    /// Highest canary error rate minus the stable pool's, on the same window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate_increase: Option<f64>,
    /// Highest canary p99 over the stable pool's p99, on the same window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    /// Failed windows (and failed gates) tolerated; one more ends the rollout.
    #[serde(default)]
    pub failure_limit: u32,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_min_requests() -> u64 {
    100
}

fn default_max_error_rate() -> Option<f64> {
    Some(0.01)
}

impl Default for Analysis {
    fn default() -> Analysis {
        Analysis {
            interval: default_interval(),
            min_requests: default_min_requests(),
            max_error_rate: default_max_error_rate(),
            max_error_rate_increase: None,
            max_p99_ratio: None,
            failure_limit: 0,
        }
    }
}

/// What a failure past the limit does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Weight 0 and the canary removed, at once.
    #[default]
    Rollback,
    /// Stop where it is (the canary keeps its weight) until resumed or aborted.
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    Progressing,
    Paused,
    Promoted,
    RolledBack,
    Aborted,
}

impl RolloutStatus {
    /// Progressing or paused: the rollout still owns the service's canary.
    pub fn is_live(self) -> bool {
        matches!(self, RolloutStatus::Progressing | RolloutStatus::Paused)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Progressing => "progressing",
            RolloutStatus::Paused => "paused",
            RolloutStatus::Promoted => "promoted",
            RolloutStatus::RolledBack => "rolled_back",
            RolloutStatus::Aborted => "aborted",
        }
    }
}

/// URLs that must answer 2xx to a POST before a step's weight is set (`pre_step`) and
/// before the canary is promoted (`pre_promote`). A refusal counts as a failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_promote: Option<String>,
}

/// `POST /api/v1/services/{service}/rollout`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// The canary pool: the new version.
    pub pool: String,
    /// Weights in percent, rising; `"pause"` waits for `resume`.
    pub steps: Vec<StepSpec>,
    /// How long each step holds (with every window passing) before the next, e.g.
    /// `"1m"`. Default: one analysis interval.
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "1m")]
    pub hold: Option<Duration>,
    #[serde(default)]
    pub analysis: Option<Analysis>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// As the canary's: `"header:NAME"` or `"cookie:NAME"` keeps each user on one side
    /// as the weight grows.
    #[serde(default)]
    pub sticky: Option<String>,
    #[serde(default)]
    pub gates: Option<Gates>,
}

/// The durable record of a rollout: what was asked and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub pool: String,
    pub steps: Vec<Step>,
    #[serde(with = "humantime_serde")]
    pub hold: Duration,
    pub analysis: Analysis,
    pub on_failure: OnFailure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<String>,
    #[serde(default)]
    pub gates: Gates,
    pub status: RolloutStatus,
    /// Index into `steps` of the step in force.
    pub step: usize,
    /// When the step in force began, ms since the Unix epoch: a restart measures the
    /// hold from here.
    pub step_started_ms: u64,
    /// Failed windows and gates so far.
    pub failures: u32,
    /// Paused by a failure while its pool had no healthy backend: the canary's weight
    /// is taken away (users would only meet errors there) until it is resumed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withheld: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The window that ended it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<WindowResult>,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
}

impl Rollout {
    /// Checks `request` and makes the rollout it asks for, at its first step (not yet
    /// applied to the canary: the caller does that).
    pub fn from_request(
        request: &RolloutRequest,
        now_ms: u64,
        now: String,
    ) -> Result<Rollout, String> {
        if request.pool.is_empty() {
            return Err("`pool` must name the canary pool".into());
        }
        if request.steps.is_empty() {
            return Err("`steps` must list at least one weight".into());
        }
        let steps = request
            .steps
            .iter()
            .map(Step::from_spec)
            .collect::<Result<Vec<_>, _>>()?;
        let analysis = request.analysis.clone().unwrap_or_default();
        let gates = request.gates.clone().unwrap_or_default();
        check_plan(&steps, &analysis, &gates)?;
        let hold = request.hold.unwrap_or(analysis.interval);
        Ok(Rollout {
            pool: request.pool.clone(),
            steps,
            hold,
            analysis,
            on_failure: request.on_failure,
            sticky: request.sticky.clone(),
            gates,
            status: RolloutStatus::Progressing,
            step: 0,
            step_started_ms: now_ms,
            failures: 0,
            withheld: false,
            reason: None,
            verdict: None,
            started_at: now,
            ended_at: None,
        })
    }

    /// Checks a rollout read back (from the state file or etcd) as a request is
    /// checked, and that its step is one of its steps.
    pub fn check_saved(&self) -> Result<(), String> {
        check_plan(&self.steps, &self.analysis, &self.gates)?;
        if self.step >= self.steps.len() {
            return Err(format!(
                "step {} of {} steps",
                self.step + 1,
                self.steps.len()
            ));
        }
        Ok(())
    }

    /// The step in force (a saved rollout is checked, so there is one).
    pub fn current_step(&self) -> Step {
        self.steps.get(self.step).copied().unwrap_or(Step::Pause)
    }

    /// The weight the step in force gives the canary (a pause keeps the one before).
    pub fn weight_bp(&self) -> u32 {
        let end = (self.step + 1).min(self.steps.len());
        self.steps[..end]
            .iter()
            .rev()
            .find_map(|s| match s {
                Step::Weight(bp) => Some(*bp),
                Step::Pause => None,
            })
            .unwrap_or(0)
    }

    pub fn is_last_step(&self) -> bool {
        self.step + 1 >= self.steps.len()
    }

    /// Ends it with `status`, and why.
    pub fn end(&mut self, status: RolloutStatus, reason: String, now: String) {
        self.status = status;
        self.reason = Some(reason);
        self.ended_at = Some(now);
    }
}

/// One side's answers in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SideCounts {
    pub requests: u64,
    /// 5xx, the app's and the proxy's own.
    pub errors: u64,
    /// Absent without requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Estimated from the duration histogram, as Prometheus' `histogram_quantile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_seconds: Option<f64>,
}

impl SideCounts {
    pub fn new(requests: u64, errors: u64, p99_seconds: Option<f64>) -> SideCounts {
        SideCounts {
            requests,
            errors,
            error_rate: (requests > 0).then(|| errors as f64 / requests as f64),
            p99_seconds,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// One analysis window, judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowResult {
    /// RFC 3339, when the window ended.
    pub at: String,
    /// 1-based, the step it was judged in.
    pub step: usize,
    /// Percent, the canary's weight during the window.
    pub weight: f64,
    pub verdict: Verdict,
    pub canary: SideCounts,
    pub stable: SideCounts,
    /// Why it failed or was inconclusive, with the numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// Judges one window of the canary against the stable pool. The comparisons with the
/// stable pool need it to have answered `min_requests` too; without that (the last
/// step at 100%, a header-only canary) only the absolute limit applies.
pub fn judge(
    analysis: &Analysis,
    canary: SideCounts,
    stable: SideCounts,
) -> (Verdict, Vec<String>) {
    let mut failed = Vec::new();
    if canary.requests < analysis.min_requests {
        return (
            Verdict::Inconclusive,
            vec![format!(
                "the canary answered {} requests, fewer than min_requests {}",
                canary.requests, analysis.min_requests
            )],
        );
    }
    let canary_rate = canary.error_rate.unwrap_or(0.0);
    if let Some(limit) = analysis.max_error_rate {
        if canary_rate > limit {
            failed.push(format!(
                "error rate {} ({} of {}) above max_error_rate {}",
                percent(canary_rate),
                canary.errors,
                canary.requests,
                percent(limit)
            ));
        }
    }
    let stable_comparable = stable.requests >= analysis.min_requests;
    if let (Some(limit), true) = (analysis.max_error_rate_increase, stable_comparable) {
        let stable_rate = stable.error_rate.unwrap_or(0.0);
        if canary_rate - stable_rate > limit {
            failed.push(format!(
                "error rate {} against the stable pool's {}: up {}, above max_error_rate_increase {}",
                percent(canary_rate),
                percent(stable_rate),
                percent(canary_rate - stable_rate),
                percent(limit)
            ));
        }
    }
    if let (Some(limit), true) = (analysis.max_p99_ratio, stable_comparable) {
        if let (Some(c), Some(s)) = (canary.p99_seconds, stable.p99_seconds) {
            // A stable p99 of 0 (all in the first bucket's low end) cannot be divided by.
            let ratio = if s > 0.0 { c / s } else { f64::INFINITY };
            if ratio > limit && c > s {
                failed.push(format!(
                    "p99 {:.1} ms against the stable pool's {:.1} ms: {:.2}x, above max_p99_ratio {}",
                    c * 1000.0,
                    s * 1000.0,
                    ratio,
                    limit
                ));
            }
        }
    }
    if failed.is_empty() {
        (Verdict::Pass, failed)
    } else {
        (Verdict::Fail, failed)
    }
}

fn percent(rate: f64) -> String {
    format!("{:.2}%", rate * 100.0)
}

/// What a rollout's steps, analysis and gates must be, asked for or read back.
fn check_plan(steps: &[Step], analysis: &Analysis, gates: &Gates) -> Result<(), String> {
    if steps.len() > MAX_STEPS {
        return Err(format!("at most {MAX_STEPS} steps, got {}", steps.len()));
    }
    let mut last = 0;
    for step in steps {
        if let Step::Weight(bp) = *step {
            if bp <= last {
                return Err(format!(
                    "step weights must rise: {} after {}",
                    f64::from(bp) / 100.0,
                    f64::from(last) / 100.0
                ));
            }
            last = bp;
        }
    }
    if last == 0 {
        return Err("`steps` must list at least one weight".into());
    }
    if steps.last() == Some(&Step::Pause) {
        return Err("the last step must be a weight: it is the one promoted".into());
    }
    if analysis.interval < MIN_INTERVAL {
        return Err(format!(
            "analysis.interval must be at least {MIN_INTERVAL:?}, got {:?}",
            analysis.interval
        ));
    }
    if analysis.min_requests == 0 {
        return Err("analysis.min_requests must be at least 1".into());
    }
    for (key, value) in [
        ("max_error_rate", analysis.max_error_rate),
        ("max_error_rate_increase", analysis.max_error_rate_increase),
    ] {
        if let Some(v) = value {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return Err(format!("analysis.{key} must be between 0 and 1, got {v}"));
            }
        }
    }
    if let Some(ratio) = analysis.max_p99_ratio {
        if !(ratio.is_finite() && ratio > 0.0) {
            return Err(format!(
                "analysis.max_p99_ratio must be above 0, got {ratio}"
            ));
        }
    }
    for (key, url) in [
        ("pre_step", &gates.pre_step),
        ("pre_promote", &gates.pre_promote),
    ] {
        if let Some(url) = url {
            crate::webhook::Target::parse(url).map_err(|e| format!("gates.{key}: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(steps: &[StepSpec]) -> RolloutRequest {
        RolloutRequest {
            pool: "green".into(),
            steps: steps.to_vec(),
            ..Default::default()
        }
    }

    fn w(weight: f64) -> StepSpec {
        StepSpec::Weight(weight)
    }

    fn pause() -> StepSpec {
        StepSpec::Gate("pause".into())
    }

    fn make(steps: &[StepSpec]) -> Result<Rollout, String> {
        Rollout::from_request(&request(steps), 0, "t".into())
    }

    #[test]
    fn steps_must_rise_stay_within_100_and_end_on_a_weight() {
        assert!(make(&[w(10.0), w(50.0), w(100.0)]).is_ok());
        assert!(make(&[w(10.0), pause(), w(50.0)]).is_ok());
        for (steps, says) in [
            (vec![w(50.0), w(10.0)], "must rise"),
            (vec![w(10.0), w(10.0)], "must rise"),
            (vec![w(10.0), w(150.0)], "at most 100"),
            (vec![w(0.0)], "above 0"),
            (vec![w(f64::NAN)], "above 0"),
            (vec![], "at least one"),
            (vec![pause()], "at least one weight"),
            (vec![w(10.0), pause()], "last step"),
            (vec![StepSpec::Gate("wait".into())], "\"pause\""),
        ] {
            let error = make(&steps).unwrap_err();
            assert!(error.contains(says), "{steps:?}: {error}");
        }
    }

    #[test]
    fn analysis_limits_are_checked() {
        let bad = [
            Analysis {
                interval: Duration::ZERO,
                ..Default::default()
            },
            Analysis {
                min_requests: 0,
                ..Default::default()
            },
            Analysis {
                max_error_rate: Some(1.5),
                ..Default::default()
            },
            Analysis {
                max_error_rate_increase: Some(-0.1),
                ..Default::default()
            },
            Analysis {
                max_p99_ratio: Some(0.0),
                ..Default::default()
            },
        ];
        for analysis in bad {
            let mut req = request(&[w(10.0)]);
            req.analysis = Some(analysis.clone());
            assert!(
                Rollout::from_request(&req, 0, "t".into()).is_err(),
                "{analysis:?}"
            );
        }
    }

    #[test]
    fn a_pause_keeps_the_weight_before_it() {
        let mut rollout = make(&[w(10.0), pause(), w(50.0)]).unwrap();
        assert_eq!(rollout.weight_bp(), 1000);
        rollout.step = 1;
        assert_eq!(rollout.weight_bp(), 1000);
        rollout.step = 2;
        assert_eq!(rollout.weight_bp(), 5000);
        assert!(rollout.is_last_step());
    }

    #[test]
    fn steps_keep_their_json_form() {
        let rollout = make(&[w(12.5), pause(), w(100.0)]).unwrap();
        let text = serde_json::to_string(&rollout.steps).unwrap();
        assert_eq!(text, "[12.5,\"pause\",100.0]");
        let back: Vec<Step> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, rollout.steps);
    }

    #[test]
    fn a_limit_turned_off_stays_off_through_the_state_file() {
        let off = Analysis {
            max_error_rate: None,
            ..Analysis::default()
        };
        let text = serde_json::to_string(&off).unwrap();
        let back: Analysis = serde_json::from_str(&text).unwrap();
        assert_eq!(back.max_error_rate, None, "{text}");
        let unset: Analysis = serde_json::from_str("{}").unwrap();
        assert_eq!(unset.max_error_rate, Some(0.01));
    }

    fn analysis() -> Analysis {
        Analysis {
            min_requests: 100,
            max_error_rate: Some(0.01),
            max_error_rate_increase: Some(0.005),
            max_p99_ratio: Some(1.5),
            ..Default::default()
        }
    }

    #[test]
    fn too_few_requests_is_inconclusive_even_when_all_fail() {
        let (verdict, why) = judge(
            &analysis(),
            SideCounts::new(99, 99, Some(1.0)),
            SideCounts::new(1000, 0, Some(0.01)),
        );
        assert_eq!(verdict, Verdict::Inconclusive);
        assert!(why[0].contains("99 requests"), "{why:?}");
    }

    #[test]
    fn each_limit_fails_on_its_own_numbers() {
        let stable = SideCounts::new(1000, 2, Some(0.010));
        let (v, why) = judge(&analysis(), SideCounts::new(200, 60, Some(0.010)), stable);
        assert_eq!(v, Verdict::Fail);
        assert!(
            why.iter().any(|w| w.contains("30.00% (60 of 200)")),
            "{why:?}"
        );
        let loose = Analysis {
            max_error_rate: Some(0.5),
            ..analysis()
        };
        let (v, why) = judge(&loose, SideCounts::new(200, 2, Some(0.010)), stable);
        assert_eq!(v, Verdict::Fail, "1% against 0.2% is up 0.8%");
        assert!(why[0].contains("max_error_rate_increase"), "{why:?}");
        let (v, why) = judge(&analysis(), SideCounts::new(200, 0, Some(0.030)), stable);
        assert_eq!(v, Verdict::Fail);
        assert!(why[0].contains("3.00x"), "{why:?}");
        let (v, why) = judge(&analysis(), SideCounts::new(200, 0, Some(0.012)), stable);
        assert_eq!((v, why), (Verdict::Pass, vec![]));
    }

    #[test]
    fn without_stable_traffic_only_the_absolute_limit_applies() {
        let idle = SideCounts::new(3, 0, Some(0.001));
        let (v, _) = judge(&analysis(), SideCounts::new(500, 4, Some(0.5)), idle);
        assert_eq!(v, Verdict::Pass);
        let (v, _) = judge(&analysis(), SideCounts::new(500, 50, Some(0.5)), idle);
        assert_eq!(v, Verdict::Fail);
    }
}
