//! Backends written as host names: resolved at start, at each reload and every pool's
//! `dns_refresh`; each address a name resolves to is a backend (the same object while
//! the address stays). A lookup that fails keeps the last good addresses, is logged and
//! counted; a name that never resolved shows in the pool's view with its error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use super::Control;
use crate::config::{Config, NamedBackend};
use crate::resolve::Resolver;
use crate::routing::{ResolvedBackend, ResolvedPools};

/// What is known of one name of one pool.
#[derive(Debug, Clone, Default)]
pub(super) struct NameState {
    addrs: Vec<SocketAddr>,
    error: Option<String>,
    resolved_at: Option<String>,
}

/// Every pool's names, by pool and name.
pub(super) type NameTable = HashMap<(String, NamedBackend), NameState>;

/// A name as the state view shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct NameView {
    pub name: String,
    pub addresses: Vec<String>,
    /// Why the last lookup failed; `null` after a good one.
    pub error: Option<String>,
    /// RFC 3339, of the last good lookup; `null` if it never resolved.
    pub resolved_at: Option<String>,
}

/// Looks up every name of `config`, starting from `known` (whose addresses stay for a
/// name whose lookup fails). Names no longer in the config are left out.
pub(super) async fn resolve_all(
    config: &Config,
    known: &NameTable,
    metrics: &crate::metrics::Metrics,
) -> NameTable {
    let resolver = Resolver::new(config.proxy.hosts_file.clone());
    let mut lookups = tokio::task::JoinSet::new();
    for pool in &config.pools {
        for named in &pool.named {
            let key = (pool.name.clone(), named.clone());
            let resolver = resolver.clone();
            lookups.spawn(async move {
                let result = resolver.lookup(&key.1.host, key.1.port).await;
                (key, result)
            });
        }
    }
    let mut table = NameTable::new();
    while let Some(done) = lookups.join_next().await {
        let Ok(((pool, named), result)) = done else {
            continue;
        };
        let mut state = known
            .get(&(pool.clone(), named.clone()))
            .cloned()
            .unwrap_or_default();
        match result {
            Ok(addrs) => {
                if addrs != state.addrs {
                    tracing::info!(%pool, name = %named.target(), addresses = ?addrs, "backend name resolved");
                }
                state.addrs = addrs;
                state.error = None;
                state.resolved_at = Some(crate::state::now_rfc3339());
            }
            Err(e) => {
                metrics.dns_failures.with_label_values(&[&pool]).inc();
                tracing::warn!(
                    %pool,
                    name = %named.target(),
                    kept = ?state.addrs,
                    "backend name lookup failed, the last good addresses stay: {e}"
                );
                state.error = Some(e);
            }
        }
        table.insert((pool, named), state);
    }
    table
}

/// The backends `names` gives each pool, in the config's order of names.
pub(super) fn resolved_pools(config: &Config, names: &NameTable) -> ResolvedPools {
    let mut pools = ResolvedPools::new();
    for pool in &config.pools {
        let mut backends = Vec::new();
        for named in &pool.named {
            let Some(state) = names.get(&(pool.name.clone(), named.clone())) else {
                continue;
            };
            let host: Arc<str> = Arc::from(named.host.as_str());
            for addr in &state.addrs {
                backends.push(ResolvedBackend {
                    addr: *addr,
                    weight: named.weight,
                    host: Arc::clone(&host),
                });
            }
        }
        if !pool.named.is_empty() {
            pools.insert(pool.name.clone(), backends);
        }
    }
    pools
}

impl Control {
    /// Resolves every name again and, if an address changed, rebuilds the table.
    pub async fn refresh_names(&self) {
        let config = self.config.load_full();
        if config.pools.iter().all(|p| p.named.is_empty()) {
            return;
        }
        let known = self.names_known();
        let names = resolve_all(&config, &known, &self.metrics).await;
        // Under the writer lock, so a change and a refresh never build from each
        // other's stale inputs; not refused while frozen (DNS is not an admin change).
        let state = self.state.lock().await;
        if !Arc::ptr_eq(&config, &self.config.load()) {
            // A reload replaced the config meanwhile and resolved its own names.
            return;
        }
        let resolved = resolved_pools(&config, &names);
        self.set_names(names);
        if *self.resolved.load_full() == resolved {
            return;
        }
        self.resolved.store(Arc::new(resolved));
        let table = self.build_table(&state).await;
        self.table.store(table);
        self.sync_health_checks();
    }

    /// Starts one refresh task per pool `dns_refresh` (stopping those of a previous
    /// config); they end when the control plane is dropped.
    pub fn start_name_refresh(self: &Arc<Self>) {
        let config = self.config.load_full();
        let Ok(mut tasks) = self.name_tasks.lock() else {
            return;
        };
        for task in tasks.drain(..) {
            task.abort();
        }
        let mut intervals: Vec<std::time::Duration> = config
            .pools
            .iter()
            .filter(|p| !p.named.is_empty())
            .map(|p| p.dns_refresh)
            .collect();
        intervals.sort();
        intervals.dedup();
        for interval in intervals {
            let control: Weak<Control> = Arc::downgrade(self);
            tasks.push(
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(interval).await;
                        let Some(control) = control.upgrade() else {
                            return;
                        };
                        control.refresh_names().await;
                    }
                })
                .abort_handle(),
            );
        }
    }

    pub(super) fn names_known(&self) -> NameTable {
        self.names.lock().map(|n| n.clone()).unwrap_or_default()
    }

    pub(super) fn set_names(&self, names: NameTable) {
        if let Ok(mut current) = self.names.lock() {
            *current = names;
        }
    }

    /// The names of `pool`, for its view.
    pub(super) fn name_views(&self, pool: &str) -> Vec<NameView> {
        let config = self.config.load();
        let names = self.names_known();
        let Some(configured) = config.pools.iter().find(|p| p.name == pool) else {
            return Vec::new();
        };
        configured
            .named
            .iter()
            .map(|named| {
                let state = names
                    .get(&(pool.to_string(), named.clone()))
                    .cloned()
                    .unwrap_or_else(|| NameState {
                        error: Some("not looked up yet".into()),
                        ..NameState::default()
                    });
                NameView {
                    name: named.target(),
                    addresses: state.addrs.iter().map(ToString::to_string).collect(),
                    error: state.error,
                    resolved_at: state.resolved_at,
                }
            })
            .collect()
    }
}
