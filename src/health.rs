//! Backend health: active checks (scheduled in `schedule`), passive ejection from real
//! traffic, and the pure consecutive-counter state machine both rely on.

mod schedule;
pub use schedule::{CheckScheduler, CheckTarget};

use std::time::Duration;

use tokio::net::TcpStream;

use crate::backend::{Backend, Health};
use crate::body::RequestBody;
use crate::client::{self, Upstream};
use crate::config::HealthConfig;
use crate::random;
use crate::routing::Pool;

/// Consecutive successes and failures, and the health they add up to. The first result
/// decides straight away (a proxy that just started should not wait `threshold`
/// intervals to serve); after that a flip needs `healthy_threshold` successes or
/// `unhealthy_threshold` failures in a row.
#[derive(Debug, Clone)]
pub struct HealthCounter {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    successes: u32,
    failures: u32,
    state: Health,
}

impl HealthCounter {
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> HealthCounter {
        HealthCounter {
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
            successes: 0,
            failures: 0,
            state: Health::Unknown,
        }
    }

    /// Starts from `current` instead of unknown.
    pub fn resuming(mut self, current: Health) -> HealthCounter {
        self.state = current;
        self
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Records one result; returns the new health when it changed.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let next = match (self.state, ok) {
            (Health::Unknown, true) => Health::Healthy,
            (Health::Unknown, false) => Health::Unhealthy,
            (Health::Unhealthy, true) if self.successes >= self.healthy_threshold => {
                Health::Healthy
            }
            (Health::Healthy, false) if self.failures >= self.unhealthy_threshold => {
                Health::Unhealthy
            }
            (state, _) => state,
        };
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }
}

/// The active checks' verdict changed. Passive ejection is kept apart (see
/// `Backend::eject_for`): a passing check neither ends an ejection nor is hidden by one.
fn apply_transition(pool: &str, backend: &Backend, next: Health, outcome: &Result<(), String>) {
    match next {
        Health::Healthy => {
            let previous = backend.set_health(Health::Healthy);
            tracing::info!(%pool, backend = %backend.name, ?previous, "backend healthy");
        }
        Health::Unhealthy => {
            let previous = backend.set_health(Health::Unhealthy);
            let reason = outcome.as_ref().err().map_or("", String::as_str);
            tracing::warn!(%pool, backend = %backend.name, ?previous, reason, "backend unhealthy");
        }
        Health::Unknown => {}
    }
}

fn jittered(base: Duration, jitter: Duration) -> Duration {
    let span = jitter.as_millis() as u64;
    if span == 0 {
        return base;
    }
    let offset = random::below(2 * span + 1);
    (base + Duration::from_millis(offset)).saturating_sub(jitter)
}

/// One check, bounded by `timeout`: a TCP connect, or an HTTP GET whose status must
/// be expected (any 2xx by default). The error says why it failed.
pub async fn check_once(
    backend: &Backend,
    config: &HealthConfig,
    upstream: &Upstream,
) -> Result<(), String> {
    let check = async {
        let Some(http) = &config.http else {
            TcpStream::connect(backend.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            return Ok(());
        };
        // Boxed: an HTTP check (a TLS handshake inside) is kilobytes of future, which a
        // TCP check, the default, would otherwise carry too, for every check under way.
        Box::pin(http_check(backend, http, config, upstream)).await
    };
    match tokio::time::timeout(config.timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", config.timeout)),
    }
}

async fn http_check(
    backend: &Backend,
    http: &crate::config::HttpCheck,
    config: &HealthConfig,
    upstream: &Upstream,
) -> Result<(), String> {
    // The same connect as real traffic (TLS, HTTP/2), with its own deadline below.
    let sender = client::connect(backend.addr, backend.tls_name(), upstream, config.timeout)
        .await
        .map_err(|e| e.to_string())?;
    let host = http
        .host
        .clone()
        .unwrap_or_else(|| backend.name.to_string());
    let mut request = http::Request::get(http.path.as_str())
        .header(http::header::USER_AGENT, "switchyard-health-check");
    request = if upstream.protocol.is_h2() {
        let uri = format!("{}://{host}{}", upstream.scheme(), http.path);
        request.uri(uri).version(http::Version::HTTP_2)
    } else {
        request
            .header(http::header::HOST, host)
            .header(http::header::CONNECTION, "close")
    };
    let request = request
        .body(RequestBody::empty())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request, config.timeout)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let expected = if http.expected_status.is_empty() {
        (200..300).contains(&status)
    } else {
        http.expected_status.contains(&status)
    };
    if expected {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

/// Passive health: called with the outcome of every forwarded request. A streak of
/// `consecutive_failures` (connect failures, 5xx) ejects the backend for
/// `ejection_time`, unless that would take more than `max_ejection_percent` of the
/// pool out. One ejection decision at a time per pool, so two backends failing at
/// once cannot both pass the percentage check; a request that finds another decision
/// under way leaves it (its streak goes on, and the next failure decides).
pub fn report(pool: &Pool, backend: &Backend, ok: bool) {
    if ok {
        backend.record_success();
        return;
    }
    let passive = &pool.settings.passive;
    if passive.consecutive_failures == 0 || backend.record_failure() < passive.consecutive_failures
    {
        return;
    }
    if backend.is_ejected() {
        return;
    }
    let Some(_turn) = pool.settings.ejection_turn() else {
        return;
    };
    let total = pool.backends.len();
    let out = pool.backends.iter().filter(|b| b.is_ejected()).count();
    if (out + 1) * 100 > passive.max_ejection_percent as usize * total {
        backend.warn_rate_limited(
            "not ejecting after consecutive failures",
            &format_args!(
                "{out} of {total} backends of pool `{}` are already ejected (max_ejection_percent = {})",
                pool.name, passive.max_ejection_percent
            ),
        );
        return;
    }
    backend.eject_for(passive.ejection_time);
    tracing::warn!(
        pool = %pool.name,
        backend = %backend.name,
        failures = passive.consecutive_failures,
        ejection_time = ?passive.ejection_time,
        "backend ejected after consecutive failures of real traffic"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_result_decides() {
        let mut c = HealthCounter::new(2, 3);
        assert_eq!(c.record(true), Some(Health::Healthy));
        let mut c = HealthCounter::new(2, 3);
        assert_eq!(c.record(false), Some(Health::Unhealthy));
    }

    #[test]
    fn healthy_turns_unhealthy_after_exactly_the_threshold_of_failures() {
        let mut c = HealthCounter::new(2, 3);
        c.record(true);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), Some(Health::Unhealthy));
        assert_eq!(c.record(false), None, "a transition is reported once");
    }

    #[test]
    fn a_success_breaks_a_failure_streak() {
        let mut c = HealthCounter::new(2, 3);
        c.record(true);
        c.record(false);
        c.record(false);
        c.record(true);
        c.record(false);
        c.record(false);
        assert_eq!(c.state(), Health::Healthy);
        assert_eq!(c.record(false), Some(Health::Unhealthy));
    }

    #[test]
    fn unhealthy_turns_healthy_after_exactly_the_threshold_of_successes() {
        let mut c = HealthCounter::new(2, 1);
        c.record(false);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(Health::Healthy));
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(1), Duration::from_millis(100));
            assert!(
                d >= Duration::from_millis(900) && d <= Duration::from_millis(1100),
                "{d:?}"
            );
        }
        assert!(jittered(Duration::ZERO, Duration::from_millis(100)) <= Duration::from_millis(100));
    }
}
