//! Recent traffic per pool for the status page: request rate, error rate and p99 over
//! the last minutes, from snapshots of the metrics' counters taken every few seconds.
//! Nothing here runs on the request path: the counters are already kept there.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::metrics::{Metrics, PoolTotals, DURATION_BOUNDS};

/// How often the counters are read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);
/// Snapshots kept: five minutes at `SAMPLE_INTERVAL`.
const KEPT: usize = 151;

struct Snapshot {
    /// For display; intervals are measured on `taken`, which a clock step cannot move.
    at_ms: u64,
    taken: Instant,
    totals: BTreeMap<String, PoolTotals>,
}

/// The last snapshots, oldest first.
#[derive(Default)]
pub struct RecentTraffic {
    // Taken by the sampler every two seconds and by the API: never by a request.
    snapshots: Mutex<VecDeque<Snapshot>>,
}

/// One interval of one pool.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TrafficPoint {
    /// End of the interval, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub requests_per_second: f64,
    /// 5xx answers over all answers; absent when there were none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Estimated from the duration histogram, like Prometheus' `histogram_quantile`;
    /// absent when there were no requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RecentTrafficView {
    pub interval_seconds: f64,
    /// Pool name to its points, oldest first.
    pub pools: BTreeMap<String, Vec<TrafficPoint>>,
}

impl RecentTraffic {
    /// For a process whose counters are all still 0: its first snapshot is that, taken
    /// now, so requests answered before the sampler's first read count in the first
    /// interval instead of before it.
    pub fn starting_now() -> RecentTraffic {
        let recent = RecentTraffic::default();
        recent.record(BTreeMap::new());
        recent
    }

    pub fn record(&self, totals: BTreeMap<String, PoolTotals>) {
        let snapshot = Snapshot {
            at_ms: now_ms(),
            taken: Instant::now(),
            totals,
        };
        let mut snapshots = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        if snapshots.len() == KEPT {
            snapshots.pop_front();
        }
        snapshots.push_back(snapshot);
    }

    pub fn view(&self) -> RecentTrafficView {
        let snapshots = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        let mut pools: BTreeMap<String, Vec<TrafficPoint>> = BTreeMap::new();
        for (before, after) in snapshots.iter().zip(snapshots.iter().skip(1)) {
            let seconds = after.taken.duration_since(before.taken).as_secs_f64();
            if seconds <= 0.0 {
                continue;
            }
            for (pool, now) in &after.totals {
                let then = before.totals.get(pool).cloned().unwrap_or_default();
                pools.entry(pool.clone()).or_default().push(point(
                    after.at_ms,
                    seconds,
                    &then,
                    now,
                ));
            }
        }
        RecentTrafficView {
            interval_seconds: SAMPLE_INTERVAL.as_secs_f64(),
            pools,
        }
    }
}

/// Reads the counters every `SAMPLE_INTERVAL`, for as long as the process runs.
pub async fn sample(metrics: Arc<Metrics>, recent: Arc<RecentTraffic>) {
    // The first snapshot is `starting_now`'s: the first read is an interval later.
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + SAMPLE_INTERVAL,
        SAMPLE_INTERVAL,
    );
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let metrics = Arc::clone(&metrics);
        // At thousands of series a read takes milliseconds: off the workers' threads.
        if let Ok(totals) = tokio::task::spawn_blocking(move || metrics.pool_totals()).await {
            recent.record(totals);
        }
    }
}

/// What happened between two snapshots. The counters only grow; should a total ever
/// shrink, that interval counts as zero, not as negative.
fn point(at_ms: u64, seconds: f64, then: &PoolTotals, now: &PoolTotals) -> TrafficPoint {
    let (requests, errors) = answers_between(then, now);
    TrafficPoint {
        at_ms,
        requests_per_second: requests as f64 / seconds,
        error_rate: (requests > 0).then(|| errors as f64 / requests as f64),
        p99_seconds: p99_between(then, now),
    }
}

/// Answers, and 5xx among them, between two readings of the same counters.
pub fn answers_between(then: &PoolTotals, now: &PoolTotals) -> (u64, u64) {
    (
        now.requests.saturating_sub(then.requests),
        now.errors.saturating_sub(then.errors),
    )
}

/// The p99 of the requests timed between two readings; `None` without any.
pub fn p99_between(then: &PoolTotals, now: &PoolTotals) -> Option<f64> {
    let buckets: Vec<u64> = now
        .buckets
        .iter()
        .zip(&then.buckets)
        .map(|(n, t)| n.saturating_sub(*t))
        .collect();
    quantile(0.99, &buckets, now.timed.saturating_sub(then.timed))
}

/// `histogram_quantile`: the bucket holding the rank, interpolated linearly inside it;
/// a rank beyond the last finite bound is that bound.
fn quantile(q: f64, cumulative: &[u64], count: u64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let rank = q * count as f64;
    let mut lower_bound = 0.0;
    let mut lower_count = 0u64;
    for (bound, &cumulative) in DURATION_BOUNDS.iter().zip(cumulative) {
        if cumulative as f64 >= rank {
            let in_bucket = cumulative.saturating_sub(lower_count) as f64;
            if in_bucket == 0.0 {
                return Some(*bound);
            }
            let fraction = (rank - lower_count as f64) / in_bucket;
            return Some(lower_bound + (bound - lower_bound) * fraction);
        }
        lower_bound = *bound;
        lower_count = cumulative;
    }
    DURATION_BOUNDS.last().copied()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(requests: u64, errors: u64, fast: u64, slow: u64) -> PoolTotals {
        // `fast` in the first bucket (<= 0.5 ms), `slow` between 0.25 s and 0.5 s.
        let mut buckets = [0u64; DURATION_BOUNDS.len()];
        for (i, slot) in buckets.iter_mut().enumerate() {
            *slot = fast + if DURATION_BOUNDS[i] >= 0.5 { slow } else { 0 };
        }
        PoolTotals {
            requests,
            errors,
            timed: fast + slow,
            buckets,
        }
    }

    #[test]
    fn a_point_is_the_difference_between_two_snapshots() {
        let p = point(2000, 2.0, &totals(100, 0, 100, 0), &totals(300, 20, 298, 2));
        assert_eq!(p.requests_per_second, 100.0);
        assert_eq!(p.error_rate, Some(0.1));
        // 200 new requests, 2 of them slow: rank 198 falls at the top of the first
        // bucket's share.
        let p99 = p.p99_seconds.unwrap();
        assert!(p99 <= 0.0005, "{p99}");
        let slow = point(2000, 2.0, &totals(0, 0, 0, 0), &totals(100, 0, 90, 10));
        let p99 = slow.p99_seconds.unwrap();
        assert!((0.25..=0.5).contains(&p99), "{p99}");
    }

    #[test]
    fn no_requests_means_no_rates_and_a_shrunk_total_counts_as_zero() {
        let p = point(2000, 2.0, &totals(50, 5, 50, 0), &totals(50, 5, 50, 0));
        assert_eq!(
            (p.requests_per_second, p.error_rate, p.p99_seconds),
            (0.0, None, None)
        );
        let shrunk = point(2000, 2.0, &totals(50, 5, 50, 0), &totals(10, 0, 10, 0));
        assert_eq!(shrunk.requests_per_second, 0.0);
    }

    #[test]
    fn the_view_pairs_consecutive_snapshots_and_keeps_five_minutes() {
        let recent = RecentTraffic::default();
        let start = Instant::now();
        for i in 0..(KEPT as u64 + 10) {
            let mut map = BTreeMap::new();
            map.insert("blue".to_string(), totals(i * 10, 0, i * 10, 0));
            recent.record(map);
            // Distinct timestamps without sleeping: rewrite the one just taken.
            recent.snapshots.lock().unwrap().back_mut().unwrap().taken =
                start + Duration::from_secs(2 * i);
        }
        let view = recent.view();
        let blue = &view.pools["blue"];
        assert_eq!(blue.len(), KEPT - 1);
        assert!(blue.iter().all(|p| p.requests_per_second == 5.0));
    }

    #[test]
    fn quantile_beyond_the_last_bucket_is_the_last_bound() {
        let buckets = [0u64; DURATION_BOUNDS.len()];
        assert_eq!(quantile(0.99, &buckets, 10), Some(10.0));
    }
}
