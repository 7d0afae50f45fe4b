//! Health-check supervision: every backend object in the table is checked with its
//! pool's settings; checks start when a backend appears in the table, restart when a
//! reload gives its pool new settings (resuming from the backend's current health),
//! and stop when it leaves.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::Control;
use crate::backend::Health;
use crate::health::{CheckScheduler, CheckTarget};

/// The checks under way, keyed by the addresses of the backend object and of its pool
/// settings (both held by the scheduler while checked, so neither address is reused
/// meanwhile).
#[derive(Default)]
pub(super) struct HealthChecks {
    scheduler: Option<CheckScheduler>,
    ids: HashMap<(usize, usize), u64>,
    next_id: u64,
}

impl Control {
    /// Starts checking every backend in the table that is not checked yet, and stops
    /// checking those no longer in it. Needs a tokio runtime.
    pub fn sync_health_checks(&self) {
        let table = self.table.load();
        let Ok(mut checks) = self.health_checks.lock() else {
            return;
        };
        let HealthChecks {
            scheduler,
            ids,
            next_id,
        } = &mut *checks;
        let scheduler = scheduler.get_or_insert_with(CheckScheduler::spawn);
        let mut live = HashSet::with_capacity(ids.len());
        for pool in &table.pools {
            for backend in &pool.backends {
                let key = (
                    Arc::as_ptr(backend) as usize,
                    Arc::as_ptr(&pool.settings) as usize,
                );
                live.insert(key);
                ids.entry(key).or_insert_with(|| {
                    *next_id += 1;
                    scheduler.start(
                        *next_id,
                        CheckTarget {
                            pool: Arc::clone(&pool.name),
                            backend: Arc::clone(backend),
                            settings: Arc::clone(&pool.settings),
                        },
                    );
                    *next_id
                });
            }
        }
        ids.retain(|key, id| {
            let keep = live.contains(key);
            if !keep {
                scheduler.stop(*id);
            }
            keep
        });
    }

    pub fn stop_health_checks(&self) {
        if let Ok(mut checks) = self.health_checks.lock() {
            *checks = HealthChecks::default();
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
}
