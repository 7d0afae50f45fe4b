//! Every traffic change goes through here: validate, build the new routing table,
//! persist, swap, record. One writer at a time (an async mutex held across the whole
//! change); the data plane never waits on it, it only sees the table swap.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::backend::{AdminState, Backend, Health};
use crate::config::Config;
use crate::health;
use crate::metrics::{BackendSample, LiveState, Metrics, ServiceSample};
use crate::routing::{self, Pool, RoutingTable};
use crate::state::{
    self, BackendMode, CanarySpec, MatchSpec, MemberSpec, ServiceTraffic, TrafficState,
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
            | ControlError::UnknownBackend { .. } => 404,
            ControlError::StaleGeneration { .. }
            | ControlError::NoHealthyBackend(_)
            | ControlError::Conflict(_) => 409,
            ControlError::DrainTimeout { .. } => 408,
            ControlError::TooManyBackends { .. } => 413,
            ControlError::Persist(_) | ControlError::PartlyApplied { .. } => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ControlError::BadRequest(_) => "bad_request",
            ControlError::UnknownService(_) => "unknown_service",
            ControlError::UnknownPool(_) => "unknown_pool",
            ControlError::UnknownBackend { .. } => "unknown_backend",
            ControlError::StaleGeneration { .. } => "stale_generation",
            ControlError::NoHealthyBackend(_) => "no_healthy_backend",
            ControlError::Conflict(_) => "conflict",
            ControlError::DrainTimeout { .. } => "timeout",
            ControlError::TooManyBackends { .. } => "too_many_backends",
            ControlError::Persist(_) | ControlError::PartlyApplied { .. } => "persist_failed",
        }
    }
}

/// A canary as the admin API takes it: weight in percent.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryRequest {
    pub pool: String,
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

#[derive(Debug, Clone, Serialize)]
pub struct StateView {
    pub generation: u64,
    pub services: Vec<ServiceView>,
    pub pools: Vec<PoolView>,
    pub state_file: StateFileView,
}

#[derive(Debug, Clone, Serialize)]
pub struct StateFileView {
    pub path: String,
    /// Set when the file found at start was corrupt and the state restarted from the
    /// config.
    pub corrupt_at_start: Option<state::CorruptFile>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub name: String,
    pub hosts: Vec<String>,
    pub path_prefix: String,
    pub active: String,
    pub previous_active: Option<String>,
    pub canary: Option<CanaryView>,
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CanaryView {
    pub pool: String,
    /// Percent.
    pub weight: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<MatchSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<MatchSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sticky: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    pub name: String,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    pub pool: String,
    pub addr: String,
    pub weight: u32,
    pub health: &'static str,
    pub state: &'static str,
    /// Taken out by passive ejection (failures of real traffic) until its time runs out;
    /// `health` is what the active checks say.
    pub ejected: bool,
    pub in_flight: u64,
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryView {
    pub service: String,
    pub generation: u64,
    pub history: Vec<state::HistoryEntry>,
}

pub struct Control {
    config: Arc<Config>,
    table: Arc<ArcSwap<RoutingTable>>,
    state: Mutex<TrafficState>,
    state_path: PathBuf,
    probe_timeout: Duration,
    /// One health-check task per backend object, keyed by the object's address.
    health_tasks: std::sync::Mutex<HashMap<usize, tokio::task::AbortHandle>>,
    metrics: Arc<Metrics>,
    /// Attach per-request metric children to routing tables (`[metrics] enabled`).
    request_metrics: bool,
    /// The committed generation, readable without the writer lock (for scrapes).
    generation: Arc<AtomicU64>,
    corrupt_at_start: Option<state::CorruptFile>,
}

impl Control {
    /// Restores the saved traffic state (warning about what no longer fits the config)
    /// and builds the first routing table. A state file that exists but cannot be read
    /// stops the start: serving would overwrite it.
    pub fn start(config: Config) -> Result<Control, ControlError> {
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
        let table = Arc::new(ArcSwap::from_pointee(RoutingTable::build(
            &config, &state, None, None,
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
            let with_metrics =
                RoutingTable::build(&config, &state, Some(&table.load()), Some(&metrics));
            table.store(Arc::new(with_metrics));
        }
        Ok(Control {
            state_path: config.state.path.clone(),
            probe_timeout: config.proxy.connect_timeout.min(Duration::from_secs(1)),
            table,
            state: Mutex::new(state),
            config: Arc::new(config),
            health_tasks: std::sync::Mutex::new(HashMap::new()),
            metrics,
            request_metrics,
            generation,
            corrupt_at_start: corrupt,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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

    /// Starts a health-check task for every backend in the table that has none, and
    /// stops those of backends no longer in it. Needs a tokio runtime.
    pub fn sync_health_checks(&self) {
        let table = self.table.load();
        let Ok(mut tasks) = self.health_tasks.lock() else {
            return;
        };
        let mut live = std::collections::HashSet::new();
        for pool in &table.pools {
            for backend in &pool.backends {
                let key = Arc::as_ptr(backend) as usize;
                live.insert(key);
                tasks.entry(key).or_insert_with(|| {
                    let counters = self
                        .metrics
                        .health_check_counters(&pool.name, &backend.name);
                    tokio::spawn(health::check_loop(
                        Arc::clone(&pool.name),
                        Arc::clone(backend),
                        pool.settings.health.clone(),
                        pool.settings.upstream.clone(),
                        counters,
                    ))
                    .abort_handle()
                });
            }
        }
        tasks.retain(|key, task| {
            let keep = live.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
    }

    pub fn stop_health_checks(&self) {
        if let Ok(mut tasks) = self.health_tasks.lock() {
            for (_, task) in tasks.drain() {
                task.abort();
            }
        }
    }

    /// Has every backend been checked at least once?
    pub fn first_round_done(&self) -> bool {
        self.table
            .load()
            .pools
            .iter()
            .all(|p| p.backends.iter().all(|b| b.health() != Health::Unknown))
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

    pub async fn view(&self) -> StateView {
        let state = self.state.lock().await;
        let table = self.table.load();
        StateView {
            generation: state.generation,
            services: self
                .config
                .services
                .iter()
                .filter_map(|s| self.service_view(&state, &s.name))
                .collect(),
            pools: table
                .pools
                .iter()
                .map(|p| PoolView {
                    name: p.name.to_string(),
                    backends: p
                        .backends
                        .iter()
                        .map(|b| backend_view(p, b, state.generation))
                        .collect(),
                })
                .collect(),
            state_file: StateFileView {
                path: self.state_path.display().to_string(),
                corrupt_at_start: self.corrupt_at_start.clone(),
            },
        }
    }

    pub async fn history(&self, service: &str) -> Result<HistoryView, ControlError> {
        let state = self.state.lock().await;
        let traffic = state
            .services
            .get(service)
            .ok_or_else(|| ControlError::UnknownService(service.to_string()))?;
        Ok(HistoryView {
            service: service.to_string(),
            generation: state.generation,
            history: traffic.history.clone(),
        })
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
            traffic.canary = Some(spec)
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

    /// Replaces the backends of `pool`. New backends join at once (their health is
    /// checked like any other); backends that leave are drained first: they take no new
    /// requests, and are removed once nothing is in flight on them, or left draining
    /// (408) if that takes longer than `drain_timeout`.
    pub async fn set_members(
        &self,
        pool: &str,
        members: Vec<MemberSpec>,
        drain_timeout: Duration,
        if_match: Option<u64>,
    ) -> Result<PoolView, ControlError> {
        let configured = self
            .config
            .pools
            .iter()
            .find(|p| p.name == pool)
            .ok_or_else(|| ControlError::UnknownPool(pool.to_string()))?;
        if members.is_empty() {
            return Err(ControlError::BadRequest(
                "a pool needs at least one backend".into(),
            ));
        }
        let limit = self.config.proxy.max_backends_per_pool;
        if members.len() > limit {
            return Err(ControlError::TooManyBackends {
                pool: pool.to_string(),
                limit,
                given: members.len(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        let mut normalized = Vec::with_capacity(members.len());
        for member in members {
            let addr: SocketAddr = member.addr.parse().map_err(|_| {
                ControlError::BadRequest(format!(
                    "`{}` is not an IP address with a port, such as \"127.0.0.1:8080\"",
                    member.addr
                ))
            })?;
            if !(1..=1000).contains(&member.weight) {
                return Err(ControlError::BadRequest(format!(
                    "weight of `{}` must be between 1 and 1000",
                    member.addr
                )));
            }
            if !seen.insert(addr) {
                return Err(ControlError::BadRequest(format!(
                    "`{}` is listed twice",
                    member.addr
                )));
            }
            normalized.push(MemberSpec {
                addr: addr.to_string(),
                weight: member.weight,
            });
        }

        // Phase 1: the new list joins; leavers stay, draining.
        let leaving: Vec<String> = {
            let mut state = self.lock_current(if_match).await?;
            let current = state.members_of(configured);
            let leaving: Vec<String> = current
                .iter()
                .map(|b| b.addr.to_string())
                .filter(|addr| !normalized.iter().any(|m| &m.addr == addr))
                .collect();
            let mut next = state.clone();
            let mut list = normalized.clone();
            for backend in &current {
                let addr = backend.addr.to_string();
                if leaving.contains(&addr) {
                    list.push(MemberSpec {
                        addr: addr.clone(),
                        weight: backend.weight,
                    });
                    next.backends
                        .entry(pool.to_string())
                        .or_default()
                        .insert(addr, BackendMode::Draining);
                }
            }
            next.members.insert(pool.to_string(), list);
            self.commit(&mut state, next, None).await?;
            leaving
        };
        if leaving.is_empty() {
            return self.pool_view(pool).await;
        }

        // Wait, without holding the writer lock, for the leavers to finish.
        let leavers: Vec<Arc<Backend>> = leaving
            .iter()
            .filter_map(|addr| self.find_backend(pool, addr).ok())
            .collect();
        let deadline = tokio::time::Instant::now() + drain_timeout;
        loop {
            let busy: u64 = leavers.iter().map(|b| b.in_flight()).sum();
            if busy == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ControlError::DrainTimeout {
                    in_flight: busy,
                    backends: leaving.join(", "),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Phase 2: remove them (unless someone re-enabled one meanwhile).
        let mut state = self.state.lock().await;
        let mut next = state.clone();
        let current = next.members_of(configured);
        let keep: Vec<MemberSpec> = current
            .iter()
            .filter(|b| {
                let addr = b.addr.to_string();
                !(leaving.contains(&addr)
                    && next.backend_mode(pool, &addr) == Some(BackendMode::Draining))
            })
            .map(|b| MemberSpec {
                addr: b.addr.to_string(),
                weight: b.weight,
            })
            .collect();
        if let Some(modes) = next.backends.get_mut(pool) {
            modes.retain(|addr, _| keep.iter().any(|m| &m.addr == addr));
            if modes.is_empty() {
                next.backends.remove(pool);
            }
        }
        next.members.insert(pool.to_string(), keep);
        let joined_generation = state.generation;
        self.commit(&mut state, next, None)
            .await
            .map_err(|e| match e {
                ControlError::Persist(source) => ControlError::PartlyApplied {
                    done: format!(
                        "the new backends of pool `{pool}` joined and {} drained",
                        leaving.join(", ")
                    ),
                    generation: joined_generation,
                    source,
                },
                other => other,
            })?;
        drop(state);
        self.pool_view(pool).await
    }

    /// Adds one backend to `pool`.
    pub async fn add_member(
        &self,
        pool: &str,
        member: MemberSpec,
        if_match: Option<u64>,
    ) -> Result<PoolView, ControlError> {
        let mut list = self.members(pool).await?;
        let addr: Option<SocketAddr> = member.addr.parse().ok();
        if list
            .iter()
            .any(|m| m.addr.parse::<SocketAddr>().ok() == addr && addr.is_some())
        {
            return Err(ControlError::Conflict(format!(
                "pool `{pool}` already has backend `{}`",
                member.addr
            )));
        }
        list.push(member);
        self.set_members(pool, list, Duration::ZERO, if_match).await
    }

    /// Drains and removes one backend of `pool`.
    pub async fn remove_member(
        &self,
        pool: &str,
        addr: &str,
        drain_timeout: Duration,
        if_match: Option<u64>,
    ) -> Result<PoolView, ControlError> {
        let backend = self.find_backend(pool, addr)?;
        let list: Vec<MemberSpec> = self
            .members(pool)
            .await?
            .into_iter()
            .filter(|m| m.addr.parse::<SocketAddr>().ok() != Some(backend.addr))
            .collect();
        if list.is_empty() {
            return Err(ControlError::Conflict(format!(
                "`{addr}` is the last backend of pool `{pool}`; a pool needs at least one"
            )));
        }
        self.set_members(pool, list, drain_timeout, if_match).await
    }

    async fn members(&self, pool: &str) -> Result<Vec<MemberSpec>, ControlError> {
        let configured = self
            .config
            .pools
            .iter()
            .find(|p| p.name == pool)
            .ok_or_else(|| ControlError::UnknownPool(pool.to_string()))?;
        let state = self.state.lock().await;
        Ok(state
            .members_of(configured)
            .into_iter()
            .map(|b| MemberSpec {
                addr: b.addr.to_string(),
                weight: b.weight,
            })
            .collect())
    }

    pub async fn pool_view(&self, pool: &str) -> Result<PoolView, ControlError> {
        let generation = self.state.lock().await.generation;
        let table = self.table.load();
        let pool_ref = table
            .pool(pool)
            .ok_or_else(|| ControlError::UnknownPool(pool.to_string()))?;
        Ok(PoolView {
            name: pool_ref.name.to_string(),
            backends: pool_ref
                .backends
                .iter()
                .map(|b| backend_view(pool_ref, b, generation))
                .collect(),
        })
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
        change(
            next.services
                .get_mut(service)
                .ok_or_else(|| unknown_service(service))?,
        );
        self.commit(state, next, Some((service, kind))).await?;
        self.service_view(state, service)
            .ok_or_else(|| unknown_service(service))
    }

    /// Takes the writer lock and checks `If-Match`.
    async fn lock_current(
        &self,
        if_match: Option<u64>,
    ) -> Result<tokio::sync::MutexGuard<'_, TrafficState>, ControlError> {
        let state = self.state.lock().await;
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
        next.generation = current.generation + 1;
        if let Some((service, kind)) = record {
            if let Some(traffic) = next.services.get_mut(service) {
                traffic.record(next.generation, kind);
            }
        }
        self.save(next.clone()).await?;
        let table = self.build_table(&next).await;
        self.table.store(table);
        self.sync_health_checks();
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
        let config = Arc::clone(&self.config);
        let state = state.clone();
        let previous = self.table.load_full();
        let metrics = self.request_metrics.then(|| Arc::clone(&self.metrics));
        let built = tokio::task::spawn_blocking(move || {
            RoutingTable::build(&config, &state, Some(&previous), metrics.as_deref())
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

    fn service_view(&self, state: &TrafficState, name: &str) -> Option<ServiceView> {
        let configured = self.config.services.iter().find(|s| s.name == name)?;
        let traffic = state.services.get(name)?;
        Some(ServiceView {
            name: name.to_string(),
            hosts: configured.hosts.iter().map(ToString::to_string).collect(),
            path_prefix: configured.path_prefix.clone(),
            active: traffic.active.clone(),
            previous_active: traffic.previous_active.clone(),
            canary: traffic.canary.as_ref().map(|c| CanaryView {
                pool: c.pool.clone(),
                weight: f64::from(c.weight_bp) / 100.0,
                header: c.header.clone(),
                cookie: c.cookie.clone(),
                sticky: c.sticky.clone(),
            }),
            generation: state.generation,
        })
    }
}

/// What the metrics scrape shows of `table` and its backends now.
fn live_state(table: &RoutingTable, generation: u64) -> LiveState {
    LiveState {
        generation,
        pools: table.pools.iter().map(|p| Arc::clone(&p.name)).collect(),
        backends: table
            .pools
            .iter()
            .flat_map(|pool| {
                pool.backends.iter().map(|b| BackendSample {
                    pool: Arc::clone(&pool.name),
                    backend: Arc::clone(&b.name),
                    in_flight: b.in_flight(),
                    healthy: b.health() == Health::Healthy,
                    ejected: b.is_ejected(),
                    state: b.admin_state(),
                })
            })
            .collect(),
        services: table
            .services
            .iter()
            .map(|s| ServiceSample {
                name: Arc::clone(&s.name),
                active_pool: Arc::clone(&s.active.name),
                canary: s
                    .canary
                    .as_ref()
                    .map(|c| (Arc::clone(&c.pool.name), f64::from(c.split.weight) / 100.0)),
            })
            .collect(),
    }
}

fn backend_view(pool: &Pool, backend: &Backend, generation: u64) -> BackendView {
    BackendView {
        pool: pool.name.to_string(),
        addr: backend.name.to_string(),
        weight: backend.weight(),
        health: backend.health().as_str(),
        state: backend.admin_state().as_str(),
        ejected: backend.is_ejected(),
        in_flight: backend.in_flight(),
        generation,
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
        .ok_or_else(|| unknown_service(name))
}
