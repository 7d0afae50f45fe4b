//! A backend's shared state. Routing tables point at these objects, so a table swap keeps
//! in-flight counts, health and the upstream connection pool; the request path only
//! touches atomics here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::ConnPool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    Active = 0,
    Draining = 1,
    Disabled = 2,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }
}

/// The limits on waiting for a backend, named by their config keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTimeout {
    /// No response head in time once the request was sent.
    Header = 0,
    /// Stuck in the middle of a body: no more of the response came, or the backend took
    /// no more of the request.
    Body = 1,
}

impl UpstreamTimeout {
    pub const ALL: [UpstreamTimeout; 2] = [UpstreamTimeout::Header, UpstreamTimeout::Body];

    pub fn key(self) -> &'static str {
        match self {
            UpstreamTimeout::Header => "upstream_header_timeout",
            UpstreamTimeout::Body => "upstream_body_timeout",
        }
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    /// `addr` as text, made once so logs and the admin API never format it again.
    pub name: Arc<str>,
    /// The host name `addr` was resolved from, as the TLS name to send and verify
    /// (when the pool names none). Boxed: most backends are addresses, not names.
    tls_name: Option<Box<rustls::pki_types::ServerName<'static>>>,
    /// Relative share within the pool (1-1000); changed in place when the membership
    /// API changes it, so in-flight counts survive.
    weight: AtomicU32,
    in_flight: AtomicU64,
    health: AtomicU8,
    admin: AtomicU8,
    pub conns: ConnPool,
    /// Milliseconds since `epoch` of the last upstream-failure warning, for rate limiting.
    last_warning_ms: AtomicU64,
    suppressed_warnings: AtomicU64,
    /// Failures of real traffic in a row (connect failures, 5xx), for passive ejection.
    consecutive_failures: AtomicU32,
    /// Until when (ms since `epoch`) a passive ejection holds; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// When (ms since `epoch`) the backend last became healthy, for slow start.
    healthy_since_ms: AtomicU64,
    /// Active checks run, and the last one's result.
    checks: AtomicU64,
    /// Of `checks`, those that failed: `switchyard_health_checks_total` is read from
    /// these at scrape time, not kept in per-backend metric children.
    failed_checks: AtomicU64,
    last_check_ok: std::sync::atomic::AtomicBool,
    /// Requests this backend kept waiting past a timeout, by `UpstreamTimeout`: read at
    /// scrape time for `switchyard_upstream_timeouts_total`.
    timeouts: [AtomicU64; 2],
    /// Why the last active check failed; empty while it passes.
    last_check_error: arc_swap::ArcSwapOption<String>,
}

/// The instant every backend's millisecond clock counts from: one per process, not a
/// copy in each backend.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32, idle_timeout: Duration) -> Backend {
        Backend {
            addr,
            name: addr.to_string().into(),
            tls_name: None,
            weight: AtomicU32::new(weight),
            in_flight: AtomicU64::new(0),
            health: AtomicU8::new(Health::Unknown as u8),
            admin: AtomicU8::new(AdminState::Active as u8),
            conns: ConnPool::new(idle_timeout),
            last_warning_ms: AtomicU64::new(0),
            suppressed_warnings: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            healthy_since_ms: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            failed_checks: AtomicU64::new(0),
            timeouts: [AtomicU64::new(0), AtomicU64::new(0)],
            last_check_ok: std::sync::atomic::AtomicBool::new(false),
            last_check_error: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// The same backend, known to come from the host name `host`.
    pub fn with_host(mut self, host: Option<Arc<str>>) -> Backend {
        self.tls_name = host
            .as_deref()
            .and_then(|h| rustls::pki_types::ServerName::try_from(h.to_string()).ok())
            .map(Box::new);
        self
    }

    /// The host name this backend was resolved from, as the TLS name to send and
    /// verify (when the pool names none).
    pub fn tls_name(&self) -> Option<&rustls::pki_types::ServerName<'static>> {
        self.tls_name.as_deref()
    }

    /// One active health check ran, with this result (the reason it failed, if it did).
    pub fn record_check(&self, outcome: Result<(), &str>) {
        match outcome {
            Ok(()) => self.last_check_error.store(None),
            // A backend that stays down fails the same way every interval: keep the text.
            Err(reason)
                if self.last_check_error().as_deref().map(String::as_str) != Some(reason) =>
            {
                self.last_check_error
                    .store(Some(Arc::new(reason.to_string())))
            }
            Err(_) => {}
        }
        self.last_check_ok.store(outcome.is_ok(), Ordering::Relaxed);
        if outcome.is_err() {
            self.failed_checks.fetch_add(1, Ordering::Relaxed);
        }
        self.checks.fetch_add(1, Ordering::Release);
    }

    /// Active checks so far: (passed, failed).
    pub fn check_counts(&self) -> (u64, u64) {
        // `checks` is bumped last, so reading it first never shows more failures than
        // checks.
        let checks = self.checks.load(Ordering::Acquire);
        let failed = self.failed_checks.load(Ordering::Relaxed).min(checks);
        (checks - failed, failed)
    }

    pub fn last_check_error(&self) -> Option<Arc<String>> {
        self.last_check_error.load_full()
    }

    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Acquire)
    }

    pub fn last_check_ok(&self) -> bool {
        self.last_check_ok.load(Ordering::Relaxed)
    }

    /// A request gave up on this backend after `which`.
    pub fn count_timeout(&self, which: UpstreamTimeout) {
        self.timeouts[which as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests given up on this backend, by timeout, in `UpstreamTimeout::ALL` order.
    pub fn timeout_counts(&self) -> [u64; 2] {
        [
            self.timeouts[0].load(Ordering::Relaxed),
            self.timeouts[1].load(Ordering::Relaxed),
        ]
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    /// Sets the health; returns the previous value.
    pub fn set_health(&self, health: Health) -> Health {
        if health == Health::Healthy {
            self.healthy_since_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
        match self.health.swap(health as u8, Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    /// Milliseconds since the first backend was made; never 0.
    pub fn now_ms(&self) -> u64 {
        epoch().elapsed().as_millis() as u64 + 1
    }

    /// A request on this backend succeeded: the failure streak ends. Reads before it
    /// writes, so the common case does not dirty a shared cache line.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request on this backend failed; returns the length of the failure streak.
    pub fn record_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Takes the backend out for `duration` from now (passive ejection). Kept apart from
    /// `health`, which only the active checks write, so neither overwrites the other.
    pub fn eject_for(&self, duration: Duration) {
        let until = self.now_ms() + duration.as_millis() as u64;
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Is a passive ejection still holding the backend out? Reads no clock for a
    /// backend that was never ejected, or whose ejection has been seen to end.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.now_ms() < until {
            return true;
        }
        // Over: later reads take the fast path (unless a new ejection came meanwhile),
        // and the backend ramps up again under slow start, as after any time out.
        if self
            .ejected_until_ms
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.healthy_since_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
        false
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    /// Slow start: the share of its weight a backend gets, from 0.1 right after it
    /// became healthy (or was enabled) up to 1 once `ramp` has passed, linearly, as AWS
    /// target groups ramp. Always 1 without a ramp.
    pub fn ramp_fraction(&self, ramp: Option<Duration>) -> f64 {
        let Some(ramp) = ramp else {
            return 1.0;
        };
        let since = self.healthy_since_ms.load(Ordering::Relaxed);
        let ramp_ms = ramp.as_millis().max(1) as u64;
        let elapsed = self.now_ms().saturating_sub(since);
        if since == 0 || elapsed >= ramp_ms {
            return 1.0;
        }
        0.1 + 0.9 * (elapsed as f64 / ramp_ms as f64)
    }

    /// Weight times the slow-start fraction.
    pub fn effective_weight(&self, ramp: Option<Duration>) -> f64 {
        f64::from(self.weight()) * self.ramp_fraction(ramp)
    }

    pub fn admin_state(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            1 => AdminState::Draining,
            2 => AdminState::Disabled,
            _ => AdminState::Active,
        }
    }

    pub fn set_admin_state(&self, state: AdminState) {
        let previous = self.admin.swap(state as u8, Ordering::SeqCst);
        if state == AdminState::Active
            && previous != AdminState::Active as u8
            && self.health() == Health::Healthy
        {
            // Back in rotation after a drain: slow start ramps it up again.
            self.healthy_since_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// May this backend take a new request? Health not yet known counts as usable, so a
    /// proxy without health checks still serves.
    pub fn is_available(&self) -> bool {
        self.is_in_rotation()
            && self.health.load(Ordering::Relaxed) != Health::Unhealthy as u8
            && !self.is_ejected()
    }

    /// Neither draining nor disabled.
    pub fn is_in_rotation(&self) -> bool {
        self.admin.load(Ordering::Relaxed) == AdminState::Active as u8
    }

    /// Counts a request as in flight on this backend, if it is still in rotation once
    /// counted. Counting first, then reading the admin state (both sequentially
    /// consistent, as are the drain's store and `in_flight`'s load) means a drain
    /// either sees this request in flight or this request sees the drain: a
    /// `wait-drained` that saw 0 can never be followed by a request sent here.
    pub fn track_if_in_rotation(self: &Arc<Self>) -> Option<InFlight> {
        let guard = self.track();
        (self.admin.load(Ordering::SeqCst) == AdminState::Active as u8).then_some(guard)
    }

    /// Counts a request (or an upgraded tunnel) as in flight until the guard is dropped.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            backend: Arc::clone(self),
        }
    }

    /// Logs an upstream failure at most once a second per backend, so a dead backend
    /// under load cannot flood the log; the next line says how many were held back.
    pub fn warn_rate_limited(&self, what: &str, error: &dyn std::fmt::Display) {
        let now = self.now_ms();
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 1000 {
            self.suppressed_warnings.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self
            .last_warning_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed_warnings.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed_warnings.swap(0, Ordering::Relaxed);
        tracing::warn!(backend = %self.name, suppressed, "{what}: {error}");
    }
}

/// Decrements the backend's in-flight count when dropped.
pub struct InFlight {
    backend: Arc<Backend>,
}

impl InFlight {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_follows_guards() {
        let b = Arc::new(Backend::new(
            "127.0.0.1:1".parse().unwrap(),
            1,
            Duration::from_secs(1),
        ));
        let g1 = b.track();
        let g2 = b.track();
        assert_eq!(b.in_flight(), 2);
        drop(g1);
        assert_eq!(b.in_flight(), 1);
        drop(g2);
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn slow_start_ramps_from_a_tenth_to_the_full_weight() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), 1, Duration::from_secs(1));
        let ramp = Some(Duration::from_secs(30));
        assert_eq!(b.ramp_fraction(ramp), 1.0, "never became healthy: full");
        b.set_health(Health::Healthy);
        let f = b.ramp_fraction(ramp);
        assert!((0.1..0.15).contains(&f), "{f}");
        assert_eq!(b.ramp_fraction(None), 1.0);
        b.set_admin_state(AdminState::Draining);
        b.set_admin_state(AdminState::Active);
        assert!(b.ramp_fraction(ramp) < 0.15, "enable restarts the ramp");
    }

    #[test]
    fn a_failure_streak_counts_and_success_resets_it() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), 1, Duration::from_secs(1));
        assert_eq!(b.record_failure(), 1);
        assert_eq!(b.record_failure(), 2);
        b.record_success();
        assert_eq!(b.record_failure(), 1);
        b.set_health(Health::Healthy);
        b.eject_for(Duration::from_secs(60));
        assert!(b.is_ejected());
        assert_eq!(b.health(), Health::Healthy, "the checks' view is kept");
        assert!(!b.is_available());
        b.set_health(Health::Healthy);
        assert!(b.is_ejected(), "a passing check does not end an ejection");
        b.eject_for(Duration::ZERO);
        assert!(!b.is_ejected());
        assert!(b.is_available());
        let ramp = Some(Duration::from_secs(30));
        assert!(
            b.ramp_fraction(ramp) < 0.15,
            "back from ejection: slow start again"
        );
    }

    #[test]
    fn a_drained_backend_refuses_to_count_a_new_request() {
        let b = Arc::new(Backend::new(
            "127.0.0.1:1".parse().unwrap(),
            1,
            Duration::from_secs(1),
        ));
        assert!(b.track_if_in_rotation().is_some());
        assert_eq!(b.in_flight(), 0, "the guard was dropped");
        b.set_admin_state(AdminState::Draining);
        assert!(b.track_if_in_rotation().is_none());
        assert_eq!(b.in_flight(), 0, "nothing left counted");
    }

    #[test]
    fn availability_needs_active_and_not_unhealthy() {
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), 1, Duration::from_secs(1));
        assert!(b.is_available(), "unknown health is usable");
        b.set_health(Health::Unhealthy);
        assert!(!b.is_available());
        b.set_health(Health::Healthy);
        b.set_admin_state(AdminState::Draining);
        assert!(!b.is_available());
        b.set_admin_state(AdminState::Active);
        assert!(b.is_available());
    }
}
