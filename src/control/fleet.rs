//! The control plane in a fleet: changes are committed to etcd (a compare-and-swap on
//! the generation applied here), states written through other instances are applied
//! from the watch, and the local state file becomes a cache to start from while etcd
//! is down. Without `[cluster]` none of this runs.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::collections::{BTreeMap, HashSet};
use std::sync::Weak;

use super::{Control, ControlError};
use crate::backend::AdminState;
use crate::cluster::{Cluster, ClusterError, FleetState};
use crate::state::TrafficState;

/// The control plane as the fleet tasks see it (weak: they end with it). States from
/// etcd go through one queue, applied in the order they came.
struct FleetHandle(
    Weak<Control>,
    Option<tokio::sync::mpsc::UnboundedSender<(TrafficState, u64, bool)>>,
);

impl FleetState for FleetHandle {
    fn applied(&self) -> u64 {
        self.0
            .upgrade()
            .map_or(0, |c| c.generation.load(Ordering::Relaxed))
    }

    fn draining_in_flight(&self) -> BTreeMap<String, u64> {
        let Some(control) = self.0.upgrade() else {
            return BTreeMap::new();
        };
        let table = control.table.load();
        table
            .pools
            .iter()
            .flat_map(|pool| {
                pool.backends
                    .iter()
                    .filter(|b| b.admin_state() != AdminState::Active)
                    .map(move |b| (format!("{}/{}", pool.name, b.name), b.in_flight()))
            })
            .collect()
    }

    fn rollout_routes(&self) -> Vec<crate::cluster::RouteCount> {
        self.0
            .upgrade()
            .map_or_else(Vec::new, |control| control.local_rollout_routes())
    }

    fn apply(&self, state: TrafficState, generation: u64, force: bool) {
        if let Some(queue) = &self.1 {
            let _ = queue.send((state, generation, force));
        }
    }

    fn recreate(&self) {
        let Some(control) = self.0.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let Some(cluster) = control.cluster.get() else {
                return;
            };
            let mut current = control.state.lock().await;
            match cluster.write(0, &current).await {
                Ok(generation) => {
                    current.generation = generation;
                    control.generation.store(generation, Ordering::Relaxed);
                    tracing::info!(
                        generation,
                        "cluster: wrote the state applied here as the fleet's"
                    );
                }
                Err(e) => tracing::warn!("cluster: cannot write the state: {e}"),
            }
        });
    }
}

impl From<ClusterError> for ControlError {
    fn from(e: ClusterError) -> ControlError {
        match e {
            ClusterError::Conflict { current } => {
                ControlError::StaleGeneration { given: 0, current }
            }
            other => ControlError::ClusterUnavailable(other.to_string()),
        }
    }
}

impl Control {
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// This instance belongs to a fleet it has not joined yet (etcd was down at start):
    /// changes are refused until it has.
    pub fn expect_cluster(&self) {
        self.cluster_pending.store(true, Ordering::SeqCst);
    }

    fn me(&self) -> Weak<Control> {
        self.myself.get().cloned().unwrap_or_default()
    }

    /// Joins the fleet: the state in etcd replaces the cached one (or, if the fleet has
    /// none yet, the cached one is written as the first), then the watch and the
    /// registration run in the background. etcd down: the cached state serves, and
    /// the background tasks join once it is back.
    pub async fn join_cluster(self: &Arc<Self>, cluster: Arc<Cluster>) {
        if self.cluster.set(Arc::clone(&cluster)).is_err() {
            return;
        }
        let _ = self.myself.set(Arc::downgrade(self));
        match cluster.read().await {
            Ok(Some((state, generation))) => self.apply_remote(state, generation, true).await,
            Ok(None) => {
                let mut current = self.state.lock().await;
                match cluster.write(0, &current).await {
                    Ok(generation) => {
                        current.generation = generation;
                        self.generation.store(generation, Ordering::Relaxed);
                        tracing::info!(generation, "cluster: wrote the first state of the fleet");
                    }
                    Err(e) => tracing::warn!("cluster: cannot write the first state: {e}"),
                }
            }
            Err(e) => tracing::warn!(
                "cluster: etcd unavailable at start, serving the cached state (generation {}): {e}",
                self.generation.load(Ordering::Relaxed)
            ),
        }
        let (queue, mut arriving) = tokio::sync::mpsc::unbounded_channel();
        {
            let control = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some((state, generation, force)) = arriving.recv().await {
                    let Some(control) = control.upgrade() else {
                        return;
                    };
                    control.apply_remote(state, generation, force).await;
                }
            });
        }
        let handle: Arc<dyn FleetState> = Arc::new(FleetHandle(Arc::downgrade(self), Some(queue)));
        crate::cluster::run(cluster, handle);
    }

    /// Applies a state read from etcd: newer than what is applied here (or any, when
    /// `force`d at join), reconciled with this instance's config.
    pub(super) async fn apply_remote(&self, state: TrafficState, generation: u64, force: bool) {
        let mut current = self.state.lock().await;
        if self.frozen.load(Ordering::SeqCst) {
            // Handing over to a new process, which applies it; thawed, this one reads
            // the state again.
            return;
        }
        if !force && generation <= current.generation {
            return;
        }
        if let Ok(mut raw) = self.fleet_raw.lock() {
            *raw = Some(state.clone());
        }
        let (mut next, warnings) = state.reconcile(&self.config.load(), None);
        for warning in warnings {
            tracing::warn!("cluster state: {warning}");
        }
        next.generation = generation;
        if let Err(e) = self.save(next.clone()).await {
            tracing::warn!("cluster: cannot cache the state locally: {e}");
        }
        let table = self.build_table(&next).await;
        self.table.store(table);
        self.sync_health_checks();
        self.generation.store(generation, Ordering::Relaxed);
        *current = next;
        tracing::info!(generation, "cluster: applied the fleet's state");
        drop(current);
        if let Some(cluster) = self.cluster.get() {
            cluster.generation_gauge.set(generation as i64);
            cluster
                .announce(&FleetHandle(self.me(), None), generation)
                .await;
        }
    }

    /// Makes `next` durable: in etcd (then cached locally) in a fleet, in the state file
    /// otherwise. Sets its generation.
    pub(super) async fn persist(
        &self,
        current: &TrafficState,
        next: &mut TrafficState,
    ) -> Result<(), ControlError> {
        let Some(cluster) = self.cluster.get() else {
            if self.cluster_pending.load(Ordering::SeqCst) {
                // In a fleet but not joined yet: a change made only here would be lost.
                return Err(ControlError::ClusterUnavailable(
                    "not connected to etcd yet".into(),
                ));
            }
            return self.save(next.clone()).await;
        };
        let written = self.keeping_what_others_know(next);
        let generation =
            cluster
                .write(current.generation, &written)
                .await
                .map_err(|e| match e {
                    ClusterError::Conflict { current: now } => ControlError::StaleGeneration {
                        given: current.generation,
                        current: now,
                    },
                    other => other.into(),
                })?;
        next.generation = generation;
        next.fill_unknown_history_generations(generation);
        if let Err(e) = self.save(next.clone()).await {
            tracing::warn!("cluster: cannot cache the state locally: {e}");
        }
        let cluster = Arc::clone(cluster);
        let handle = FleetHandle(self.me(), None);
        tokio::spawn(async move { cluster.announce(&handle, generation).await });
        Ok(())
    }

    /// `next` with what the fleet's last state holds and this instance's config does not
    /// know (services, pools, a service on a pool unknown here): written back as it
    /// was, so an instance whose config lags never deletes the fleet's state.
    fn keeping_what_others_know(&self, next: &TrafficState) -> TrafficState {
        let raw = self.fleet_raw.lock().ok().and_then(|r| r.clone());
        let Some(raw) = raw else {
            return next.clone();
        };
        let config = self.config.load();
        let pools: HashSet<&str> = config.pools.iter().map(|p| p.name.as_str()).collect();
        let services: HashSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let known_pool = |name: &str| pools.contains(name);
        let mut out = next.clone();
        for (name, traffic) in &raw.services {
            let known_service = services.contains(name.as_str());
            let unknown_pools = !known_pool(&traffic.active)
                || traffic
                    .canary
                    .as_ref()
                    .is_some_and(|c| !known_pool(&c.pool));
            if !known_service || unknown_pools {
                out.services.insert(name.clone(), traffic.clone());
            }
        }
        for (pool, modes) in &raw.backends {
            if !known_pool(pool) {
                out.backends.insert(pool.clone(), modes.clone());
            }
        }
        for (pool, members) in &raw.members {
            if !known_pool(pool) {
                out.members.insert(pool.clone(), members.clone());
            }
        }
        out
    }

    /// Stops every change (and the applying of the fleet's) for a binary upgrade's
    /// handover, once the change in progress, if any, is done: the new process reads
    /// the state after this.
    pub async fn freeze_for_handover(&self) {
        let _done = self.state.lock().await;
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// The handover failed: changes are taken again, and the fleet's state, which was
    /// not applied meanwhile, is read again.
    pub fn thaw(self: &Arc<Self>) {
        self.frozen.store(false, Ordering::SeqCst);
        let Some(cluster) = self.cluster.get().cloned() else {
            return;
        };
        let control = Arc::clone(self);
        tokio::spawn(async move {
            if let Ok(Some((state, generation))) = cluster.read().await {
                control.apply_remote(state, generation, false).await;
            }
        });
    }

    /// This process leaves the fleet (handed over, or shutting down).
    pub async fn leave_cluster(&self) {
        if let Some(cluster) = self.cluster.get() {
            cluster.retire().await;
        }
    }

    /// The generation a change based on `current` records in its history before the
    /// write: the next one in a single instance; filled in after the write in a fleet.
    pub(super) fn next_generation(&self, current: &TrafficState) -> u64 {
        if self.cluster.get().is_some() {
            crate::cluster::UNKNOWN_GENERATION
        } else {
            current.generation.saturating_add(1)
        }
    }
}
