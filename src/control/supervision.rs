//! Health-check supervision: one task per backend object and pool settings, started
//! when a backend appears in the table, restarted when a reload gives its pool new
//! settings (it resumes from the backend's current health), stopped when it leaves.

use std::sync::Arc;

use super::Control;
use crate::backend::Health;
use crate::health;

impl Control {
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
                let key = (
                    Arc::as_ptr(backend) as usize,
                    Arc::as_ptr(&pool.settings) as usize,
                );
                live.insert(key);
                tasks.entry(key).or_insert_with(|| {
                    tokio::spawn(health::check_loop(
                        Arc::clone(&pool.name),
                        Arc::clone(backend),
                        pool.settings.health.clone(),
                        pool.settings.upstream.clone(),
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
}
