//! Every traffic change goes through here: validate, build the new routing table,
//! persist, swap, record. One writer at a time (an async mutex held across the whole
//! change); the data plane never waits on it, it only sees the table swap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::backend::{Backend, Health};
use crate::config::Config;
use crate::routing::{self, Pool, RoutingTable};
use crate::state::{self, BackendMode, CanarySpec, MatchSpec, ServiceTraffic, TrafficState};

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
    #[error("pool `{0}` has no healthy backend (pass \"force\": true to switch anyway)")]
    NoHealthyBackend(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Persist(#[from] state::StateError),
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
            ControlError::Persist(_) => 500,
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
            ControlError::Persist(_) => "persist_failed",
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
    config: Config,
    table: Arc<ArcSwap<RoutingTable>>,
    state: Mutex<TrafficState>,
    state_path: PathBuf,
    probe_timeout: Duration,
}

impl Control {
    /// Restores the saved traffic state (warning about what no longer fits the config)
    /// and builds the first routing table.
    pub fn start(config: Config) -> Control {
        let (state, warnings) = state::load(&config.state.path, &config);
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        let table = RoutingTable::build(&config, &state, None);
        Control {
            state_path: config.state.path.clone(),
            probe_timeout: config.proxy.connect_timeout.min(Duration::from_secs(1)),
            table: Arc::new(ArcSwap::from_pointee(table)),
            state: Mutex::new(state),
            config,
        }
    }

    pub fn table(&self) -> &Arc<ArcSwap<RoutingTable>> {
        &self.table
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
        let mut next = state.clone();
        let traffic = next
            .services
            .get_mut(service)
            .ok_or_else(|| unknown_service(service))?;
        if old_active != to {
            traffic.previous_active = Some(old_active);
            traffic.active = to.to_string();
        }
        if traffic.canary.as_ref().is_some_and(|c| c.pool == to) {
            // The canary pool became the active one: nothing left to split.
            traffic.canary = None;
        }
        self.commit(&mut state, next, Some((service, "switch")))
            .await?;
        self.service_view(&state, service)
            .ok_or_else(|| unknown_service(service))
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
        let mut next = state.clone();
        let traffic = next
            .services
            .get_mut(service)
            .ok_or_else(|| unknown_service(service))?;
        traffic.canary = Some(spec);
        self.commit(&mut state, next, Some((service, "canary")))
            .await?;
        self.service_view(&state, service)
            .ok_or_else(|| unknown_service(service))
    }

    pub async fn abort_canary(
        &self,
        service: &str,
        if_match: Option<u64>,
    ) -> Result<ServiceView, ControlError> {
        let mut state = self.lock_current(if_match).await?;
        service_traffic(&state, service)?;
        let mut next = state.clone();
        let traffic = next
            .services
            .get_mut(service)
            .ok_or_else(|| unknown_service(service))?;
        traffic.canary = None;
        self.commit(&mut state, next, Some((service, "canary_abort")))
            .await?;
        self.service_view(&state, service)
            .ok_or_else(|| unknown_service(service))
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
        let mut next = state.clone();
        let traffic = next
            .services
            .get_mut(service)
            .ok_or_else(|| unknown_service(service))?;
        traffic.previous_active = Some(std::mem::replace(&mut traffic.active, canary.pool));
        traffic.canary = None;
        self.commit(&mut state, next, Some((service, "promote")))
            .await?;
        self.service_view(&state, service)
            .ok_or_else(|| unknown_service(service))
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
        let mut next = state.clone();
        let traffic = next
            .services
            .get_mut(service)
            .ok_or_else(|| unknown_service(service))?;
        traffic.previous_active = Some(std::mem::replace(&mut traffic.active, previous));
        traffic.canary = None;
        self.commit(&mut state, next, Some((service, "rollback")))
            .await?;
        self.service_view(&state, service)
            .ok_or_else(|| unknown_service(service))
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
        next.generation = current.generation + 1;
        if let Some((service, kind)) = record {
            if let Some(traffic) = next.services.get_mut(service) {
                traffic.record(next.generation, kind);
            }
        }
        let path = self.state_path.clone();
        let to_save = next.clone();
        tokio::task::spawn_blocking(move || state::save(&path, &to_save))
            .await
            .map_err(|e| ControlError::Conflict(format!("state writer failed: {e}")))??;
        let table = RoutingTable::build(&self.config, &next, Some(&self.table.load()));
        self.table.store(Arc::new(table));
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
            tracing::info!(generation = next.generation, backends = ?next.backends, "backend state change");
        }
        *current = next;
        Ok(())
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
        if pool
            .backends
            .iter()
            .any(|b| b.is_available() && b.health() == Health::Healthy)
        {
            return Ok(());
        }
        let probes = pool.backends.iter().filter(|b| b.is_available()).map(|b| {
            tokio::time::timeout(self.probe_timeout, tokio::net::TcpStream::connect(b.addr))
        });
        let mut set = tokio::task::JoinSet::new();
        for probe in probes {
            set.spawn(probe);
        }
        while let Some(result) = set.join_next().await {
            if matches!(result, Ok(Ok(Ok(_)))) {
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

fn backend_view(pool: &Pool, backend: &Backend, generation: u64) -> BackendView {
    BackendView {
        pool: pool.name.to_string(),
        addr: backend.name.to_string(),
        weight: backend.weight,
        health: backend.health().as_str(),
        state: backend.admin_state().as_str(),
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
