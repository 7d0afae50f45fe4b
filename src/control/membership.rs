//! Runtime membership: a pool's backends changed through the admin API. Joiners are in
//! rotation at once; leavers drain first and are removed once nothing is in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{Control, ControlError, PoolView};
use crate::backend::Backend;
use crate::state::{BackendMode, MemberSpec};

impl Control {
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
        self.configured_pool(pool)?;
        // Refused before any lock, so a bad list is answered as such whatever the state.
        let members = self.checked_members(pool, members)?;
        self.change_members(pool, drain_timeout, if_match, |_| Ok(members))
            .await
    }

    /// The list `members` as a pool's backends: not empty, within the size limit,
    /// socket addresses (written canonically) with weights 1-1000, none twice.
    fn checked_members(
        &self,
        pool: &str,
        members: Vec<MemberSpec>,
    ) -> Result<Vec<MemberSpec>, ControlError> {
        if members.is_empty() {
            return Err(ControlError::BadRequest(
                "a pool needs at least one backend".into(),
            ));
        }
        let limit = self.config.load().proxy.max_backends_per_pool;
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
        Ok(normalized)
    }

    /// Replaces the backends of `pool` with what `edit` makes of them. `edit` sees the
    /// backends under the writer lock, so two calls that each add (or remove) one
    /// cannot both start from the same list and undo each other's change.
    async fn change_members(
        &self,
        pool: &str,
        drain_timeout: Duration,
        if_match: Option<u64>,
        edit: impl FnOnce(Vec<MemberSpec>) -> Result<Vec<MemberSpec>, ControlError>,
    ) -> Result<PoolView, ControlError> {
        let configured = self.configured_pool(pool)?;
        // Phase 1: the new list joins; leavers stay, draining.
        let leaving: Vec<String> = {
            let mut state = self.lock_current(if_match).await?;
            let listed = edit(self.members_in(&state, &configured))?;
            let normalized = self.checked_members(pool, listed)?;
            let current = state.members_of(&configured);
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
        let mut state = self.writable().await?;
        let mut next = state.clone();
        let current = next.members_of(&configured);
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
        self.configured_pool(pool)?;
        let addr: Option<SocketAddr> = member.addr.parse().ok();
        self.change_members(pool, Duration::ZERO, if_match, |mut list| {
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
            Ok(list)
        })
        .await
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
        self.change_members(pool, drain_timeout, if_match, |list| {
            let list: Vec<MemberSpec> = list
                .into_iter()
                .filter(|m| m.addr.parse::<SocketAddr>().ok() != Some(backend.addr))
                .collect();
            if list.is_empty() {
                return Err(ControlError::Conflict(format!(
                    "`{addr}` is the last backend of pool `{pool}`; a pool needs at least one"
                )));
            }
            Ok(list)
        })
        .await
    }

    fn configured_pool(&self, pool: &str) -> Result<crate::config::PoolConfig, ControlError> {
        self.config
            .load()
            .pools
            .iter()
            .find(|p| p.name == pool)
            .cloned()
            .ok_or_else(|| ControlError::UnknownPool(pool.to_string()))
    }

    /// The pool's backends in `state`: the runtime membership, else the config's
    /// addresses and what its host names resolved to.
    fn members_in(
        &self,
        state: &crate::state::TrafficState,
        configured: &crate::config::PoolConfig,
    ) -> Vec<MemberSpec> {
        let mut members: Vec<MemberSpec> = state
            .members_of(configured)
            .into_iter()
            .map(|b| MemberSpec {
                addr: b.addr.to_string(),
                weight: b.weight,
            })
            .collect();
        if !state.members.contains_key(&configured.name) {
            for named in self
                .resolved
                .load()
                .get(&configured.name)
                .into_iter()
                .flatten()
            {
                let addr = named.addr.to_string();
                if !members.iter().any(|m| m.addr == addr) {
                    members.push(MemberSpec {
                        addr,
                        weight: named.weight,
                    });
                }
            }
        }
        members
    }
}
