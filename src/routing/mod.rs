//! The routing table: one immutable snapshot of services and pools, swapped whole behind
//! an `ArcSwap`. A request loads it once; a change builds a new table and stores it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::backend::{AdminState, Backend};
use crate::client::{Upstream, Upstreams};
use crate::config::{
    Balance, Config, HealthConfig, PanicMode, PassiveConfig, PoolConfig, ServiceConfig,
};
use crate::metrics::{Metrics, RouteMetrics};
use crate::split::{self, Reason, Split, StickyKey};
use crate::state::{CanarySpec, TrafficState};

mod matcher;

use matcher::RouteIndex;

pub struct RoutingTable {
    pub services: Vec<Service>,
    pub pools: Vec<Arc<Pool>>,
    /// Finds a request's service among `services` (see `route`).
    index: RouteIndex,
    /// Positions in `pools` and `services`, by name.
    pools_by_name: HashMap<Arc<str>, usize>,
    services_by_name: HashMap<Arc<str>, usize>,
    /// True when every pool has the same backend objects and settings as the table it
    /// was built from: no health-check task needs starting or stopping.
    pub same_backends: bool,
}

pub struct Service {
    pub name: Arc<str>,
    pub active: Arc<Pool>,
    /// Boxed, as `preview` is: most services of a large table have neither, and a
    /// `Service` is kept for each.
    pub canary: Option<Box<Canary>>,
    /// Metric children for (service, active pool); `None` with metrics off.
    pub metrics: Option<Arc<RouteMetrics>>,
    pub preview: Option<Box<Preview>>,
    pub mirror: Option<Box<MirrorRoute>>,
}

/// The service's preview route: a request whose `header` names one of the pools goes
/// there, whatever the split. The header is not forwarded.
pub struct Preview {
    pub header: HeaderName,
    pub pools: Vec<PreviewPool>,
}

pub struct PreviewPool {
    pub pool: Arc<Pool>,
    pub metrics: Option<Arc<RouteMetrics>>,
    /// `switchyard_preview_requests_total{service, pool}`, resolved at build.
    pub counter: Option<prometheus::IntCounter>,
}

/// A service's mirror in the routing table.
pub struct MirrorRoute {
    pub pool: Arc<Pool>,
    /// Basis points of the service's requests.
    pub share_bp: u32,
    /// (service, mirror pool): mirrored answers count like any other, so a pool can be
    /// judged on copies before it gets a user.
    pub metrics: Option<Arc<RouteMetrics>>,
    pub counters: Option<Arc<crate::metrics::MirrorCounters>>,
}

pub struct Canary {
    pub pool: Arc<Pool>,
    pub split: Split,
    pub metrics: Option<Arc<RouteMetrics>>,
}

/// Where one request goes: the pool, why, and the metric children to record on.
pub struct Choice<'a> {
    pub pool: &'a Arc<Pool>,
    pub reason: Reason,
    pub metrics: Option<&'a Arc<RouteMetrics>>,
}

impl Service {
    /// The pool for this request: the one its preview header names, else the canary's
    /// when its split says so, else the active.
    pub fn choose(&self, headers: &HeaderMap) -> Choice<'_> {
        if let Some(preview) = &self.preview {
            let named = headers.get(&preview.header).and_then(|value| {
                preview
                    .pools
                    .iter()
                    .find(|p| p.pool.name.as_bytes() == value.as_bytes())
            });
            if let Some(entry) = named {
                if let Some(counter) = &entry.counter {
                    counter.inc();
                }
                return Choice {
                    pool: &entry.pool,
                    reason: Reason::Preview,
                    metrics: entry.metrics.as_ref(),
                };
            }
        }
        let active = |reason| Choice {
            pool: &self.active,
            reason,
            metrics: self.metrics.as_ref(),
        };
        match &self.canary {
            None => active(Reason::Active),
            Some(canary) => match canary.split.to_canary(headers) {
                (true, reason) => Choice {
                    pool: &canary.pool,
                    reason,
                    metrics: canary.metrics.as_ref(),
                },
                (false, reason) => active(reason),
            },
        }
    }
}

/// Turns a saved or requested canary into the request path's form, checking every part.
pub fn canary_split(spec: &CanarySpec) -> Result<Split, String> {
    if spec.weight_bp > split::FULL_WEIGHT {
        return Err(format!(
            "weight must be between 0 and 100, got {}",
            f64::from(spec.weight_bp) / 100.0
        ));
    }
    let header = match &spec.header {
        None => None,
        Some(m) => Some((
            HeaderName::from_bytes(m.name.as_bytes())
                .map_err(|_| format!("header name `{}` is not a valid HTTP header name", m.name))?,
            HeaderValue::from_str(&m.value).map_err(|_| {
                format!(
                    "header value `{}` is not a valid HTTP header value",
                    m.value
                )
            })?,
        )),
    };
    let cookie = match &spec.cookie {
        None => None,
        Some(m)
            if split::is_cookie_token(&m.name)
                && !m.value.is_empty()
                && split::is_cookie_value(&m.value) =>
        {
            Some((m.name.as_str().into(), m.value.as_str().into()))
        }
        Some(m) => {
            return Err(format!(
                "cookie `{}={}` is not a valid cookie name and value",
                m.name, m.value
            ))
        }
    };
    let sticky = spec.sticky.as_deref().map(StickyKey::parse).transpose()?;
    Ok(Split {
        weight: spec.weight_bp,
        header,
        cookie,
        sticky,
    })
}

pub struct Pool {
    pub name: Arc<str>,
    pub backends: Vec<Arc<Backend>>,
    pub balance: Balance,
    pub settings: Arc<PoolSettings>,
    /// Running sum of weights, for weighted random draws.
    pub(crate) cumulative_weight: Vec<u64>,
    pub(crate) rr_cycle: WeightedCycle,
    pub(crate) rr_next: AtomicUsize,
}

/// A pool's settings from its config, shared by every table built from it.
#[derive(Debug, Default)]
pub struct PoolSettings {
    behaviour: Arc<PoolBehaviour>,
    /// Held while one request decides on a passive ejection. Here, not in `Pool`, so
    /// it is the same flag in every table built from these settings.
    ejecting: AtomicBool,
}

/// What a pool does: one value shared by all the pools configured alike, which at
/// thousands of pools is nearly all of them.
#[derive(Debug, Clone)]
pub struct PoolBehaviour {
    pub balance: Balance,
    pub health: HealthConfig,
    pub passive: PassiveConfig,
    pub panic_mode: PanicMode,
    pub slow_start: Option<Duration>,
    pub upstream: Upstream,
}

impl PartialEq for PoolBehaviour {
    fn eq(&self, other: &Self) -> bool {
        self.balance == other.balance
            && self.health == other.health
            && self.passive == other.passive
            && self.panic_mode == other.panic_mode
            && self.slow_start == other.slow_start
            && self.upstream.protocol == other.upstream.protocol
            // A TLS client is made per pool, from its files: only the same one is equal.
            && match (&self.upstream.tls, &other.upstream.tls) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl std::ops::Deref for PoolSettings {
    type Target = PoolBehaviour;

    fn deref(&self) -> &PoolBehaviour {
        &self.behaviour
    }
}

/// Each pool's settings, by pool name: made at start and at each reload, and shared by
/// every table built in between.
pub type PoolSettingsMap = HashMap<String, Arc<PoolSettings>>;

/// An address a backend host name resolved to: a backend of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedBackend {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The name it came from (`app-blue`): TLS sends and verifies it.
    pub host: Arc<str>,
}

/// Each pool's resolved backends, by pool name (pools without names are absent).
pub type ResolvedPools = HashMap<String, Vec<ResolvedBackend>>;

/// The right to decide one passive ejection in a pool; given back when dropped.
pub struct EjectionTurn<'a>(&'a AtomicBool);

impl Drop for EjectionTurn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl PoolSettings {
    pub fn new(behaviour: Arc<PoolBehaviour>) -> PoolSettings {
        PoolSettings {
            behaviour,
            ejecting: AtomicBool::new(false),
        }
    }

    pub fn from_config(pool: &PoolConfig, upstream: Upstream) -> PoolSettings {
        PoolSettings::new(Arc::new(PoolBehaviour::from_config(pool, upstream)))
    }

    /// Each pool's settings from `config`, with its `Upstream` from `upstreams` (a
    /// pool missing there gets plain HTTP/1.1). Pools configured like the one before
    /// them (as generated configs list them) share its behaviour.
    pub fn for_config(config: &Config, upstreams: &Upstreams) -> PoolSettingsMap {
        let mut last: Option<Arc<PoolBehaviour>> = None;
        config
            .pools
            .iter()
            .map(|pool| {
                let upstream = upstreams.get(&pool.name).cloned().unwrap_or_default();
                let behaviour = PoolBehaviour::from_config(pool, upstream);
                let behaviour = match last.take() {
                    Some(shared) if *shared == behaviour => shared,
                    _ => Arc::new(behaviour),
                };
                last = Some(Arc::clone(&behaviour));
                (pool.name.clone(), Arc::new(PoolSettings::new(behaviour)))
            })
            .collect()
    }

    /// `None` while another request is deciding (it never waits).
    pub fn ejection_turn(&self) -> Option<EjectionTurn<'_>> {
        self.ejecting
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| EjectionTurn(&self.ejecting))
    }
}

impl PoolBehaviour {
    pub fn from_config(pool: &PoolConfig, upstream: Upstream) -> PoolBehaviour {
        PoolBehaviour {
            balance: pool.balance,
            health: pool.health.clone(),
            passive: pool.passive.clone(),
            panic_mode: pool.panic_mode,
            slow_start: pool.slow_start,
            upstream,
        }
    }
}

impl Default for PoolBehaviour {
    fn default() -> Self {
        PoolBehaviour {
            balance: Balance::P2c,
            health: HealthConfig::tcp_default(),
            passive: PassiveConfig {
                consecutive_failures: 5,
                ejection_time: Duration::from_secs(30),
                max_ejection_percent: 50,
            },
            panic_mode: PanicMode::FailOpen,
            slow_start: None,
            upstream: Upstream::default(),
        }
    }
}

impl Pool {
    pub fn new(
        name: impl Into<Arc<str>>,
        backends: Vec<Arc<Backend>>,
        settings: Arc<PoolSettings>,
    ) -> Pool {
        let balance = settings.balance;
        let mut total = 0u64;
        let cumulative_weight = backends
            .iter()
            .map(|b| {
                total += u64::from(b.weight());
                total
            })
            .collect();
        let rr_cycle = if balance == Balance::RoundRobin {
            WeightedCycle::new(&backends.iter().map(|b| b.weight()).collect::<Vec<_>>())
        } else {
            WeightedCycle::default()
        };
        Pool {
            name: name.into(),
            backends,
            balance,
            cumulative_weight,
            rr_cycle,
            rr_next: AtomicUsize::new(0),
            settings,
        }
    }

    pub fn total_weight(&self) -> u64 {
        self.cumulative_weight.last().copied().unwrap_or(0)
    }

    pub fn has_available_backend(&self) -> bool {
        self.backends.iter().any(|b| b.is_available())
    }
}

/// One weighted round-robin cycle, described rather than listed: interleaved weighted
/// round robin (as LVS does it), where round `r` visits, in order of weight, every
/// backend whose weight is above `r`. So a backend of weight `w` gets `w` turns a
/// cycle, equal weights take strict turns, and building costs O(n log n + max weight)
/// whatever the total weight; finding a turn is a binary search over the rounds.
/// Weights are divided by their common divisor first to keep the cycle short.
#[derive(Debug, Default)]
pub(crate) struct WeightedCycle {
    /// Backend indices, heaviest first (ties in index order): round `r` is a prefix.
    by_weight: Vec<u32>,
    /// Turns in rounds `0..=r`, for each round `r`.
    round_ends: Vec<u64>,
}

impl WeightedCycle {
    fn new(weights: &[u32]) -> WeightedCycle {
        let divisor = weights.iter().copied().fold(0, gcd).max(1);
        let reduced: Vec<u32> = weights.iter().map(|w| w / divisor).collect();
        let mut by_weight: Vec<u32> = (0..weights.len() as u32).collect();
        by_weight.sort_by_key(|&i| std::cmp::Reverse(reduced[i as usize]));
        let rounds = reduced.iter().copied().max().unwrap_or(0);
        let mut round_ends = Vec::with_capacity(rounds as usize);
        // Backends whose weight is above the round, walked down from the lightest.
        let mut in_round = by_weight.len();
        let mut total = 0u64;
        for round in 0..rounds {
            while in_round > 0 && reduced[by_weight[in_round - 1] as usize] <= round {
                in_round -= 1;
            }
            total += in_round as u64;
            round_ends.push(total);
        }
        WeightedCycle {
            by_weight,
            round_ends,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.round_ends.last().copied().unwrap_or(0)
    }

    /// The backend whose turn is `position` (taken modulo the cycle's length).
    pub(crate) fn turn(&self, position: u64) -> Option<usize> {
        let len = self.len();
        if len == 0 {
            return None;
        }
        let position = position % len;
        let round = self.round_ends.partition_point(|&end| end <= position);
        let round_start = round.checked_sub(1).map_or(0, |r| self.round_ends[r]);
        let index = self.by_weight.get((position - round_start) as usize)?;
        Some(*index as usize)
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Makes each (service, pool) pair's metric children, or hands back the previous
/// table's when they still fit: the children each made on first use then carry over,
/// and a rebuild at thousands of services does not touch the registry.
struct RouteMetricsCache<'a> {
    metrics: &'a Metrics,
    previous: HashMap<(&'a str, &'a str), &'a Arc<RouteMetrics>>,
}

impl<'a> RouteMetricsCache<'a> {
    fn new(metrics: &'a Metrics, previous: Option<&'a RoutingTable>) -> Self {
        let mut cache = HashMap::new();
        for service in previous.into_iter().flat_map(|t| &t.services) {
            let routes = std::iter::once((&service.active, service.metrics.as_ref()))
                .chain(service.canary.iter().map(|c| (&c.pool, c.metrics.as_ref())))
                .chain(
                    service
                        .preview
                        .iter()
                        .flat_map(|p| &p.pools)
                        .map(|p| (&p.pool, p.metrics.as_ref())),
                );
            for (pool, metrics) in routes {
                if let Some(metrics) = metrics {
                    cache.insert((&*service.name, &*pool.name), metrics);
                }
            }
        }
        RouteMetricsCache {
            metrics,
            previous: cache,
        }
    }

    fn route(&self, service: &Arc<str>, pool: &Pool) -> Arc<RouteMetrics> {
        let names = || pool.backends.iter().map(|b| &b.name);
        match self.previous.get(&(&**service, &*pool.name)) {
            Some(kept) if kept.fits(service, &pool.name, names()) => Arc::clone(kept),
            _ => self.metrics.route(service, &pool.name, names()),
        }
    }
}

impl RoutingTable {
    /// Builds a table from `config` and the traffic `state` (active pools, canaries,
    /// backend modes), reusing the backend objects of `previous` where the pool and
    /// address match, so counters and idle connections survive the swap. Backends' admin
    /// states are set from `state`. A saved canary that does not validate is left out.
    /// `settings` holds each pool's behaviour (see `PoolSettings::for_config`), `names`
    /// the addresses its host names resolved to (used unless the admin API set the
    /// pool's membership).
    pub fn build(
        config: &Config,
        settings: &PoolSettingsMap,
        names: &ResolvedPools,
        state: &TrafficState,
        previous: Option<&RoutingTable>,
        metrics: Option<&Metrics>,
    ) -> RoutingTable {
        let mut existing: HashMap<(&str, SocketAddr), &Arc<Backend>> = HashMap::new();
        if let Some(previous) = previous {
            for pool in &previous.pools {
                for backend in &pool.backends {
                    existing.insert((&pool.name, backend.addr), backend);
                }
            }
        }
        // Names are kept from the previous table: the metric children it hands on hold
        // them too, and 10,000 services should not keep two copies of each.
        let mut previous_names: HashMap<&str, &Arc<str>> = HashMap::new();
        for previous in previous.into_iter() {
            previous_names.extend(previous.pools.iter().map(|p| (&*p.name, &p.name)));
            previous_names.extend(previous.services.iter().map(|s| (&*s.name, &s.name)));
        }
        let name_of = |name: &str| -> Arc<str> {
            previous_names
                .get(name)
                .map_or_else(|| name.into(), |&kept| Arc::clone(kept))
        };
        let registry = metrics;
        let metrics = metrics.map(|m| RouteMetricsCache::new(m, previous));
        let idle_timeout: Duration = config.proxy.upstream_idle_timeout;
        let pools: Vec<Arc<Pool>> = config
            .pools
            .iter()
            .map(|pool| {
                let runtime_membership = state.members.contains_key(&pool.name);
                let mut members: Vec<(SocketAddr, u32, Option<&Arc<str>>)> = state
                    .members_of(pool)
                    .iter()
                    .map(|b| (b.addr, b.weight, None))
                    .collect();
                if !runtime_membership {
                    for named in names.get(&pool.name).into_iter().flatten() {
                        if !members.iter().any(|(addr, _, _)| *addr == named.addr) {
                            members.push((named.addr, named.weight, Some(&named.host)));
                        }
                    }
                }
                let backends = members
                    .into_iter()
                    .map(|(addr, weight, host)| {
                        let backend = match existing.get(&(pool.name.as_str(), addr)) {
                            Some(found) => {
                                found.set_weight(weight);
                                Arc::clone(found)
                            }
                            None => Arc::new(
                                Backend::new(addr, weight, idle_timeout).with_host(host.cloned()),
                            ),
                        };
                        let mode = state.backend_mode(&pool.name, &backend.name);
                        backend
                            .set_admin_state(mode.map_or(AdminState::Active, |m| m.admin_state()));
                        backend
                    })
                    .collect();
                let settings = settings.get(&pool.name).cloned().unwrap_or_else(|| {
                    Arc::new(PoolSettings::from_config(pool, Upstream::default()))
                });
                Arc::new(Pool::new(name_of(&pool.name), backends, settings))
            })
            .collect();
        let pools_by_name: HashMap<Arc<str>, usize> = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (Arc::clone(&p.name), i))
            .collect();
        let find_pool = |name: &str| pools_by_name.get(name).map(|&i| &pools[i]);
        let (services, configured): (Vec<Service>, Vec<&ServiceConfig>) = config
            .services
            .iter()
            .filter_map(|s| {
                let name = name_of(&s.name);
                let traffic = state.services.get(&s.name);
                let active_name = traffic.map_or(s.active.as_str(), |t| t.active.as_str());
                let active = find_pool(active_name)?;
                let canary = traffic.and_then(|t| t.canary.as_ref()).and_then(|spec| {
                    let pool = find_pool(&spec.pool)?;
                    let split = canary_split(spec).ok()?;
                    Some(Box::new(Canary {
                        pool: Arc::clone(pool),
                        split,
                        metrics: metrics.as_ref().map(|m| m.route(&name, pool)),
                    }))
                });
                let preview = s.preview.as_ref().and_then(|p| {
                    Some(Box::new(Preview {
                        header: HeaderName::from_bytes(p.header.as_bytes()).ok()?,
                        pools: p
                            .pools
                            .iter()
                            .filter_map(|name| find_pool(name))
                            .map(|pool| PreviewPool {
                                pool: Arc::clone(pool),
                                metrics: metrics.as_ref().map(|m| m.route(&name, pool)),
                                counter: registry.map(|m| {
                                    m.preview_requests
                                        .with_label_values(&[s.name.as_str(), &*pool.name])
                                }),
                            })
                            .collect(),
                    }))
                });
                let mirror = traffic.and_then(|t| t.mirror.as_ref()).and_then(|spec| {
                    let pool = find_pool(&spec.pool).filter(|p| !Arc::ptr_eq(p, active))?;
                    Some(Box::new(MirrorRoute {
                        pool: Arc::clone(pool),
                        share_bp: spec.percent_bp,
                        metrics: metrics.as_ref().map(|m| m.route(&name, pool)),
                        counters: registry
                            .map(|m| Arc::new(m.mirror_counters(&s.name, &pool.name))),
                    }))
                });
                let route_metrics = metrics.as_ref().map(|m| m.route(&name, active));
                let service = Service {
                    name,
                    active: Arc::clone(active),
                    canary,
                    metrics: route_metrics,
                    preview,
                    mirror,
                };
                Some((service, s))
            })
            .unzip();
        // Hosts and prefixes are read from the config: the index is all that routing
        // needs of them, so the table keeps no copy.
        let index = RouteIndex::new(
            configured
                .iter()
                .map(|s| (s.hosts.as_slice(), s.path_prefix.as_str())),
        );
        let services_by_name = services
            .iter()
            .enumerate()
            .map(|(i, s)| (Arc::clone(&s.name), i))
            .collect();
        let same_backends = previous.is_some_and(|previous| {
            previous.pools.len() == pools.len()
                && previous.pools.iter().zip(&pools).all(|(old, new)| {
                    Arc::ptr_eq(&old.settings, &new.settings)
                        && old.backends.len() == new.backends.len()
                        && old
                            .backends
                            .iter()
                            .zip(&new.backends)
                            .all(|(a, b)| Arc::ptr_eq(a, b))
                })
        });
        RoutingTable {
            same_backends,
            services,
            pools,
            index,
            pools_by_name,
            services_by_name,
        }
    }

    /// The service for a request: the most specific host match first, then the longest
    /// path prefix. `host` has no port and may be empty (no Host header).
    pub fn route(&self, host: &str, path: &str) -> Option<&Service> {
        let position = self.index.find(host, path)?;
        self.services.get(position as usize)
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools_by_name.get(name).map(|&i| &self.pools[i])
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services_by_name.get(name).map(|&i| &self.services[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(src: &str) -> RoutingTable {
        let config = Config::parse(src, Path::new("t.toml")).unwrap();
        RoutingTable::build(
            &config,
            &PoolSettings::for_config(&config, &Upstreams::new()),
            &ResolvedPools::new(),
            &TrafficState::from_config(&config),
            None,
            None,
        )
    }

    const TWO_SERVICES: &str = r#"
[pools.web]
backends = ["127.0.0.1:1"]
[pools.api]
backends = ["127.0.0.1:2"]
[pools.shop]
backends = ["127.0.0.1:3"]
[services.web]
active = "web"
[services.api]
path_prefix = "/api"
active = "api"
[services.shop]
hosts = ["shop.example.com"]
active = "shop"
"#;

    #[test]
    fn longest_path_prefix_wins() {
        let t = table(TWO_SERVICES);
        assert_eq!(&*t.route("x", "/api/v1").unwrap().name, "api");
        assert_eq!(&*t.route("x", "/").unwrap().name, "web");
        assert_eq!(&*t.route("x", "/ap").unwrap().name, "web");
    }

    #[test]
    fn an_exact_host_beats_any_host_even_with_a_shorter_prefix() {
        let t = table(TWO_SERVICES);
        assert_eq!(
            &*t.route("shop.example.com", "/api/x").unwrap().name,
            "shop"
        );
        assert_eq!(&*t.route("SHOP.example.com", "/").unwrap().name, "shop");
    }

    #[test]
    fn no_matching_service_gives_none() {
        let t = table(
            "[pools.p]\nbackends=[\"127.0.0.1:1\"]\n[services.s]\nhosts=[\"a.com\"]\nactive=\"p\"\n",
        );
        assert!(t.route("b.com", "/").is_none());
        assert!(t.route("a.com", "/").is_some());
    }

    #[test]
    fn rebuilding_keeps_backend_objects() {
        let config = Config::parse(TWO_SERVICES, Path::new("t.toml")).unwrap();
        let state = TrafficState::from_config(&config);
        let settings = PoolSettings::for_config(&config, &Upstreams::new());
        let first = RoutingTable::build(
            &config,
            &settings,
            &ResolvedPools::new(),
            &state,
            None,
            None,
        );
        let second = RoutingTable::build(
            &config,
            &PoolSettings::for_config(&config, &Upstreams::new()),
            &ResolvedPools::new(),
            &state,
            Some(&first),
            None,
        );
        assert!(Arc::ptr_eq(
            &first.pools[0].backends[0],
            &second.pools[0].backends[0]
        ));
    }

    #[test]
    fn a_rebuild_says_whether_its_backends_and_settings_are_those_of_the_last() {
        let config = Config::parse(TWO_SERVICES, Path::new("t.toml")).unwrap();
        let state = TrafficState::from_config(&config);
        let settings = PoolSettings::for_config(&config, &Upstreams::new());
        let names = ResolvedPools::new();
        let first = RoutingTable::build(&config, &settings, &names, &state, None, None);
        assert!(!first.same_backends, "nothing to compare with");
        let second = RoutingTable::build(&config, &settings, &names, &state, Some(&first), None);
        assert!(second.same_backends);
        let reloaded = PoolSettings::for_config(&config, &Upstreams::new());
        let third = RoutingTable::build(&config, &reloaded, &names, &state, Some(&second), None);
        assert!(!third.same_backends, "new settings restart the checks");
    }

    #[test]
    fn a_rebuild_keeps_a_routes_metric_children_while_its_backends_stay() {
        let metrics = Metrics::new(Arc::new(crate::metrics::LiveState::default));
        let config = Config::parse(TWO_SERVICES, Path::new("t.toml")).unwrap();
        let state = TrafficState::from_config(&config);
        let settings = PoolSettings::for_config(&config, &Upstreams::new());
        let names = ResolvedPools::new();
        let build = |config: &Config, previous| {
            RoutingTable::build(config, &settings, &names, &state, previous, Some(&metrics))
        };
        let first = build(&config, None);
        let second = build(&config, Some(&first));
        let children =
            |t: &RoutingTable, s: &str| Arc::clone(t.service(s).unwrap().metrics.as_ref().unwrap());
        assert!(Arc::ptr_eq(
            &children(&first, "api"),
            &children(&second, "api")
        ));
        let moved = TWO_SERVICES.replace("127.0.0.1:2", "127.0.0.1:4");
        let moved = Config::parse(&moved, Path::new("t.toml")).unwrap();
        let third = build(&moved, Some(&second));
        assert!(
            !Arc::ptr_eq(&children(&second, "api"), &children(&third, "api")),
            "new backends, new children"
        );
        assert!(Arc::ptr_eq(
            &children(&second, "web"),
            &children(&third, "web")
        ));
    }

    fn whole_cycle(weights: &[u32]) -> Vec<usize> {
        let cycle = WeightedCycle::new(weights);
        (0..cycle.len()).map(|p| cycle.turn(p).unwrap()).collect()
    }

    #[test]
    fn a_cycle_gives_each_backend_its_weight_in_turns() {
        assert_eq!(whole_cycle(&[5, 1, 1]), vec![0, 1, 2, 0, 0, 0, 0]);
        assert_eq!(whole_cycle(&[1, 3, 2]), vec![1, 2, 0, 1, 2, 1]);
        assert_eq!(whole_cycle(&[2, 2]), vec![0, 1], "common divisor taken out");
        assert_eq!(
            whole_cycle(&[1, 1, 1]),
            vec![0, 1, 2],
            "equal weights take turns"
        );
        assert!(WeightedCycle::new(&[]).turn(0).is_none());
        let cycle = WeightedCycle::new(&[1, 3, 2]);
        assert_eq!(cycle.turn(6), cycle.turn(0), "positions wrap around");
    }

    #[test]
    fn a_cycle_of_a_thousand_heavy_backends_is_built_without_listing_it() {
        let weights: Vec<u32> = (1..=1000).collect();
        let cycle = WeightedCycle::new(&weights);
        assert_eq!(cycle.len(), 1000 * 1001 / 2);
        let mut turns = vec![0u64; weights.len()];
        for position in 0..cycle.len() {
            turns[cycle.turn(position).unwrap()] += 1;
        }
        for (index, weight) in weights.iter().enumerate() {
            assert_eq!(turns[index], u64::from(*weight));
        }
    }
}
