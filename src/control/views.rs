//! What the admin API shows: the state, a service, a pool, a backend, the history,
//! and what the metrics scrape reads, all built from the table and the backends' atomics.

use std::sync::Arc;

use serde::Serialize;

use super::{Control, ControlError};
use crate::backend::{Backend, Health};
use crate::metrics::{BackendSample, LiveState, ServiceSample};
use crate::routing::{Pool, RoutingTable};
use crate::state::{self, MatchSpec, TrafficState};

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StateView {
    pub generation: u64,
    pub services: Vec<ServiceView>,
    pub pools: Vec<PoolView>,
    pub state_file: StateFileView,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StateFileView {
    pub path: String,
    /// Set when the file found at start was corrupt and the state restarted from the
    /// config.
    pub corrupt_at_start: Option<state::CorruptFile>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ServiceView {
    pub name: String,
    pub hosts: Vec<String>,
    pub path_prefix: String,
    pub active: String,
    pub previous_active: Option<String>,
    pub canary: Option<CanaryView>,
    /// The preview route, when the service has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<PreviewView>,
    /// Where copies of a share of its requests go, when mirrored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorView>,
    /// The last rollout's pool and status (`GET .../rollout` has the rest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSummary>,
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MirrorView {
    pub pool: String,
    /// Percent of the service's requests copied.
    pub percent: f64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RolloutSummary {
    pub pool: String,
    pub status: crate::rollout::RolloutStatus,
    /// 1-based, of `steps`.
    pub step: usize,
    pub steps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PreviewView {
    pub header: String,
    pub pools: Vec<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PoolView {
    pub name: String,
    pub backends: Vec<BackendView>,
    /// Backends written as host names, with what they resolved to (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<super::NameView>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    /// Active health checks run so far, and whether the last one passed: a script can
    /// wait for a check that ran after it restarted the backend.
    pub checks: u64,
    pub last_check_ok: bool,
    /// Why the last active check failed (absent while checks pass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_check_error: Option<String>,
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HistoryView {
    pub service: String,
    pub generation: u64,
    pub history: Vec<state::HistoryEntry>,
}

impl Control {
    pub async fn view(&self) -> StateView {
        let state = self.state.lock().await;
        let table = self.table.load();
        StateView {
            generation: state.generation,
            services: self
                .config
                .load()
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
                    names: self.name_views(&p.name),
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
            names: self.name_views(pool),
        })
    }

    pub(super) fn service_view(&self, state: &TrafficState, name: &str) -> Option<ServiceView> {
        let config = self.config.load();
        let configured = config.services.iter().find(|s| s.name == name)?;
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
            preview: configured.preview.as_ref().map(|p| PreviewView {
                header: p.header.clone(),
                pools: p.pools.clone(),
            }),
            mirror: traffic.mirror.as_ref().map(|m| MirrorView {
                pool: m.pool.clone(),
                percent: f64::from(m.percent_bp) / 100.0,
            }),
            rollout: traffic.rollout.as_ref().map(|r| RolloutSummary {
                pool: r.pool.clone(),
                status: r.status,
                step: r.step + 1,
                steps: r.steps.len(),
                reason: r.reason.clone(),
            }),
            generation: state.generation,
        })
    }
}

/// What the metrics scrape shows of `table` and its backends now.
pub(super) fn live_state(table: &RoutingTable, generation: u64) -> LiveState {
    LiveState {
        generation,
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
                    checks: b.check_counts(),
                    timeouts: b.timeout_counts(),
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
                preview_pools: s
                    .preview
                    .iter()
                    .flat_map(|p| &p.pools)
                    .map(|p| Arc::clone(&p.pool.name))
                    .collect(),
            })
            .collect(),
    }
}

pub(super) fn backend_view(pool: &Pool, backend: &Backend, generation: u64) -> BackendView {
    BackendView {
        pool: pool.name.to_string(),
        addr: backend.name.to_string(),
        weight: backend.weight(),
        health: backend.health().as_str(),
        state: backend.admin_state().as_str(),
        ejected: backend.is_ejected(),
        in_flight: backend.in_flight(),
        checks: backend.checks(),
        last_check_ok: backend.last_check_ok(),
        last_check_error: backend.last_check_error().map(|e| e.as_ref().clone()),
        generation,
    }
}
