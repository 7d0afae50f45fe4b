//! Every traffic change goes through here: validate, build the new routing table,
//! persist, swap, record. One writer at a time (an async mutex held across the whole
//! change); the data plane never waits on it, it only sees the table swap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::backend::{AdminState, Backend};
use crate::client::Upstreams;
use crate::config::Config;
use crate::health;
use crate::metrics::Metrics;
use crate::routing::{self, Pool, PoolSettings, PoolSettingsMap, ResolvedPools, RoutingTable};
use crate::state::{self, BackendMode, CanarySpec, MatchSpec, ServiceTraffic, TrafficState};

mod fleet;
mod membership;
mod names;
mod reload;
mod rollouts;
mod supervision;
mod views;

pub use names::NameView;
pub use reload::Reloaded;
pub use rollouts::{drive as drive_rollouts, RolloutView};
use views::{backend_view, live_state};
pub use views::{
    BackendView, CanaryView, HistoryView, MirrorView, PoolView, RolloutSummary, ServiceView,
    StateFileView, StateView,
};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown service `{0}`")]
    UnknownService(String),
    #[error("unknown pool `{0}`")]
    UnknownPool(String),
    #[error("pool `{pool}` has no backend `{addr}`")]
    UnknownBackend { pool: String, addr: String },
    #[error("generation {given} is stale: the current generation is {current}")]
    StaleGeneration { given: u64, current: u64 },
    #[error("pool `{0}` has no healthy backend (pass \"force\": true to override)")]
    NoHealthyBackend(String),
    #[error("{0}")]
    Conflict(String),
    #[error("service `{0}` has no rollout")]
    NoRollout(String),
    #[error(
        "{in_flight} requests still in flight on {backends}; they stay draining and in the pool"
    )]
    DrainTimeout { in_flight: u64, backends: String },
    #[error("pool `{pool}` may have at most {limit} backends (proxy.max_backends_per_pool), got {given}")]
    TooManyBackends {
        pool: String,
        limit: usize,
        given: usize,
    },
    #[error("a binary upgrade is handing over to a new process; retry the change in a moment")]
    Upgrading,
    #[error(
        "{0}; changes are refused until it is back (this instance keeps serving its last state)"
    )]
    ClusterUnavailable(String),
    #[error("{0}")]
    Persist(#[from] state::StateError),
    #[error("{done} (generation {generation}), but the rest of the change failed: {source}; call again to finish it")]
    PartlyApplied {
        done: String,
        generation: u64,
        source: state::StateError,
    },
}

impl ControlError {
    pub fn status(&self) -> u16 {
        match self {
            ControlError::BadRequest(_) => 400,
            ControlError::UnknownService(_)
            | ControlError::UnknownPool(_)
            | ControlError::UnknownBackend { .. }
            | ControlError::NoRollout(_) => 404,
            ControlError::StaleGeneration { .. }
            | ControlError::NoHealthyBackend(_)
            | ControlError::Conflict(_) => 409,
            ControlError::DrainTimeout { .. } => 408,
            ControlError::TooManyBackends { .. } => 413,
            ControlError::Persist(_) | ControlError::PartlyApplied { .. } => 500,
            ControlError::Upgrading | ControlError::ClusterUnavailable(_) => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ControlError::BadRequest(_) => "bad_request",
            ControlError::UnknownService(_) => "unknown_service",
            ControlError::UnknownPool(_) => "unknown_pool",
            ControlError::UnknownBackend { .. } => "unknown_backend",
            ControlError::NoRollout(_) => "no_rollout",
            ControlError::StaleGeneration { .. } => "stale_generation",
            ControlError::NoHealthyBackend(_) => "no_healthy_backend",
            ControlError::Conflict(_) => "conflict",
            ControlError::DrainTimeout { .. } => "timeout",
            ControlError::TooManyBackends { .. } => "too_many_backends",
            ControlError::Persist(_) | ControlError::PartlyApplied { .. } => "persist_failed",
            ControlError::Upgrading => "upgrading",
            ControlError::ClusterUnavailable(_) => "cluster-unavailable",
        }
    }
}

/// A canary as the admin API takes it: weight in percent.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanaryRequest {
    pub pool: String,
    /// Percent of the service's traffic.
    #[schema(minimum = 0, maximum = 100)]
    pub weight: f64,
    #[serde(default)]
    pub header: Option<MatchSpec>,
    #[serde(default)]
    pub cookie: Option<MatchSpec>,
    #[serde(default)]
    pub sticky: Option<String>,
    #[serde(default)]
    pub force: bool,
}

pub struct Control {
    /// The config in force: replaced whole by a reload, under the state lock.
    config: ArcSwap<Config>,
    /// Each pool's behaviour and connection settings, made from `config` (and its
    /// `Setup`) at start and at each reload.
    settings: ArcSwap<PoolSettingsMap>,
    table: Arc<ArcSwap<RoutingTable>>,
    state: Mutex<TrafficState>,
    state_path: PathBuf,
    probe_timeout: Duration,
    health_checks: std::sync::Mutex<supervision::HealthChecks>,
    metrics: Arc<Metrics>,
    /// Attach per-request metric children to routing tables (`[metrics] enabled`).
    request_metrics: AtomicBool,
    /// The committed generation, readable without the writer lock (for scrapes).
    generation: Arc<AtomicU64>,
    corrupt_at_start: Option<state::CorruptFile>,
    /// The fleet this instance belongs to, once joined (`[cluster]`).
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// The fleet's state as last read from etcd, before it was fitted to this config.
    fleet_raw: std::sync::Mutex<Option<TrafficState>>,
    /// In `[cluster]` mode: set before joining, so no change is made locally only.
    cluster_pending: AtomicBool,
    /// A weak handle on itself, for the fleet tasks (set when joining).
    myself: std::sync::OnceLock<std::sync::Weak<Control>>,
    /// What backend host names resolved to (see `names`).
    names: std::sync::Mutex<names::NameTable>,
    resolved: ArcSwap<ResolvedPools>,
    name_tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
    /// Set while a binary upgrade hands over: the new process has read the state file,
    /// so a change made here now would be lost. Changes answer 503 `upgrading`.
    frozen: AtomicBool,
    /// How each live rollout is being judged (see `rollouts`).
    rollout_runs: std::sync::Mutex<rollouts::Runs>,
    /// (service, canary pool, stable pool) of each live rollout, as the driver last saw
    /// them: what this instance publishes its counts of, in a fleet.
    rollout_routes: ArcSwap<Vec<(String, String, String)>>,
    /// This instance's counts of those routes, as last read (off the workers) for the
    /// fleet: publishing reads this, not the registry.
    published_routes: ArcSwap<Vec<crate::cluster::RouteCount>>,
    /// Wakes the rollout driver from its idle wait (a rollout was started here).
    rollout_wake: Arc<tokio::sync::Notify>,
    mirror: std::sync::OnceLock<Arc<crate::mirror::MirrorQueue>>,
}

impl Control {
    /// Restores the saved traffic state (warning about what no longer fits the config)
    /// and builds the first routing table. A state file that exists but cannot be read
    /// stops the start: serving would overwrite it.
    pub fn start(config: Config, upstreams: Upstreams) -> Result<Control, ControlError> {
        let state::Loaded {
            state,
            warnings,
            corrupt,
        } = state::load(&config.state.path, &config)?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        if let Some(corrupt) = &corrupt {
            tracing::error!(
                path = %config.state.path.display(),
                moved_to = ?corrupt.moved_to,
                generation = corrupt.restarted_at_generation,
                "the state file is corrupt ({}); starting from the config with a generation no earlier state had",
                corrupt.error
            );
        }
        let settings = PoolSettings::for_config(&config, &upstreams);
        let no_names = ResolvedPools::new();
        let table = Arc::new(ArcSwap::from_pointee(RoutingTable::build(
            &config, &settings, &no_names, &state, None, None,
        )));
        let generation = Arc::new(AtomicU64::new(state.generation));
        let metrics = {
            let table = Arc::clone(&table);
            let generation = Arc::clone(&generation);
            Metrics::new(Arc::new(move || {
                live_state(&table.load(), generation.load(Ordering::Relaxed))
            }))
        };
        if corrupt.is_some() {
            metrics.state_file_corrupt.inc();
        }
        let request_metrics = config.metrics.enabled;
        if request_metrics {
            let with_metrics = RoutingTable::build(
                &config,
                &settings,
                &no_names,
                &state,
                Some(&table.load()),
                Some(&metrics),
            );
            table.store(Arc::new(with_metrics));
        }
        Ok(Control {
            state_path: config.state.path.clone(),
            probe_timeout: config.proxy.connect_timeout.min(Duration::from_secs(1)),
            table,
            state: Mutex::new(state),
            config: ArcSwap::from_pointee(config),
            settings: ArcSwap::from_pointee(settings),
            health_checks: std::sync::Mutex::new(supervision::HealthChecks::default()),
            metrics,
            request_metrics: AtomicBool::new(request_metrics),
            generation,
            corrupt_at_start: corrupt,
            frozen: AtomicBool::new(false),
            cluster: std::sync::OnceLock::new(),
            myself: std::sync::OnceLock::new(),
            cluster_pending: AtomicBool::new(false),
            fleet_raw: std::sync::Mutex::new(None),
            names: std::sync::Mutex::new(names::NameTable::new()),
            resolved: ArcSwap::from_pointee(ResolvedPools::new()),
            name_tasks: std::sync::Mutex::new(Vec::new()),
            rollout_runs: std::sync::Mutex::new(rollouts::Runs::default()),
            rollout_routes: ArcSwap::from_pointee(Vec::new()),
            published_routes: ArcSwap::from_pointee(Vec::new()),
            rollout_wake: Arc::new(tokio::sync::Notify::new()),
            mirror: std::sync::OnceLock::new(),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The process's one mirror queue, started on first use. Needs a tokio runtime.
    pub fn mirror_queue(&self) -> Arc<crate::mirror::MirrorQueue> {
        Arc::clone(self.mirror.get_or_init(crate::mirror::MirrorQueue::start))
    }

    /// Writes the current state once, so a state path that cannot be written is found
    /// at start rather than at the first deploy.
    pub async fn persist_now(&self) -> Result<(), ControlError> {
        let state = self.state.lock().await;
        self.save(state.clone()).await
    }

    /// Writes `state` to the state file off the async workers (fsync blocks).
    async fn save(&self, state: TrafficState) -> Result<(), ControlError> {
        let path = self.state_path.clone();
        tokio::task::spawn_blocking(move || state::save(&path, &state))
            .await
            .map_err(|e| {
                ControlError::Persist(state::StateError::Write {
                    path: self.state_path.clone(),
                    source: std::io::Error::other(e),
                })
            })??;
        Ok(())
    }

    pub fn table(&self) -> &Arc<ArcSwap<RoutingTable>> {
        &self.table
    }

    pub fn state_path(&self) -> &std::path::Path {
        &self.state_path
    }

    pub async fn generation(&self) -> u64 {
        self.state.lock().await.generation
    }

    pub async fn switch(
        &self,
        service: &str,
        to: &str,
        force: bool,
        if_match: Option<u64>,
    ) -> Result<ServiceView, ControlError> {
        let mut state = self.lock_current(if_match).await?;
        let current = service_traffic(&state, service)?;
        let pool = self.pool(to)?;
        if !force {
            self.require_live(&pool).await?;
        }
        let old_active = current.active.clone();
        self.commit_service(&mut state, service, "switch", |traffic| {
            if old_active != to {
                traffic.previous_active = Some(old_active);
                traffic.active = to.to_string();
            }
            if traffic.canary.as_ref().is_some_and(|c| c.pool == to) {
                // The canary pool became the active one: nothing left to split.
                traffic.canary = None;
            }
        })
        .await
    }

    pub async fn set_canary(
        &self,
        service: &str,
        request: CanaryRequest,
        if_match: Option<u64>,
    ) -> Result<ServiceView, ControlError> {
        if !request.weight.is_finite() || !(0.0..=100.0).contains(&request.weight) {
            return Err(ControlError::BadRequest(format!(
                "weight must be a percentage between 0 and 100, got {}",
                request.weight
            )));
        }
        let spec = CanarySpec {
            pool: request.pool.clone(),
            weight_bp: (request.weight * 100.0).round() as u32,
            header: request.header,
            cookie: request.cookie,
            sticky: request.sticky,
        };
        routing::canary_split(&spec).map_err(ControlError::BadRequest)?;
        let mut state = self.lock_current(if_match).await?;
        let current = service_traffic(&state, service)?;
        let pool = self.pool(&spec.pool)?;
        if current.active == spec.pool {
            return Err(ControlError::Conflict(format!(
                "pool `{}` is already the active pool of `{service}`",
                spec.pool
            )));
        }
        if !request.force && spec.weight_bp > 0 {
            self.require_live(&pool).await?;
        }
        self.commit_service(&mut state, service, "canary", |traffic| {
            traffic.canary = Some(Box::new(spec))
        })
        .await
    }

    pub async fn abort_canary(
        &self,
        service: &str,
        if_match: Option<u64>,
    ) -> Result<ServiceView, ControlError> {
        let mut state = self.lock_current(if_match).await?;
        service_traffic(&state, service)?;
        self.commit_service(&mut state, service, "canary_abort", |traffic| {
            traffic.canary = None
        })
        .await
    }

    pub async fn promote(
        &self,
        service: &str,
        force: bool,
        if_match: Option<u64>,
    ) -> Result<ServiceView, ControlError> {
        let mut state = self.lock_current(if_match).await?;
        let current = service_traffic(&state, service)?;
        let Some(canary) = current.canary.clone() else {
            return Err(ControlError::Conflict(format!(
                "service `{service}` has no canary to promote"
            )));
        };
        let pool = self.pool(&canary.pool)?;
        if !force {
            self.require_live(&pool).await?;
        }
        self.commit_service(&mut state, service, "promote", |traffic| {
            traffic.previous_active = Some(std::mem::replace(&mut traffic.active, canary.pool));
            traffic.canary = None;
        })
        .await
    }

    /// Back to the pool that was active before the last switch, promote or rollback,
    /// with any canary removed. Not refused for health: it is the way back.
    pub async fn rollback(
        &self,
        service: &str,
        if_match: Option<u64>,
    ) -> Result<ServiceView, ControlError> {
        let mut state = self.lock_current(if_match).await?;
        let current = service_traffic(&state, service)?;
        let Some(previous) = current.previous_active.clone() else {
            return Err(ControlError::Conflict(format!(
                "service `{service}` has no previous active pool to roll back to"
            )));
        };
        self.pool(&previous)?;
        self.commit_service(&mut state, service, "rollback", |traffic| {
            traffic.previous_active = Some(std::mem::replace(&mut traffic.active, previous));
            traffic.canary = None;
        })
        .await
    }

    /// Copies `percent` of the service's requests to `pool` (not its active pool).
    pub async fn set_mirror(
        &self,
        service: &str,
        pool: &str,
        percent: f64,
        if_match: Option<u64>,
    ) -> Result<ServiceView, ControlError> {
        if !percent.is_finite() || percent <= 0.0 || percent > 100.0 {
            return Err(ControlError::BadRequest(format!(
                "percent must be above 0 and at most 100, got {percent}"
            )));
        }
        if pool.is_empty() {
            return Err(ControlError::BadRequest(
                "`pool` must name the mirror pool".into(),
            ));
        }
        let mut state = self.lock_current(if_match).await?;
        let current = service_traffic(&state, service)?;
        self.pool(pool)?;
        if current.active == pool {
            return Err(ControlError::BadRequest(format!(
                "pool `{pool}` is the active pool of `{service}`: it gets the requests themselves"
            )));
        }
        let spec = state::MirrorSpec {
            pool: pool.to_string(),
            percent_bp: (percent * 100.0).round() as u32,
        };
        self.commit_service(&mut state, service, "mirror", |traffic| {
            traffic.mirror = Some(spec)
        })
        .await
    }

    pub async fn stop_mirror(
        &self,
        service: &str,
        if_match: Option<u64>,
    ) -> Result<ServiceView, ControlError> {
        let mut state = self.lock_current(if_match).await?;
        service_traffic(&state, service)?;
        self.commit_service(&mut state, service, "mirror_off", |traffic| {
            traffic.mirror = None
        })
        .await
    }

    /// Drain (`Some(Draining)`), disable, or return to rotation (`None`).
    pub async fn set_backend_mode(
        &self,
        pool: &str,
        addr: &str,
        mode: Option<BackendMode>,
        if_match: Option<u64>,
    ) -> Result<BackendView, ControlError> {
        let mut state = self.lock_current(if_match).await?;
        let (pool_ref, backend) = self.backend(pool, addr)?;
        let key = backend.name.to_string();
        let mut next = state.clone();
        match mode {
            Some(mode) => {
                next.backends
                    .entry(pool.to_string())
                    .or_default()
                    .insert(key, mode);
            }
            None => {
                if let Some(entries) = next.backends.get_mut(pool) {
                    entries.remove(&key);
                    if entries.is_empty() {
                        next.backends.remove(pool);
                    }
                }
            }
        }
        self.commit(&mut state, next, None).await?;
        Ok(backend_view(&pool_ref, &backend, state.generation))
    }

    /// The backend's live object, for long polls on its in-flight count.
    pub fn find_backend(&self, pool: &str, addr: &str) -> Result<Arc<Backend>, ControlError> {
        self.backend(pool, addr).map(|(_, b)| b)
    }

    /// Applies `change` to a copy of `service`'s traffic, commits it as a `kind` change
    /// and answers with the service's new view.
    async fn commit_service(
        &self,
        state: &mut TrafficState,
        service: &str,
        kind: &str,
        change: impl FnOnce(&mut ServiceTraffic),
    ) -> Result<ServiceView, ControlError> {
        let mut next = state.clone();
        let traffic = next
            .service_mut(service)
            .ok_or_else(|| unknown_service(service))?;
        change(traffic);
        Control::end_rollout_by_hand(traffic, kind);
        if traffic
            .mirror
            .as_ref()
            .is_some_and(|m| m.pool == traffic.active)
        {
            // Its pool became the active one: it gets the requests themselves now.
            traffic.mirror = None;
        }
        self.commit(state, next, Some((service, kind))).await?;
        self.service_view(state, service)
            .ok_or_else(|| unknown_service(service))
    }

    /// The writer lock, unless a handover has frozen the state.
    pub(super) async fn writable(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, TrafficState>, ControlError> {
        let state = self.state.lock().await;
        if self.frozen.load(Ordering::SeqCst) {
            return Err(ControlError::Upgrading);
        }
        Ok(state)
    }

    /// Takes the writer lock and checks `If-Match`.
    async fn lock_current(
        &self,
        if_match: Option<u64>,
    ) -> Result<tokio::sync::MutexGuard<'_, TrafficState>, ControlError> {
        let state = self.writable().await?;
        if let Some(given) = if_match {
            if given != state.generation {
                return Err(ControlError::StaleGeneration {
                    given,
                    current: state.generation,
                });
            }
        }
        Ok(state)
    }

    /// Persists `next` with a new generation, then swaps the routing table to it. If the
    /// write fails nothing changes: the old table and state stay in force.
    async fn commit(
        &self,
        current: &mut TrafficState,
        mut next: TrafficState,
        record: Option<(&str, &str)>,
    ) -> Result<(), ControlError> {
        if next == *current {
            // Nothing changes: no new generation, so a script's If-Match stays valid.
            return Ok(());
        }
        next.generation = self.next_generation(current);
        if let Some((service, kind)) = record {
            let generation = next.generation;
            if let Some(traffic) = next.service_mut(service) {
                traffic.record(generation, kind);
            }
        }
        self.persist(current, &mut next).await?;
        let table = self.build_table(&next).await;
        let same_backends = table.same_backends;
        let previous = self.table.swap(table);
        // Freeing a table of 10,000 services takes milliseconds: not on a worker.
        tokio::task::spawn_blocking(move || drop(previous));
        if !same_backends {
            // Walks every backend; a traffic change (switch, canary) never needs it.
            self.sync_health_checks();
        }
        if let Some((service, kind)) = record {
            if let Some(traffic) = next.services.get(service) {
                tracing::info!(
                    service,
                    kind,
                    generation = next.generation,
                    active = %traffic.active,
                    canary = ?traffic.canary.as_ref().map(|c| (&c.pool, f64::from(c.weight_bp) / 100.0)),
                    "traffic change"
                );
            }
        } else {
            tracing::info!(
                generation = next.generation,
                modes = ?next.backends,
                members = ?next.members,
                "backend change"
            );
        }
        if let Some((service, kind)) = record {
            self.metrics.traffic_change(service, kind);
        }
        self.generation.store(next.generation, Ordering::Relaxed);
        *current = next;
        Ok(())
    }

    /// Builds the routing table for `state` on a blocking thread: at thousands of
    /// backends it takes milliseconds, which must not be taken from a worker that
    /// serves requests (with `workers = 1`, the only one).
    async fn build_table(&self, state: &TrafficState) -> Arc<RoutingTable> {
        let config = self.config.load_full();
        let settings = self.settings.load_full();
        let names = self.resolved.load_full();
        let state = state.clone();
        let previous = self.table.load_full();
        let metrics = self
            .request_metrics
            .load(Ordering::Relaxed)
            .then(|| Arc::clone(&self.metrics));
        let built = tokio::task::spawn_blocking(move || {
            RoutingTable::build(
                &config,
                &settings,
                &names,
                &state,
                Some(&previous),
                metrics.as_deref(),
            )
        })
        .await;
        // Build cannot fail; a panic in it is a bug, passed on as it is.
        Arc::new(built.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
    }

    fn pool(&self, name: &str) -> Result<Arc<Pool>, ControlError> {
        self.table
            .load()
            .pool(name)
            .cloned()
            .ok_or_else(|| ControlError::UnknownPool(name.to_string()))
    }

    fn backend(&self, pool: &str, addr: &str) -> Result<(Arc<Pool>, Arc<Backend>), ControlError> {
        let pool_ref = self.pool(pool)?;
        let parsed: Option<SocketAddr> = addr.parse().ok();
        let backend = pool_ref
            .backends
            .iter()
            .find(|b| Some(b.addr) == parsed || &*b.name == addr)
            .cloned()
            .ok_or_else(|| ControlError::UnknownBackend {
                pool: pool.to_string(),
                addr: addr.to_string(),
            })?;
        Ok((pool_ref, backend))
    }

    /// Refuses a pool that cannot take traffic: every backend out of rotation, known
    /// unhealthy, or (health not yet known) refusing a TCP connect right now.
    async fn require_live(&self, pool: &Pool) -> Result<(), ControlError> {
        // Health state can be up to an interval old, and a deploy may have just
        // stopped these servers: run the pool's own check once, now, on every backend
        // in rotation, and accept the pool if any passes.
        let mut set = tokio::task::JoinSet::new();
        for backend in pool
            .backends
            .iter()
            .filter(|b| b.admin_state() == AdminState::Active)
        {
            let backend = Arc::clone(backend);
            let mut check = pool.settings.health.clone();
            check.timeout = check
                .timeout
                .min(self.probe_timeout.max(Duration::from_millis(100)));
            let upstream = pool.settings.upstream.clone();
            set.spawn(async move { health::check_once(&backend, &check, &upstream).await });
        }
        while let Some(result) = set.join_next().await {
            if matches!(result, Ok(Ok(()))) {
                return Ok(());
            }
        }
        Err(ControlError::NoHealthyBackend(pool.name.to_string()))
    }
}

fn unknown_service(name: &str) -> ControlError {
    ControlError::UnknownService(name.to_string())
}

fn service_traffic<'a>(
    state: &'a TrafficState,
    name: &str,
) -> Result<&'a ServiceTraffic, ControlError> {
    state
        .services
        .get(name)
        .map(|t| &**t)
        .ok_or_else(|| unknown_service(name))
}
