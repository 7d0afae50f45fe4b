//! A config reload, as the control plane sees it: under the state lock the traffic state
//! is reconciled with the new config (runtime changes win where they still fit), saved
//! with a new generation, and only then are the config, the pools' settings and the
//! routing table replaced. Backends that stay are the same objects (health, counters,
//! in-flight, pooled connections, ejection); those that go are dropped from the table,
//! and requests in flight on them finish on the connection they hold.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Control, ControlError};
use crate::client::Upstreams;
use crate::config::{Config, ConfigChange};
use crate::routing::PoolSettings;
use crate::state::TrafficState;

/// What a reload did: the generation it committed and what changed.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Reloaded {
    pub generation: u64,
    pub changes: Vec<ConfigChange>,
}

impl Control {
    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Replaces the config. `changes` are what the caller already knows changed (the
    /// listeners, keys that need a restart); this adds the topology and what the
    /// traffic state had to drop. Nothing changes when the state cannot be saved.
    pub async fn reload(
        &self,
        config: Config,
        upstreams: Upstreams,
        mut changes: Vec<ConfigChange>,
    ) -> Result<Reloaded, ControlError> {
        // Looked up before the lock: a slow resolver must not hold up other changes.
        let names = super::names::resolve_all(&config, &self.names_known(), &self.metrics).await;
        let mut state = self.writable().await?;
        let old = self.config.load_full();
        let resolved = super::names::resolved_pools(&config, &names);
        let resolved_to = |pool: &str, addr: &str| {
            resolved
                .get(pool)
                .is_some_and(|backends| backends.iter().any(|b| b.addr.to_string() == addr))
        };
        let (mut next, warnings) = state.clone().reconcile(&config, Some(&resolved_to));
        changes.extend(backend_changes(&old, &config, &state, &next));
        changes.extend(
            warnings
                .into_iter()
                .map(|w| ConfigChange::new("state", "dropped", w)),
        );
        // A reload that changes nothing keeps the generation, so a script's If-Match
        // stays valid (the files the config names are still read again).
        // In a fleet the state is shared: a reload that changes only this instance's
        // config (timeouts, listeners) writes nothing to etcd, so reloading every
        // instance at once does not make them race.
        let same_traffic = next == *state;
        let unchanged = same_traffic && (changes.is_empty() || self.cluster.get().is_some());
        next.generation = if unchanged {
            state.generation
        } else {
            self.next_generation(&state)
        };
        if !unchanged {
            // In a service's history only when the reload changed its traffic.
            let changed: Vec<String> = state
                .services
                .diff(&next.services)
                .filter_map(|d| match d {
                    imbl::ordmap::DiffItem::Add(name, _)
                    | imbl::ordmap::DiffItem::Update { new: (name, _), .. } => Some(name.clone()),
                    imbl::ordmap::DiffItem::Remove(..) => None,
                })
                .collect();
            let generation = next.generation;
            for name in changed {
                if let Some(traffic) = next.service_mut(&name) {
                    traffic.record(generation, "reload");
                }
            }
        }
        if !unchanged {
            self.persist(&state, &mut next).await?;
        }

        self.settings
            .store(Arc::new(PoolSettings::for_config(&config, &upstreams)));
        self.request_metrics
            .store(config.metrics.enabled, Ordering::Relaxed);
        self.resolved.store(Arc::new(resolved));
        self.set_names(names);
        self.config.store(Arc::new(config));
        let table = self.build_table(&next).await;
        self.table.store(table);
        self.sync_health_checks();
        self.generation.store(next.generation, Ordering::Relaxed);
        tracing::info!(
            generation = next.generation,
            changes = changes.len(),
            "config reloaded"
        );
        for change in &changes {
            tracing::info!(key = %change.key, change = change.change, "{}", change.detail);
        }
        *state = next;
        Ok(Reloaded {
            generation: state.generation,
            changes,
        })
    }
}

/// Backends added to and removed from each pool that exists before and after, by the
/// membership in force (the runtime one where the admin API set it, which the file's
/// list does not override).
fn backend_changes(
    old: &Config,
    new: &Config,
    before: &TrafficState,
    after: &TrafficState,
) -> Vec<ConfigChange> {
    let mut out = Vec::new();
    for pool in &new.pools {
        let Some(old_pool) = old.pools.iter().find(|p| p.name == pool.name) else {
            continue;
        };
        let key = format!("pools.{}.backends", pool.name);
        if after.members.contains_key(&pool.name)
            && (old_pool.backends != pool.backends || old_pool.named != pool.named)
        {
            out.push(ConfigChange::new(
                key.clone(),
                "kept",
                "the membership set through the admin API stays in force; the file's list is not applied",
            ));
        }
        for named in &pool.named {
            if !old_pool.named.iter().any(|n| n.target() == named.target()) {
                out.push(ConfigChange::new(key.clone(), "added", named.target()));
            }
        }
        for named in &old_pool.named {
            if !pool.named.iter().any(|n| n.target() == named.target()) {
                out.push(ConfigChange::new(
                    key.clone(),
                    "removed",
                    format!("{} (requests in flight finish)", named.target()),
                ));
            }
        }
        let was = before.members_of(old_pool);
        let is = after.members_of(pool);
        for backend in &is {
            match was.iter().find(|b| b.addr == backend.addr) {
                None => out.push(ConfigChange::new(
                    key.clone(),
                    "added",
                    backend.addr.to_string(),
                )),
                Some(old) if old.weight != backend.weight => out.push(ConfigChange::new(
                    key.clone(),
                    "changed",
                    format!(
                        "{}: weight {} -> {}",
                        backend.addr, old.weight, backend.weight
                    ),
                )),
                Some(_) => {}
            }
        }
        for backend in &was {
            if !is.iter().any(|b| b.addr == backend.addr) {
                out.push(ConfigChange::new(
                    key.clone(),
                    "removed",
                    format!("{} (requests in flight finish)", backend.addr),
                ));
            }
        }
    }
    out
}
