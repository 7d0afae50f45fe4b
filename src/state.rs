//! The traffic state that survives restarts: each service's active pool, canary and
//! history, the backends taken out of rotation, and the generation counter. The config
//! gives the topology; this file gives what the admin API changed since.
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory) before any
//! change is acknowledged. Read at start and reconciled with the config: entries that
//! no longer fit are dropped with a warning; an unreadable file is moved aside.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::AdminState;
use crate::config::{BackendConfig, Config, PoolConfig};

/// History entries kept per service.
pub const HISTORY_LIMIT: usize = 20;

pub type ServiceMap = imbl::OrdMap<String, Arc<ServiceTraffic>>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficState {
    pub generation: u64,
    /// Persistent (structurally shared): a change copies one path of the tree, so the
    /// copy every commit makes, and comparing it with the old one, stay cheap at
    /// thousands of services.
    #[serde(default)]
    pub services: ServiceMap,
    /// pool -> backend address -> state, for backends that are not `active`.
    #[serde(default)]
    pub backends: BTreeMap<String, BTreeMap<String, BackendMode>>,
    /// pool -> its backends, for pools whose membership was changed at runtime; the
    /// config's list otherwise.
    #[serde(default)]
    pub members: BTreeMap<String, Vec<MemberSpec>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// `IP:port`, or `host:port` resolved as the pool's configured names are.
    pub addr: String,
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 1000)]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceTraffic {
    pub active: String,
    #[serde(default)]
    pub previous_active: Option<String>,
    /// Boxed: most services have none, and inline it would add 144 bytes to every
    /// service's entry.
    #[serde(default)]
    pub canary: Option<Box<CanarySpec>>,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// The last rollout (live or ended, so its verdict can still be read). Absent from
    /// the file until a rollout is started, so older binaries read the file still.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Box<crate::rollout::Rollout>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorSpec>,
}

/// Copies of a share of a service's requests, sent to another pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    pub pool: String,
    /// Basis points of the service's requests: 10% = 1000.
    pub percent_bp: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySpec {
    pub pool: String,
    /// Basis points: 10% = 1000.
    pub weight_bp: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<MatchSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<MatchSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    pub generation: u64,
    /// RFC 3339, UTC.
    pub at: String,
    pub kind: String,
    pub active: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_pool: Option<String>,
    /// Percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<f64>,
    /// For a rollout's changes: why it moved, with the numbers of a failed window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendMode {
    Draining,
    Disabled,
}

impl BackendMode {
    pub fn admin_state(self) -> AdminState {
        match self {
            BackendMode::Draining => AdminState::Draining,
            BackendMode::Disabled => AdminState::Disabled,
        }
    }
}

/// 100%, in basis points: the most a canary weight or a mirror share can be.
const FULL_BP: u32 = 10_000;

/// Whether `(pool, addr)` is one of the addresses the pool's host names resolve to.
pub type ResolvedTo<'a> = dyn Fn(&str, &str) -> bool + 'a;

impl TrafficState {
    /// The state a config alone implies: every service on its configured pool.
    pub fn from_config(config: &Config) -> TrafficState {
        TrafficState {
            generation: 0,
            services: config
                .services
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        ServiceTraffic {
                            active: s.active.clone(),
                            previous_active: None,
                            canary: None,
                            history: Vec::new(),
                            rollout: None,
                            mirror: None,
                        },
                    )
                })
                .collect(),
            backends: BTreeMap::new(),
            members: BTreeMap::new(),
        }
    }

    /// `name`'s traffic, to change: copied first if another state shares it.
    pub fn service_mut(&mut self, name: &str) -> Option<&mut ServiceTraffic> {
        self.services.get_mut(name).map(Arc::make_mut)
    }

    /// Gives `generation` to the history entries still marked 0: a fleet write learns
    /// its generation (the etcd revision) only once it is made. Touches only the
    /// services that have such entries, so the shared map is not copied.
    pub fn fill_unknown_history_generations(&mut self, generation: u64) {
        let pending: Vec<String> = self
            .services
            .iter()
            .filter(|(_, t)| t.history.iter().any(|e| e.generation == 0))
            .map(|(name, _)| name.clone())
            .collect();
        for name in pending {
            if let Some(traffic) = self.service_mut(&name) {
                for entry in traffic.history.iter_mut().filter(|e| e.generation == 0) {
                    entry.generation = generation;
                }
            }
        }
    }

    /// The backends of `pool`: the runtime membership if it was changed, else the
    /// config's.
    pub fn members_of(&self, pool: &PoolConfig) -> Vec<BackendConfig> {
        match self.members.get(&pool.name) {
            Some(members) => members
                .iter()
                .filter_map(|m| {
                    Some(BackendConfig {
                        addr: m.addr.parse().ok()?,
                        weight: m.weight,
                    })
                })
                .collect(),
            None => pool.backends.clone(),
        }
    }

    /// Keeps what still fits `config`; returns a warning for everything dropped. Every
    /// configured service ends up with an entry.
    ///
    /// `resolved` tells whether an address is one a pool's host names resolve to now.
    /// `None` when that is not known (at start, before the first lookup; a state from
    /// the fleet, whose instances look names up at their own times): then a drain or
    /// disable saved for an address in a pool that has host names is kept, since the
    /// address may well be one of them.
    pub fn reconcile(
        mut self,
        config: &Config,
        resolved: Option<&ResolvedTo<'_>>,
    ) -> (TrafficState, Vec<String>) {
        let mut warnings = Vec::new();
        let pools: std::collections::HashSet<&str> =
            config.pools.iter().map(|p| p.name.as_str()).collect();
        let pool_exists = |name: &str| pools.contains(name);
        let mut services = ServiceMap::new();
        for service in &config.services {
            let Some(mut saved) = self.services.remove(&service.name) else {
                services.insert(
                    service.name.clone(),
                    Arc::new(TrafficState::from_config_service(&service.active)),
                );
                continue;
            };
            if !pool_exists(&saved.active) {
                warnings.push(format!(
                    "service `{}`: saved active pool `{}` is not in the config; using `{}`",
                    service.name, saved.active, service.active
                ));
                let saved = Arc::make_mut(&mut saved);
                saved.active = service.active.clone();
                saved.canary = None;
            }
            if let Some(canary) = &saved.canary {
                if !pool_exists(&canary.pool) || canary.pool == saved.active {
                    warnings.push(format!(
                        "service `{}`: saved canary pool `{}` no longer fits the config; canary dropped",
                        service.name, canary.pool
                    ));
                    Arc::make_mut(&mut saved).canary = None;
                } else if canary.weight_bp > FULL_BP {
                    warnings.push(format!(
                        "service `{}`: saved canary weight {}% is over 100%; canary dropped",
                        service.name,
                        f64::from(canary.weight_bp) / 100.0
                    ));
                    Arc::make_mut(&mut saved).canary = None;
                }
            }
            if let Some(fault) = saved.rollout.as_ref().and_then(|r| r.check_saved().err()) {
                warnings.push(format!(
                    "service `{}`: the saved rollout is not valid ({fault}); it is dropped, and its canary with it",
                    service.name
                ));
                let saved = Arc::make_mut(&mut saved);
                if let Some(rollout) = saved.rollout.take() {
                    let its_canary = saved
                        .canary
                        .as_ref()
                        .is_some_and(|c| c.pool == rollout.pool);
                    if rollout.status.is_live() && its_canary {
                        saved.canary = None;
                    }
                }
            }
            if let Some(rollout) = &saved.rollout {
                if rollout.status.is_live()
                    && (!pool_exists(&rollout.pool) || rollout.pool == saved.active)
                {
                    warnings.push(format!(
                        "service `{}`: the rollout to pool `{}` no longer fits the config; it is aborted",
                        service.name, rollout.pool
                    ));
                    let saved = Arc::make_mut(&mut saved);
                    if let Some(rollout) = saved.rollout.as_mut() {
                        rollout.end(
                            crate::rollout::RolloutStatus::Aborted,
                            "its pool no longer fits the config".into(),
                            now_rfc3339(),
                        );
                    }
                }
            }
            if let Some(mirror) = &saved.mirror {
                if !pool_exists(&mirror.pool) {
                    warnings.push(format!(
                        "service `{}`: mirror pool `{}` is not in the config; mirroring stopped",
                        service.name, mirror.pool
                    ));
                    Arc::make_mut(&mut saved).mirror = None;
                } else if !(1..=FULL_BP).contains(&mirror.percent_bp) {
                    warnings.push(format!(
                        "service `{}`: saved mirror share {}% is not above 0% and at most 100%; mirroring stopped",
                        service.name,
                        f64::from(mirror.percent_bp) / 100.0
                    ));
                    Arc::make_mut(&mut saved).mirror = None;
                }
            }
            if saved
                .previous_active
                .as_deref()
                .is_some_and(|p| !pool_exists(p))
            {
                Arc::make_mut(&mut saved).previous_active = None;
            }
            services.insert(service.name.clone(), saved);
        }
        for name in self.services.keys() {
            warnings.push(format!(
                "service `{name}` is not in the config; its saved state is dropped"
            ));
        }
        self.services = services;

        let mut members = BTreeMap::new();
        for (pool, list) in std::mem::take(&mut self.members) {
            if !pool_exists(&pool) {
                warnings.push(format!(
                    "pool `{pool}` is not in the config; its saved backend list is dropped"
                ));
                continue;
            }
            let mut seen = std::collections::HashSet::new();
            let valid = !list.is_empty()
                && list.len() <= config.proxy.max_backends_per_pool
                && list.iter().all(|m| {
                    m.addr
                        .parse::<std::net::SocketAddr>()
                        .is_ok_and(|addr| seen.insert(addr))
                        && (1..=1000).contains(&m.weight)
                });
            if valid {
                members.insert(pool, list);
            } else {
                warnings.push(format!(
                    "pool `{pool}`: saved backend list is invalid (empty, over max_backends_per_pool, an address twice, or a bad address or weight); using the config's"
                ));
            }
        }
        self.members = members;

        let mut backends = BTreeMap::new();
        for (pool, entries) in std::mem::take(&mut self.backends) {
            let Some(configured) = config.pools.iter().find(|p| p.name == pool) else {
                warnings.push(format!(
                    "pool `{pool}` is not in the config; its saved backend states are dropped"
                ));
                continue;
            };
            // Checked against the runtime membership when there is one, so a backend
            // added through the API keeps its drain across a restart.
            let current = self.members_of(configured);
            let named = !configured.named.is_empty() && !self.members.contains_key(&pool);
            let in_pool = |addr: &str| {
                current.iter().any(|b| b.addr.to_string() == addr)
                    || (named && resolved.is_none_or(|resolved| resolved(&pool, addr)))
            };
            let mut kept = BTreeMap::new();
            for (addr, mode) in entries {
                if in_pool(&addr) {
                    kept.insert(addr, mode);
                } else {
                    warnings.push(format!(
                        "backend `{addr}` is not in pool `{pool}` any more; its saved state ({mode:?}) is dropped"
                    ));
                }
            }
            if !kept.is_empty() {
                backends.insert(pool, kept);
            }
        }
        self.backends = backends;
        (self, warnings)
    }

    fn from_config_service(active: &str) -> ServiceTraffic {
        ServiceTraffic {
            active: active.to_string(),
            previous_active: None,
            canary: None,
            history: Vec::new(),
            rollout: None,
            mirror: None,
        }
    }

    pub fn backend_mode(&self, pool: &str, addr: &str) -> Option<BackendMode> {
        self.backends.get(pool)?.get(addr).copied()
    }
}

impl ServiceTraffic {
    pub fn record(&mut self, generation: u64, kind: &str) {
        self.history.push(HistoryEntry {
            generation,
            at: now_rfc3339(),
            kind: kind.to_string(),
            active: self.active.clone(),
            canary_pool: self.canary.as_ref().map(|c| c.pool.clone()),
            canary_weight: self.canary.as_ref().map(|c| f64::from(c.weight_bp) / 100.0),
            reason: kind
                .starts_with("rollout_")
                .then(|| self.rollout.as_ref().and_then(|r| r.reason.clone()))
                .flatten(),
        });
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write the state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot read the state file {path}: {source} (fix it or remove it; it is not overwritten)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A state file that could not be parsed, and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CorruptFile {
    pub error: String,
    /// Where the file was moved; `None` if it could not be moved.
    #[schema(value_type = Option<String>)]
    pub moved_to: Option<PathBuf>,
    /// The generation the state restarted from, above any the file can have had.
    pub restarted_at_generation: u64,
}

/// What `load` found.
#[derive(Debug)]
pub struct Loaded {
    pub state: TrafficState,
    /// What was dropped because it no longer fits the config.
    pub warnings: Vec<String>,
    pub corrupt: Option<CorruptFile>,
}

/// Loads the state file for `config`. A missing file gives the config's state; a
/// corrupt one is moved aside to `<path>.corrupt-<unix time>` and the config's state is
/// used, with a generation that no earlier state can have had, so an `If-Match` from
/// before can never match. A file that exists but cannot be read (permissions, I/O
/// error) is an error: starting would overwrite what may be a good state.
pub fn load(path: &Path, config: &Config) -> Result<Loaded, StateError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded {
                state: TrafficState::from_config(config),
                warnings: vec![],
                corrupt: None,
            })
        }
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    match serde_json::from_slice::<TrafficState>(&text) {
        Ok(saved) => {
            let (state, warnings) = saved.reconcile(config, None);
            Ok(Loaded {
                state,
                warnings,
                corrupt: None,
            })
        }
        Err(e) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let aside = PathBuf::from(format!("{}.corrupt-{}", path.display(), now.as_secs()));
            let moved_to = std::fs::rename(path, &aside).ok().map(|()| aside);
            let mut state = TrafficState::from_config(config);
            state.generation = generation_after_corruption(&text, now);
            let corrupt = CorruptFile {
                error: e.to_string(),
                moved_to,
                restarted_at_generation: state.generation,
            };
            Ok(Loaded {
                state,
                warnings: vec![],
                corrupt: Some(corrupt),
            })
        }
    }
}

/// A generation above any the corrupt file can have had: one past what can still be
/// read of its `"generation"` field, and never below the current Unix time in
/// milliseconds. Generations count changes from 0, so no file reaches that figure
/// without a thousand changes a second since the last corruption.
fn generation_after_corruption(text: &[u8], now: Duration) -> u64 {
    let salvaged = salvage_generation(text).map_or(0, |g| g.saturating_add(1));
    salvaged.max(now.as_millis() as u64)
}

/// The number after the first `"generation":` in a damaged file, if it is readable.
fn salvage_generation(text: &[u8]) -> Option<u64> {
    let key = b"\"generation\"";
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &text[at..];
    let rest = &rest[rest
        .iter()
        .position(|b| !b.is_ascii_whitespace() && *b != b':')?..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Writes `state` durably: a temporary file beside the target, fsync, rename over the
/// target, fsync of the directory. Blocking: call it off the async workers.
///
/// A failure before the rename leaves the target as it was, and no temporary file.
/// The directory is opened first, so one that cannot be opened for its fsync fails the
/// save before anything changed, not after the rename replaced the file.
pub fn save(path: &Path, state: &TrafficState) -> Result<(), StateError> {
    let wrap = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut json = serde_json::to_vec_pretty(state).map_err(|e| wrap(std::io::Error::other(e)))?;
    json.push(b'\n');
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let dir = std::fs::File::open(dir).map_err(wrap)?;
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let written = std::fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(wrap(e));
    }
    dir.sync_all().map_err(wrap)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            "[pools.blue]\nbackends=[\"127.0.0.1:1\"]\n[pools.green]\nbackends=[\"127.0.0.1:2\"]\n[services.app]\nactive=\"blue\"\n",
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn a_save_that_fails_leaves_the_target_as_it_was_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: the rename over it fails.
        let path = dir.path().join("state.json");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("kept"), "x").unwrap();
        let error = save(&path, &TrafficState::from_config(&config())).unwrap_err();
        assert!(error.to_string().contains("state.json"), "{error}");
        assert!(path.join("kept").exists());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        // And a directory that cannot be opened fails before anything is written.
        let missing = dir.path().join("no-such-dir").join("state.json");
        assert!(save(&missing, &TrafficState::from_config(&config())).is_err());
        assert!(!dir.path().join("no-such-dir").exists());
    }

    #[test]
    fn saved_values_the_api_would_refuse_are_dropped_with_a_warning() {
        for (case, fault) in [
            (0, "canary weight 500%"),
            (1, "mirror share 0%"),
            (2, "backend list is invalid"),
        ] {
            let mut state = TrafficState::from_config(&config());
            let app = state.service_mut("app").unwrap();
            match case {
                0 => {
                    app.canary = Some(Box::new(CanarySpec {
                        pool: "green".into(),
                        weight_bp: 50_000,
                        header: None,
                        cookie: None,
                        sticky: None,
                    }))
                }
                1 => {
                    app.mirror = Some(MirrorSpec {
                        pool: "green".into(),
                        percent_bp: 0,
                    })
                }
                _ => {
                    let twice = MemberSpec {
                        addr: "127.0.0.1:7".into(),
                        weight: 1,
                    };
                    state
                        .members
                        .insert("blue".into(), vec![twice.clone(), twice]);
                }
            }
            let (kept, warnings) = state.reconcile(&config(), None);
            assert_eq!(kept, TrafficState::from_config(&config()), "{fault}");
            assert!(
                warnings.iter().any(|w| w.contains(fault)),
                "{fault}: {warnings:?}"
            );
        }
    }

    #[test]
    fn a_missing_file_gives_the_configs_state() {
        let dir = tempfile::tempdir().unwrap();
        let Loaded {
            state, warnings, ..
        } = load(&dir.path().join("none.json"), &config()).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(state.services["app"].active, "blue");
        assert_eq!(state.generation, 0);
    }

    #[test]
    fn saved_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut state = TrafficState::from_config(&config());
        state.generation = 7;
        let app = state.service_mut("app").unwrap();
        app.active = "green".into();
        app.previous_active = Some("blue".into());
        app.record(7, "switch");
        state
            .backends
            .entry("blue".into())
            .or_default()
            .insert("127.0.0.1:1".into(), BackendMode::Draining);
        save(&path, &state).unwrap();
        let loaded = load(&path, &config()).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.state, state);
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn entries_that_no_longer_fit_the_config_are_dropped_with_warnings() {
        let mut state = TrafficState::from_config(&config());
        state.service_mut("app").unwrap().active = "purple".into();
        state.services.insert(
            "gone".into(),
            Arc::new(ServiceTraffic {
                active: "blue".into(),
                previous_active: None,
                canary: None,
                history: vec![],
                rollout: None,
                mirror: None,
            }),
        );
        state
            .backends
            .entry("blue".into())
            .or_default()
            .insert("127.0.0.1:99".into(), BackendMode::Disabled);
        let (state, warnings) = state.reconcile(&config(), None);
        assert_eq!(state.services["app"].active, "blue");
        assert!(!state.services.contains_key("gone"));
        assert!(state.backends.is_empty());
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("purple")));
        assert!(warnings.iter().any(|w| w.contains("gone")));
        assert!(warnings.iter().any(|w| w.contains("127.0.0.1:99")));
    }

    #[test]
    fn a_saved_rollout_that_does_not_check_is_dropped_with_its_canary() {
        let request = crate::rollout::RolloutRequest {
            pool: "green".into(),
            steps: vec![crate::rollout::StepSpec::Weight(50.0)],
            ..Default::default()
        };
        let good = crate::rollout::Rollout::from_request(&request, 0, "t".into()).unwrap();
        let mut no_steps = good.clone();
        no_steps.steps.clear();
        let mut past_the_end = good.clone();
        past_the_end.step = 3;
        for (bad, fault) in [
            (no_steps, "at least one weight"),
            (past_the_end, "step 4 of 1"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.json");
            let mut state = TrafficState::from_config(&config());
            let app = state.service_mut("app").unwrap();
            app.canary = Some(Box::new(CanarySpec {
                pool: "green".into(),
                weight_bp: 5000,
                header: None,
                cookie: None,
                sticky: None,
            }));
            app.rollout = Some(Box::new(bad));
            save(&path, &state).unwrap();
            let loaded = load(&path, &config()).unwrap();
            let app = &loaded.state.services["app"];
            assert!(app.rollout.is_none() && app.canary.is_none());
            assert!(
                loaded.warnings.iter().any(|w| w.contains(fault)),
                "{:?}",
                loaded.warnings
            );
        }
    }

    #[test]
    fn a_runtime_added_backend_keeps_its_drain_across_a_restart() {
        let mut state = TrafficState::from_config(&config());
        state.members.insert(
            "blue".into(),
            vec![
                MemberSpec {
                    addr: "127.0.0.1:1".into(),
                    weight: 1,
                },
                MemberSpec {
                    addr: "127.0.0.1:7".into(),
                    weight: 2,
                },
            ],
        );
        state
            .backends
            .entry("blue".into())
            .or_default()
            .insert("127.0.0.1:7".into(), BackendMode::Draining);
        let (state, warnings) = state.reconcile(&config(), None);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            state.backend_mode("blue", "127.0.0.1:7"),
            Some(BackendMode::Draining)
        );
        assert_eq!(state.members["blue"].len(), 2);
    }

    #[test]
    fn a_saved_mode_in_a_pool_with_host_names_is_kept_until_its_address_is_known_gone() {
        let config = Config::parse(
            "[pools.blue]\nbackends=[\"127.0.0.1:1\", \"app-blue:8080\"]\n[services.app]\nactive=\"blue\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let mut state = TrafficState::from_config(&config);
        let modes = state.backends.entry("blue".into()).or_default();
        modes.insert("127.0.0.5:8080".into(), BackendMode::Draining);
        modes.insert("127.0.0.6:8080".into(), BackendMode::Disabled);
        let (kept, warnings) = state.clone().reconcile(&config, None);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(kept, state, "names not looked up yet: nothing dropped");
        let resolved = |pool: &str, addr: &str| pool == "blue" && addr == "127.0.0.5:8080";
        let (now, warnings) = state.reconcile(&config, Some(&resolved));
        assert_eq!(
            now.backend_mode("blue", "127.0.0.5:8080"),
            Some(BackendMode::Draining)
        );
        assert_eq!(now.backend_mode("blue", "127.0.0.6:8080"), None);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("127.0.0.6:8080"), "{warnings:?}");
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_its_generation_never_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let huge = u64::MAX / 4;
        std::fs::write(&path, format!("{{\n  \"generation\": {huge},\n  \"servi")).unwrap();
        let loaded = load(&path, &config()).unwrap();
        assert_eq!(loaded.state.services["app"].active, "blue");
        let corrupt = loaded.corrupt.expect("reported as corrupt");
        assert_eq!(loaded.state.generation, huge + 1, "past the salvaged one");
        assert_eq!(corrupt.restarted_at_generation, huge + 1);
        assert!(!path.exists());
        let aside = corrupt.moved_to.expect("moved aside");
        assert!(aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("state.json.corrupt-"));
        assert!(aside.exists());

        std::fs::write(&path, b"{ not json").unwrap();
        let loaded = load(&path, &config()).unwrap();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let generation = loaded.state.generation;
        assert!(
            generation > 1_700_000_000_000 && generation <= now_ms,
            "nothing to salvage: the Unix time in ms, got {generation}"
        );
    }

    #[test]
    fn an_unreadable_file_is_an_error_and_stays() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: unreadable as a file, even for root.
        let path = dir.path().join("state.json");
        std::fs::create_dir(&path).unwrap();
        let error = load(&path, &config()).unwrap_err();
        assert!(matches!(error, StateError::Read { .. }), "{error}");
        assert!(error.to_string().contains("state.json"), "{error}");
        assert!(path.is_dir());
    }

    #[test]
    fn generations_are_salvaged_from_damaged_text() {
        assert_eq!(salvage_generation(b"{\"generation\": 42, \"x"), Some(42));
        assert_eq!(salvage_generation(b"{\"generation\":7}"), Some(7));
        assert_eq!(salvage_generation(b"{\"generation\": \"x\"}"), None);
        assert_eq!(salvage_generation(b"garbage"), None);
    }

    #[test]
    fn history_is_capped() {
        let mut s = TrafficState::from_config(&config())
            .services
            .remove("app")
            .map(Arc::unwrap_or_clone)
            .unwrap();
        for g in 0..50 {
            s.record(g, "switch");
        }
        assert_eq!(s.history.len(), HISTORY_LIMIT);
        assert_eq!(s.history.last().unwrap().generation, 49);
    }
}
