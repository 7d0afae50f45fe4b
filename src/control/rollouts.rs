//! Rollouts driven by the proxy: each step sets the canary weight, every analysis
//! interval the canary's answers are judged against the stable pool's on the same
//! window (this process's own counters), and the rollout moves on, promotes, or ends
//! on its own. Every move is an ordinary change (persisted before it takes effect,
//! recorded in the history); the judging state between moves is memory only, so a
//! restart re-judges a step before moving it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{service_traffic, Control, ControlError};
use crate::backend::{AdminState, Health};
use crate::metrics::PoolTotals;
use crate::rollout::{
    judge, Analysis, OnFailure, Rollout, RolloutRequest, RolloutStatus, SideCounts, Step, StepSpec,
    Verdict, WindowResult,
};
use crate::routing::Pool;
use crate::state::{now_rfc3339, CanarySpec, ServiceTraffic};
use crate::stats;
use crate::webhook;

/// How often live rollouts are looked at: the precision of holds and windows.
const TICK: Duration = Duration::from_millis(100);
/// Window results kept per rollout for its view.
const RESULTS_KEPT: usize = 10;

/// The changes a rollout in progress does not survive: whoever makes them by hand
/// takes the service over.
const MANUAL_KINDS: [&str; 5] = ["switch", "canary", "canary_abort", "promote", "rollback"];

/// Judging state of each service's live rollout.
#[derive(Default)]
pub(super) struct Runs(HashMap<String, Run>);

struct Run {
    /// The rollout this is for (its start time is its identity).
    started_at: String,
    results: VecDeque<WindowResult>,
    /// The step being judged, and when it began; anything else starts the step afresh.
    step: usize,
    step_started_ms: u64,
    window_started: Instant,
    /// Each instance's totals when the window began (one entry, this one, outside a
    /// fleet).
    bases: Totals,
    /// Since the step began, or since the last window that did not pass.
    clean_since: Instant,
    passes: u32,
    /// A failed window whose change could not be committed (the state could not be
    /// persisted): counted again at the next look rather than forgotten.
    unrecorded_failure: Option<(String, WindowResult)>,
}

/// Canary and stable totals, by instance name.
type Totals = HashMap<String, (PoolTotals, PoolTotals)>;

/// The name this instance's own totals go under.
const HERE: &str = "";

/// `GET /api/v1/services/{service}/rollout`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RolloutView {
    pub service: String,
    /// The canary pool.
    pub pool: String,
    /// The pool judged against (the active one).
    pub stable: String,
    pub status: RolloutStatus,
    /// 1-based, of `steps`.
    pub step: usize,
    #[schema(value_type = Vec<StepSpec>)]
    pub steps: Vec<Step>,
    /// Percent of the service's traffic the canary has now.
    pub weight: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub failures: u32,
    pub hold_seconds: f64,
    /// Until the step may move on, if every window from now passes; absent unless
    /// progressing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_time_left_seconds: Option<f64>,
    pub analysis: Analysis,
    pub on_failure: OnFailure,
    pub started_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// The window that ended the rollout, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<WindowResult>,
    /// The last windows judged by this process, oldest first.
    pub results: Vec<WindowResult>,
    pub generation: u64,
}

/// How often the services are looked through while no rollout is live: each look
/// reads every service, which at 10,000 of them is not free. A rollout started here
/// wakes the driver at once; one started elsewhere in a fleet is seen within this.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// Looks at live rollouts every `TICK` for as long as the control plane lives.
pub async fn drive(control: Weak<Control>) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(strong) = control.upgrade() else {
            return;
        };
        if !strong.drive_rollouts().await {
            let wake = Arc::clone(&strong.rollout_wake);
            drop(strong);
            let _ = tokio::time::timeout(IDLE_LOOK, wake.notified()).await;
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The `Instant` a wall-clock time in the past stands for (now, if it is not past).
fn instant_of(ms: u64) -> Instant {
    let ago = Duration::from_millis(now_ms().saturating_sub(ms));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// Can the pool take traffic now, by what the checks and the admin say?
fn has_healthy_backend(pool: &Pool) -> bool {
    pool.backends.iter().any(|b| {
        b.admin_state() == AdminState::Active && b.health() != Health::Unhealthy && !b.is_ejected()
    })
}

fn canary_of(rollout: &Rollout) -> CanarySpec {
    CanarySpec {
        pool: rollout.pool.clone(),
        weight_bp: rollout.weight_bp(),
        header: None,
        cookie: None,
        sticky: rollout.sticky.clone(),
    }
}

impl Run {
    /// Follows no step yet: the first look reads the totals and starts the step.
    fn new(rollout: &Rollout) -> Run {
        Run {
            started_at: rollout.started_at.clone(),
            results: VecDeque::new(),
            step: usize::MAX,
            step_started_ms: 0,
            window_started: Instant::now(),
            bases: Totals::new(),
            clean_since: Instant::now(),
            passes: 0,
            unrecorded_failure: None,
        }
    }

    /// Starts judging the rollout's current step afresh if it is not the one judged.
    /// The hold counts from the step's start, also after a restart; the first window
    /// starts now, so at least one window is judged before the step moves.
    fn follow(&mut self, rollout: &Rollout, totals: Totals) {
        self.step = rollout.step;
        self.step_started_ms = rollout.step_started_ms;
        self.clean_since = instant_of(rollout.step_started_ms);
        self.passes = 0;
        self.window_started = Instant::now();
        self.bases = totals;
        self.unrecorded_failure = None;
    }

    fn follows(&self, rollout: &Rollout) -> bool {
        self.step == rollout.step && self.step_started_ms == rollout.step_started_ms
    }

    fn record(&mut self, result: WindowResult) {
        if self.results.len() == RESULTS_KEPT {
            self.results.pop_front();
        }
        self.results.push_back(result);
    }
}

impl Control {
    /// This instance's totals of the routes live rollouts are judged on (published to
    /// the fleet, so the instance that drives them sees every instance's traffic), as
    /// last read by the driver.
    pub(super) fn local_rollout_routes(&self) -> Vec<crate::cluster::RouteCount> {
        self.published_routes.load().to_vec()
    }

    /// Reads the counts `local_rollout_routes` gives, on a blocking thread: one read
    /// of the registry for every route.
    async fn refresh_published_routes(self: &Arc<Self>) {
        let control = Arc::clone(self);
        let counts = tokio::task::spawn_blocking(move || {
            let routes = control.rollout_routes.load();
            let wanted: Vec<(&str, &str)> = routes
                .iter()
                .flat_map(|(service, canary, stable)| {
                    [
                        (service.as_str(), canary.as_str()),
                        (service.as_str(), stable.as_str()),
                    ]
                })
                .collect();
            let totals = control.metrics.routes_totals(&wanted);
            wanted
                .iter()
                .zip(totals)
                .map(|((service, pool), totals)| crate::cluster::RouteCount {
                    service: service.to_string(),
                    pool: pool.to_string(),
                    requests: totals.requests,
                    errors: totals.errors,
                    timed: totals.timed,
                    buckets: totals.buckets.to_vec(),
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        self.published_routes.store(Arc::new(counts));
    }

    /// Every instance's canary and stable totals: this one's from its own counters
    /// (read off the workers: at thousands of series a read takes milliseconds), the
    /// others' as they last published them.
    async fn read_totals(self: &Arc<Self>, service: &str, canary: &str, stable: &str) -> Totals {
        let (control, owned) = (
            Arc::clone(self),
            (service.to_string(), canary.to_string(), stable.to_string()),
        );
        let local = tokio::task::spawn_blocking(move || {
            let (service, canary, stable) = owned;
            let mut both = control
                .metrics
                .routes_totals(&[(&service, &canary), (&service, &stable)])
                .into_iter();
            (
                both.next().unwrap_or_default(),
                both.next().unwrap_or_default(),
            )
        })
        .await
        .unwrap_or_default();
        let mut totals = Totals::from([(HERE.to_string(), local)]);
        let Some(cluster) = self.cluster.get() else {
            return totals;
        };
        let Ok(members) = cluster.members().await else {
            return totals;
        };
        for member in members.into_iter().filter(|m| m.name != cluster.name()) {
            if let Some(counts) = published_totals(&member.routes, service, canary, stable) {
                totals.insert(member.name, counts);
            }
        }
        totals
    }

    /// Drives rollouts here? Always outside a fleet; in one, only the instance holding
    /// the seat (see `Cluster::holds_rollout_seat`).
    fn drives_rollouts(&self) -> bool {
        self.cluster.get().is_none_or(|c| c.holds_rollout_seat())
    }

    pub async fn start_rollout(
        self: &Arc<Self>,
        service: &str,
        request: RolloutRequest,
        if_match: Option<u64>,
    ) -> Result<RolloutView, ControlError> {
        let mut rollout = Rollout::from_request(&request, now_ms(), now_rfc3339())
            .map_err(ControlError::BadRequest)?;
        crate::routing::canary_split(&canary_of(&rollout)).map_err(ControlError::BadRequest)?;
        if !self
            .request_metrics
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(ControlError::Conflict(
                "a rollout is judged on the request metrics, and `[metrics] enabled` is false"
                    .into(),
            ));
        }
        {
            // `If-Match` first: a stale call must not reach the gate.
            let state = self.lock_current(if_match).await?;
            self.check_can_start(&state.services, service, &rollout.pool)?;
        }
        let pool = self.pool(&rollout.pool)?;
        self.require_live(&pool).await?;
        if let Some(Step::Weight(_)) = rollout.steps.first() {
            self.gate(&rollout.gates.pre_step, service, &rollout, "pre_step")
                .await
                .map_err(|e| ControlError::Conflict(format!("the pre_step gate refused: {e}")))?;
        }
        let mut state = self.lock_current(if_match).await?;
        self.check_can_start(&state.services, service, &rollout.pool)?;
        if rollout.steps.first() == Some(&Step::Pause) {
            rollout.status = RolloutStatus::Paused;
            rollout.reason = Some(PAUSE_STEP.into());
        }
        let canary = canary_of(&rollout);
        self.commit_service(&mut state, service, "rollout_start", |traffic| {
            traffic.canary = Some(Box::new(canary));
            traffic.rollout = Some(Box::new(rollout));
        })
        .await?;
        tracing::info!(service, "rollout started");
        self.rollout_wake.notify_one();
        self.rollout_view_of(&state, service)
    }

    fn check_can_start(
        &self,
        services: &crate::state::ServiceMap,
        service: &str,
        pool: &str,
    ) -> Result<(), ControlError> {
        let current = services
            .get(service)
            .ok_or_else(|| ControlError::UnknownService(service.to_string()))?;
        // Part of a bad request body, not a missing resource: 400.
        self.pool(pool)
            .map_err(|_| ControlError::BadRequest(format!("unknown pool `{pool}`")))?;
        if current.active == pool {
            return Err(ControlError::BadRequest(format!(
                "pool `{pool}` is the active pool of `{service}`: a rollout needs another pool as its canary"
            )));
        }
        if let Some(live) = current.rollout.as_ref().filter(|r| r.status.is_live()) {
            return Err(ControlError::Conflict(format!(
                "service `{service}` already has a rollout to `{}` ({}); abort it first",
                live.pool,
                live.status.as_str()
            )));
        }
        Ok(())
    }

    pub async fn rollout_view(&self, service: &str) -> Result<RolloutView, ControlError> {
        let state = self.state.lock().await;
        self.rollout_view_of(&state, service)
    }

    fn rollout_view_of(
        &self,
        state: &crate::state::TrafficState,
        service: &str,
    ) -> Result<RolloutView, ControlError> {
        let traffic = service_traffic(state, service)?;
        let rollout = traffic
            .rollout
            .as_deref()
            .ok_or_else(|| ControlError::NoRollout(service.to_string()))?;
        let runs = self.rollout_runs.lock().unwrap_or_else(|e| e.into_inner());
        let run = runs
            .0
            .get(service)
            .filter(|r| r.started_at == rollout.started_at);
        let step_time_left_seconds = (rollout.status == RolloutStatus::Progressing).then(|| {
            let since = run.map_or_else(|| instant_of(rollout.step_started_ms), |r| r.clean_since);
            rollout.hold.saturating_sub(since.elapsed()).as_secs_f64()
        });
        Ok(RolloutView {
            service: service.to_string(),
            pool: rollout.pool.clone(),
            stable: traffic.active.clone(),
            status: rollout.status,
            step: rollout.step + 1,
            steps: rollout.steps.clone(),
            weight: traffic
                .canary
                .as_ref()
                .filter(|c| c.pool == rollout.pool)
                .map_or(0.0, |c| f64::from(c.weight_bp) / 100.0),
            reason: rollout.reason.clone(),
            failures: rollout.failures,
            hold_seconds: rollout.hold.as_secs_f64(),
            step_time_left_seconds,
            analysis: rollout.analysis.clone(),
            on_failure: rollout.on_failure,
            started_at: rollout.started_at.clone(),
            ended_at: rollout.ended_at.clone(),
            verdict: rollout.verdict.clone(),
            results: run
                .map(|r| r.results.iter().cloned().collect())
                .unwrap_or_default(),
            generation: state.generation,
        })
    }

    pub async fn pause_rollout(
        &self,
        service: &str,
        if_match: Option<u64>,
    ) -> Result<RolloutView, ControlError> {
        self.change_live_rollout(service, if_match, "rollout_pause", |_, rollout| {
            if rollout.status == RolloutStatus::Progressing {
                rollout.status = RolloutStatus::Paused;
                rollout.reason = Some("paused through the API".into());
            }
        })
        .await
    }

    /// Goes on from a pause: a pause step moves to the next step (through its gate);
    /// a pause by hand or after failures restarts the step's hold with no failures
    /// counted.
    pub async fn resume_rollout(
        self: &Arc<Self>,
        service: &str,
        if_match: Option<u64>,
    ) -> Result<RolloutView, ControlError> {
        let rollout = {
            let state = self.lock_current(if_match).await?;
            live_rollout(service_traffic(&state, service)?, service)?.clone()
        };
        if rollout.status != RolloutStatus::Paused {
            return self.rollout_view(service).await;
        }
        let at_pause_step = rollout.current_step() == Step::Pause;
        let mut next = rollout.clone();
        next.withheld = false;
        if at_pause_step {
            next.step += 1;
        } else {
            next.failures = 0;
        }
        if next.current_step() != Step::Pause {
            // Weight goes back to the canary (or up, past a pause step) only if it
            // can take it.
            let pool = self.pool(&next.pool)?;
            if !has_healthy_backend(&pool) {
                return Err(ControlError::NoHealthyBackend(next.pool.clone()));
            }
            if at_pause_step {
                self.gate(&next.gates.pre_step, service, &next, "pre_step")
                    .await
                    .map_err(|e| {
                        ControlError::Conflict(format!("the pre_step gate refused: {e}"))
                    })?;
            }
        }
        next.status = if next.current_step() == Step::Pause {
            RolloutStatus::Paused
        } else {
            RolloutStatus::Progressing
        };
        next.reason = (next.status == RolloutStatus::Paused).then(|| PAUSE_STEP.into());
        next.step_started_ms = now_ms();
        next.verdict = None;
        let changed = self
            .replace_rollout(service, if_match, &rollout, "rollout_resume", next)
            .await?;
        if !changed {
            return Err(ControlError::Conflict(format!(
                "the rollout of `{service}` changed meanwhile; look again"
            )));
        }
        self.rollout_view(service).await
    }

    /// Back to the stable pool: weight 0, canary removed.
    pub async fn abort_rollout(
        &self,
        service: &str,
        if_match: Option<u64>,
    ) -> Result<RolloutView, ControlError> {
        self.change_live_rollout(service, if_match, "rollout_abort", |traffic, rollout| {
            rollout.end(
                RolloutStatus::Aborted,
                "aborted through the API".into(),
                now_rfc3339(),
            );
            traffic.canary = None;
        })
        .await
    }

    async fn change_live_rollout(
        &self,
        service: &str,
        if_match: Option<u64>,
        kind: &str,
        change: impl FnOnce(&mut ServiceTraffic, &mut Rollout),
    ) -> Result<RolloutView, ControlError> {
        let mut state = self.lock_current(if_match).await?;
        live_rollout(service_traffic(&state, service)?, service)?;
        self.commit_service(&mut state, service, kind, |traffic| {
            if let Some(mut rollout) = traffic.rollout.take() {
                change(traffic, &mut rollout);
                traffic.rollout = Some(rollout);
            }
        })
        .await?;
        self.rollout_view_of(&state, service)
    }

    /// Commits `next` as the service's rollout (and the canary it implies) if the
    /// rollout is still `expected`; false if something else changed it meanwhile.
    async fn replace_rollout(
        &self,
        service: &str,
        if_match: Option<u64>,
        expected: &Rollout,
        kind: &str,
        next: Rollout,
    ) -> Result<bool, ControlError> {
        let mut state = self.lock_current(if_match).await?;
        let current = service_traffic(&state, service)?;
        if current.rollout.as_deref() != Some(expected) {
            return Ok(false);
        }
        self.commit_service(&mut state, service, kind, |traffic| {
            match next.status {
                RolloutStatus::Promoted => {
                    traffic.previous_active =
                        Some(std::mem::replace(&mut traffic.active, next.pool.clone()));
                    traffic.canary = None;
                }
                RolloutStatus::RolledBack | RolloutStatus::Aborted => traffic.canary = None,
                RolloutStatus::Paused if next.withheld => traffic.canary = None,
                RolloutStatus::Progressing | RolloutStatus::Paused => {
                    traffic.canary = Some(Box::new(canary_of(&next)))
                }
            }
            traffic.rollout = Some(Box::new(next));
        })
        .await?;
        Ok(true)
    }

    /// A manual change of where the service's traffic goes ends its live rollout;
    /// the rollout's canary goes with it unless the change set a canary itself.
    pub(super) fn end_rollout_by_hand(traffic: &mut ServiceTraffic, kind: &str) {
        if !MANUAL_KINDS.contains(&kind) {
            return;
        }
        let Some(rollout) = traffic.rollout.as_mut().filter(|r| r.status.is_live()) else {
            return;
        };
        rollout.end(
            RolloutStatus::Aborted,
            format!("ended by a manual `{kind}`"),
            now_rfc3339(),
        );
        let pool = rollout.pool.clone();
        if kind != "canary" && traffic.canary.as_ref().is_some_and(|c| c.pool == pool) {
            traffic.canary = None;
        }
    }

    /// Calls a gate (if set); `Err` says why it refused.
    async fn gate(
        &self,
        url: &Option<String>,
        service: &str,
        rollout: &Rollout,
        which: &str,
    ) -> Result<(), String> {
        let Some(url) = url else { return Ok(()) };
        let target = webhook::Target::parse(url)?;
        let body = serde_json::json!({
            "gate": which,
            "service": service,
            "pool": rollout.pool,
            "step": rollout.step + 1,
            "weight": f64::from(rollout.weight_bp()) / 100.0,
        });
        target.call(&body).await
    }

    /// One look at every live rollout; false when there was none.
    async fn drive_rollouts(self: &Arc<Self>) -> bool {
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let live: Vec<(String, Rollout, String)> = {
            let state = self.state.lock().await;
            state
                .services
                .iter()
                .filter_map(|(name, traffic)| {
                    let rollout = traffic.rollout.as_deref().filter(|r| r.status.is_live())?;
                    Some((name.clone(), rollout.clone(), traffic.active.clone()))
                })
                .collect()
        };
        self.forget_ended_runs(&live);
        let routes: Vec<(String, String, String)> = live
            .iter()
            .map(|(service, rollout, stable)| {
                (service.clone(), rollout.pool.clone(), stable.clone())
            })
            .collect();
        let before = self.rollout_routes.load_full();
        if *before != routes {
            // Zeroed here, not with the judging state: an instance that does not drive
            // has none, and its gauges must not keep an ended rollout's step.
            for (service, _, _) in before.iter() {
                if !routes.iter().any(|(s, _, _)| s == service) {
                    self.metrics
                        .rollout_step
                        .with_label_values(&[service])
                        .set(0);
                    self.metrics
                        .rollout_weight
                        .with_label_values(&[service])
                        .set(0.0);
                }
            }
            self.rollout_routes.store(Arc::new(routes));
        }
        if self.cluster.get().is_some()
            && !(live.is_empty() && self.published_routes.load().is_empty())
        {
            self.refresh_published_routes().await;
        }
        let driving = self.drives_rollouts();
        let any_live = !live.is_empty();
        // Side by side: one rollout's slow gate (up to its timeout) holds up no other.
        let mut driven = tokio::task::JoinSet::new();
        for (service, rollout, stable) in live {
            self.metrics
                .rollout_step
                .with_label_values(&[&service])
                .set(rollout.step as i64 + 1);
            self.metrics
                .rollout_weight
                .with_label_values(&[&service])
                .set(f64::from(rollout.weight_bp()) / 100.0);
            let withhold = rollout.status == RolloutStatus::Paused
                && !rollout.withheld
                && !self
                    .pool(&rollout.pool)
                    .is_ok_and(|p| has_healthy_backend(&p));
            if driving && withhold {
                let control = Arc::clone(self);
                driven.spawn(async move {
                    if let Err(e) = control.withhold(&service, &rollout).await {
                        tracing::warn!(
                            service,
                            "rollout: a change failed, tried again next time: {e}"
                        );
                    }
                });
            } else if driving && rollout.status == RolloutStatus::Progressing {
                let control = Arc::clone(self);
                driven.spawn(async move {
                    if let Err(e) = control.drive_one(&service, &rollout, &stable).await {
                        tracing::warn!(
                            service,
                            "rollout: a change failed, tried again next time: {e}"
                        );
                    }
                });
            }
        }
        while driven.join_next().await.is_some() {}
        any_live
    }

    /// Drops the judging state of rollouts that ended.
    fn forget_ended_runs(&self, live: &[(String, Rollout, String)]) {
        let mut runs = self.rollout_runs.lock().unwrap_or_else(|e| e.into_inner());
        runs.0.retain(|service, run| {
            live.iter()
                .any(|(s, r, _)| s == service && r.started_at == run.started_at)
        });
    }

    async fn drive_one(
        self: &Arc<Self>,
        service: &str,
        rollout: &Rollout,
        stable: &str,
    ) -> Result<(), ControlError> {
        let (new_step, due, unrecorded) = {
            let mut runs = self.rollout_runs.lock().unwrap_or_else(|e| e.into_inner());
            let run = runs
                .0
                .entry(service.to_string())
                .or_insert_with(|| Run::new(rollout));
            if run.started_at != rollout.started_at {
                *run = Run::new(rollout);
            }
            let follows = run.follows(rollout);
            (
                !follows,
                run.window_started.elapsed() >= rollout.analysis.interval,
                run.unrecorded_failure.take().filter(|_| follows),
            )
        };
        if let Some((reason, result)) = unrecorded {
            return self.record_failure(service, rollout, reason, result).await;
        }
        if new_step {
            let totals = self.read_totals(service, &rollout.pool, stable).await;
            let mut runs = self.rollout_runs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(run) = runs.0.get_mut(service) {
                run.follow(rollout, totals);
            }
            return Ok(());
        }
        // A step moves only right after a window passed: so the end of every step,
        // the last moments before a promotion included, is judged too.
        if !due {
            return Ok(());
        }
        let totals = self.read_totals(service, &rollout.pool, stable).await;
        let canary_up = self
            .pool(&rollout.pool)
            .is_ok_and(|p| has_healthy_backend(&p));
        let metrics_on = self
            .request_metrics
            .load(std::sync::atomic::Ordering::Relaxed);
        let (result, ready) = {
            let mut runs = self.rollout_runs.lock().unwrap_or_else(|e| e.into_inner());
            let Some(run) = runs.0.get_mut(service) else {
                return Ok(());
            };
            let mut result = window(rollout, run, totals, canary_up);
            if !metrics_on {
                // A reload turned them off mid-rollout: say so rather than stall quietly.
                result.verdict = Verdict::Inconclusive;
                result.reasons = vec![
                    "the request metrics are off (`[metrics] enabled = false`): nothing to judge"
                        .into(),
                ];
            }
            match result.verdict {
                Verdict::Pass => run.passes += 1,
                Verdict::Fail | Verdict::Inconclusive => {
                    run.passes = 0;
                    run.clean_since = Instant::now();
                }
            }
            run.record(result.clone());
            let ready = run.passes >= 1 && run.clean_since.elapsed() >= rollout.hold;
            (result, ready)
        };
        {
            self.metrics
                .rollout_analysis
                .with_label_values(&[service, result.verdict.as_str()])
                .inc();
            if result.verdict == Verdict::Fail {
                let reason = format!(
                    "step {} ({}%): {}",
                    rollout.step + 1,
                    result.weight,
                    result.reasons.join("; ")
                );
                tracing::warn!(service, pool = %rollout.pool, "rollout analysis failed: {reason}");
                return self.record_failure(service, rollout, reason, result).await;
            }
        }
        if ready {
            self.advance(service, rollout).await?;
        }
        Ok(())
    }

    /// Counts a failed window; if that cannot be committed, keeps it to count at the
    /// next look.
    async fn record_failure(
        &self,
        service: &str,
        rollout: &Rollout,
        reason: String,
        result: WindowResult,
    ) -> Result<(), ControlError> {
        let outcome = self
            .count_failure(service, rollout, reason.clone(), Some(result.clone()))
            .await;
        if outcome.is_err() {
            let mut runs = self.rollout_runs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(run) = runs.0.get_mut(service) {
                run.unrecorded_failure = Some((reason, result));
            }
        }
        outcome
    }

    /// The step held with every window passing: the next step, or promotion.
    async fn advance(&self, service: &str, rollout: &Rollout) -> Result<(), ControlError> {
        let mut next = rollout.clone();
        if rollout.is_last_step() {
            // As a manual promote checks: the pool that takes all traffic can take it.
            let healthy = self.pool(&next.pool).is_ok_and(|p| has_healthy_backend(&p));
            if !healthy {
                return self
                    .gate_refused(
                        service,
                        rollout,
                        format!("pool `{}` has no healthy backend to promote", next.pool),
                    )
                    .await;
            }
            if let Err(e) = self
                .gate(&rollout.gates.pre_promote, service, rollout, "pre_promote")
                .await
            {
                return self
                    .gate_refused(
                        service,
                        rollout,
                        format!("the pre_promote gate refused: {e}"),
                    )
                    .await;
            }
            next.end(
                RolloutStatus::Promoted,
                format!("every step passed; `{}` is the active pool", rollout.pool),
                now_rfc3339(),
            );
            if self
                .replace_rollout(service, None, rollout, "rollout_promote", next)
                .await?
            {
                tracing::info!(service, pool = %rollout.pool, "rollout promoted");
            }
            return Ok(());
        }
        next.step += 1;
        next.step_started_ms = now_ms();
        if next.current_step() == Step::Pause {
            next.status = RolloutStatus::Paused;
            next.reason = Some(PAUSE_STEP.into());
        } else {
            let healthy = self.pool(&next.pool).is_ok_and(|p| has_healthy_backend(&p));
            if !healthy {
                return self
                    .gate_refused(
                        service,
                        rollout,
                        format!("pool `{}` has no healthy backend", next.pool),
                    )
                    .await;
            }
            if let Err(e) = self
                .gate(&next.gates.pre_step, service, &next, "pre_step")
                .await
            {
                return self
                    .gate_refused(service, rollout, format!("the pre_step gate refused: {e}"))
                    .await;
            }
        }
        if self
            .replace_rollout(service, None, rollout, "rollout_step", next.clone())
            .await?
        {
            tracing::info!(service, pool = %next.pool, step = next.step + 1, weight = f64::from(next.weight_bp()) / 100.0, "rollout step");
        }
        Ok(())
    }

    /// A gate refused or the canary pool cannot take more: a failure, and the step is
    /// tried again after its next passing window.
    async fn gate_refused(
        &self,
        service: &str,
        rollout: &Rollout,
        reason: String,
    ) -> Result<(), ControlError> {
        tracing::warn!(service, pool = %rollout.pool, "rollout: {reason}");
        {
            let mut runs = self.rollout_runs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(run) = runs.0.get_mut(service) {
                run.passes = 0;
            }
        }
        let reason = format!("step {}: {reason}", rollout.step + 1);
        self.count_failure(service, rollout, reason, None).await
    }

    /// A paused rollout's canary pool has no healthy backend: its users would only
    /// meet errors there, so the weight goes back to the stable pool until a resume.
    async fn withhold(&self, service: &str, rollout: &Rollout) -> Result<(), ControlError> {
        let mut next = rollout.clone();
        withhold_weight(&mut next);
        if self
            .replace_rollout(service, None, rollout, "rollout_pause", next)
            .await?
        {
            tracing::warn!(service, pool = %rollout.pool, "rollout paused with no healthy backend in its pool: its weight is withheld");
        }
        Ok(())
    }

    /// One more failure: within the limit it is counted (and recorded); past it the
    /// rollout rolls back or pauses, as it was told.
    async fn count_failure(
        &self,
        service: &str,
        rollout: &Rollout,
        reason: String,
        window: Option<WindowResult>,
    ) -> Result<(), ControlError> {
        let mut next = rollout.clone();
        next.failures += 1;
        let limit = rollout.analysis.failure_limit;
        if next.failures <= limit {
            next.reason = Some(format!(
                "failure {} of {} tolerated: {reason}",
                next.failures, limit
            ));
            self.replace_rollout(service, None, rollout, "rollout_failure", next)
                .await?;
            return Ok(());
        }
        next.verdict = window;
        let (status, kind) = match rollout.on_failure {
            OnFailure::Rollback => (RolloutStatus::RolledBack, "rollout_rollback"),
            OnFailure::Pause => (RolloutStatus::Paused, "rollout_pause"),
        };
        let reason = format!(
            "{} failures, past failure_limit {limit}: {reason}",
            next.failures
        );
        if status == RolloutStatus::Paused {
            next.status = status;
            next.reason = Some(reason.clone());
            if !self
                .pool(&rollout.pool)
                .is_ok_and(|p| has_healthy_backend(&p))
            {
                withhold_weight(&mut next);
            }
        } else {
            next.end(status, reason.clone(), now_rfc3339());
        }
        if self
            .replace_rollout(service, None, rollout, kind, next)
            .await?
        {
            tracing::warn!(service, pool = %rollout.pool, status = status.as_str(), "rollout ended: {reason}");
        }
        Ok(())
    }
}

fn withhold_weight(rollout: &mut Rollout) {
    rollout.withheld = true;
    rollout.reason = Some(format!(
        "{}; its weight is withheld until it is resumed, as pool `{}` has no healthy backend",
        rollout.reason.as_deref().unwrap_or("paused"),
        rollout.pool
    ));
}

/// Why a rollout waits at a pause step.
const PAUSE_STEP: &str = "waiting at a pause step; resume to go on";

fn live_rollout<'a>(
    traffic: &'a ServiceTraffic,
    service: &str,
) -> Result<&'a Rollout, ControlError> {
    match traffic.rollout.as_deref() {
        Some(rollout) if rollout.status.is_live() => Ok(rollout),
        Some(rollout) => Err(ControlError::Conflict(format!(
            "the rollout of `{service}` has ended ({})",
            rollout.status.as_str()
        ))),
        None => Err(ControlError::NoRollout(service.to_string())),
    }
}

/// A member's published canary and stable totals; none until it has published both
/// (taking zeros instead would count its whole past as the next window's traffic).
fn published_totals(
    routes: &[crate::cluster::RouteCount],
    service: &str,
    canary: &str,
    stable: &str,
) -> Option<(PoolTotals, PoolTotals)> {
    let side = |pool: &str| {
        routes
            .iter()
            .find(|c| c.service == service && c.pool == pool)
            .map(pool_totals)
    };
    Some((side(canary)?, side(stable)?))
}

/// A published count as totals.
fn pool_totals(count: &crate::cluster::RouteCount) -> PoolTotals {
    let mut totals = PoolTotals {
        requests: count.requests,
        errors: count.errors,
        timed: count.timed,
        ..PoolTotals::default()
    };
    for (slot, bucket) in totals.buckets.iter_mut().zip(&count.buckets) {
        *slot = *bucket;
    }
    totals
}

/// Adds what `now` counted since `then` to `into` (an instance that restarted counts
/// from 0 again: all it has is new).
fn add_since(into: &mut PoolTotals, then: &PoolTotals, now: &PoolTotals) {
    let restarted = now.requests < then.requests || now.timed < then.timed;
    let zero = PoolTotals::default();
    let then = if restarted { &zero } else { then };
    into.requests += now.requests.saturating_sub(then.requests);
    into.errors += now.errors.saturating_sub(then.errors);
    into.timed += now.timed.saturating_sub(then.timed);
    for ((slot, n), t) in into.buckets.iter_mut().zip(&now.buckets).zip(&then.buckets) {
        *slot += n.saturating_sub(*t);
    }
}

/// Judges the window that just ended, on the sum of every instance's counts in it,
/// and starts the next one from `totals`. An instance first seen in this window
/// counts from the next one: its totals so far are not all from this window.
fn window(rollout: &Rollout, run: &mut Run, totals: Totals, canary_up: bool) -> WindowResult {
    let (mut canary_sum, mut stable_sum) = (PoolTotals::default(), PoolTotals::default());
    for (instance, (canary_now, stable_now)) in &totals {
        if let Some((canary_then, stable_then)) = run.bases.get(instance) {
            add_since(&mut canary_sum, canary_then, canary_now);
            add_since(&mut stable_sum, stable_then, stable_now);
        }
    }
    let zero = PoolTotals::default();
    let side = |sum: &PoolTotals| {
        let (requests, errors) = stats::answers_between(&zero, sum);
        SideCounts::new(requests, errors, stats::p99_between(&zero, sum))
    };
    let canary = side(&canary_sum);
    let stable = side(&stable_sum);
    run.bases = totals;
    run.window_started = Instant::now();
    let (mut verdict, mut reasons) = judge(&rollout.analysis, canary, stable);
    if !canary_up {
        verdict = Verdict::Fail;
        reasons.push(format!("pool `{}` has no healthy backend", rollout.pool));
    }
    WindowResult {
        at: now_rfc3339(),
        step: rollout.step + 1,
        weight: f64::from(rollout.weight_bp()) / 100.0,
        verdict,
        canary,
        stable,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(requests: u64, errors: u64) -> PoolTotals {
        PoolTotals {
            requests,
            errors,
            ..PoolTotals::default()
        }
    }

    fn rollout() -> Rollout {
        let request = RolloutRequest {
            pool: "green".into(),
            steps: vec![StepSpec::Weight(50.0)],
            analysis: Some(Analysis {
                min_requests: 1,
                max_error_rate: Some(0.5),
                ..Analysis::default()
            }),
            ..RolloutRequest::default()
        };
        Rollout::from_request(&request, 0, "t".into()).unwrap()
    }

    #[test]
    fn a_window_sums_every_instance_and_a_restarted_one_counts_from_zero() {
        let rollout = rollout();
        let mut run = Run::new(&rollout);
        run.bases = Totals::from([
            (HERE.to_string(), (totals(100, 1), totals(1000, 0))),
            ("lb-2".to_string(), (totals(500, 5), totals(5000, 0))),
        ]);
        let now = Totals::from([
            (HERE.to_string(), (totals(110, 2), totals(1100, 0))),
            // Restarted: its totals went back to 0 and are all new.
            ("lb-2".to_string(), (totals(30, 3), totals(300, 0))),
            // First seen: counts from the next window.
            ("lb-3".to_string(), (totals(9999, 9999), totals(9999, 0))),
        ]);
        let result = window(&rollout, &mut run, now, true);
        assert_eq!((result.canary.requests, result.canary.errors), (40, 4));
        assert_eq!(result.stable.requests, 400);
        assert_eq!(result.verdict, Verdict::Pass);
        assert!(run.bases.contains_key("lb-3"));
    }

    #[test]
    fn a_member_counts_only_once_it_has_published_both_sides() {
        let count = |pool: &str, requests| crate::cluster::RouteCount {
            service: "app".into(),
            pool: pool.into(),
            requests,
            errors: 0,
            timed: 0,
            buckets: vec![],
        };
        assert!(published_totals(&[], "app", "green", "blue").is_none());
        assert!(published_totals(&[count("green", 5)], "app", "green", "blue").is_none());
        let both = published_totals(
            &[count("blue", 7), count("green", 5)],
            "app",
            "green",
            "blue",
        );
        assert_eq!(both.map(|(c, s)| (c.requests, s.requests)), Some((5, 7)));
    }

    #[test]
    fn a_canary_pool_without_a_healthy_backend_fails_the_window() {
        let rollout = rollout();
        let mut run = Run::new(&rollout);
        run.bases = Totals::from([(HERE.to_string(), (totals(0, 0), totals(0, 0)))]);
        let now = Totals::from([(HERE.to_string(), (totals(50, 0), totals(50, 0)))]);
        let result = window(&rollout, &mut run, now, false);
        assert_eq!(result.verdict, Verdict::Fail);
        assert!(result
            .reasons
            .iter()
            .any(|r| r.contains("no healthy backend")));
    }
}
