//! Picking a backend within a pool. Health and admin state are read from the backends'
//! atomics at pick time, so no table needs rebuilding when a backend goes down.

use std::sync::atomic::Ordering;

use crate::backend::AdminState;
use crate::config::{Balance, PanicMode};
use crate::random;
use crate::routing::Pool;

/// Draws tried before falling back to a full scan, when many backends are unavailable.
const QUICK_DRAWS: usize = 4;

/// Most backends one request excludes (those it already tried).
pub const MAX_EXCLUDED: usize = 16;

/// Index of the backend for the next request, skipping unavailable backends and those in
/// `exclude` (already tried for this request). `None` when no backend can take it.
pub fn pick(pool: &Pool, exclude: &[usize]) -> Option<usize> {
    let picked = pick_among(pool, exclude, Eligible::Available);
    if picked.is_some() || pool.settings.panic_mode == PanicMode::FailClosed {
        return picked;
    }
    // Panic mode, fail open: every in-rotation backend failed its checks. Maybe the
    // checks are wrong; try them all rather than refuse every request.
    let picked = pick_among(pool, exclude, Eligible::InRotation)?;
    pool.backends[picked].warn_rate_limited(
        "panic mode",
        &format_args!("no healthy backend in pool `{}`: sending to unhealthy backends (panic_mode = fail_open)", pool.name),
    );
    Some(picked)
}

#[derive(Clone, Copy)]
enum Eligible {
    /// In rotation and not known unhealthy.
    Available,
    /// In rotation, whatever the health.
    InRotation,
}

fn pick_among(pool: &Pool, exclude: &[usize], eligible: Eligible) -> Option<usize> {
    match pool.balance {
        Balance::P2c => pick_p2c(pool, exclude, eligible),
        Balance::RoundRobin => pick_round_robin(pool, exclude, eligible),
    }
}

fn usable(pool: &Pool, index: usize, exclude: &[usize], eligible: Eligible) -> bool {
    let backend = &pool.backends[index];
    let ok = match eligible {
        Eligible::Available => backend.is_available(),
        Eligible::InRotation => backend.admin_state() == AdminState::Active,
    };
    ok && !exclude.contains(&index)
}

/// Weighted power of two choices: two backends drawn in proportion to their weight, the
/// one with fewer in-flight requests per unit of weight wins. When both are idle the
/// first draw wins, so light traffic still follows the weights.
fn pick_p2c(pool: &Pool, exclude: &[usize], eligible: Eligible) -> Option<usize> {
    let first = weighted_draw(pool, exclude, eligible)?;
    if pool.backends.len() == 1 {
        return Some(first);
    }
    // The second draw excludes the first, so two-backend pools always compare both.
    let mut without_first = [usize::MAX; MAX_EXCLUDED + 1];
    let excluded = exclude.len().min(MAX_EXCLUDED);
    without_first[..excluded].copy_from_slice(&exclude[..excluded]);
    without_first[excluded] = first;
    let Some(second) = weighted_draw(pool, &without_first[..=excluded], eligible) else {
        return Some(first);
    };
    let (a, b) = (&pool.backends[first], &pool.backends[second]);
    let ramp = pool.settings.slow_start;
    // Compare in_flight/weight without division.
    let load_a = a.in_flight() as f64 * b.effective_weight(ramp);
    let load_b = b.in_flight() as f64 * a.effective_weight(ramp);
    Some(if load_b < load_a { second } else { first })
}

fn weighted_draw(pool: &Pool, exclude: &[usize], eligible: Eligible) -> Option<usize> {
    let total = pool.total_weight();
    if total == 0 {
        return None;
    }
    let ramp = pool.settings.slow_start;
    for _ in 0..QUICK_DRAWS {
        let point = random::below(total);
        let index = pool.cumulative_weight.partition_point(|&c| c <= point);
        if !usable(pool, index, exclude, eligible) {
            continue;
        }
        if !ramp_admits(&pool.backends[index], ramp) {
            continue;
        }
        return Some(index);
    }
    // Many backends are out: draw among the usable ones only.
    let milli = |i: usize| ((pool.backends[i].effective_weight(ramp) * 1000.0) as u64).max(1);
    let usable_total: u64 = (0..pool.backends.len())
        .filter(|&i| usable(pool, i, exclude, eligible))
        .map(milli)
        .sum();
    if usable_total == 0 {
        return None;
    }
    let mut point = random::below(usable_total);
    for index in 0..pool.backends.len() {
        if !usable(pool, index, exclude, eligible) {
            continue;
        }
        let weight = milli(index);
        if point < weight {
            return Some(index);
        }
        point -= weight;
    }
    None
}

fn pick_round_robin(pool: &Pool, exclude: &[usize], eligible: Eligible) -> Option<usize> {
    let cycle = &pool.rr_cycle;
    if cycle.len() == 0 {
        return None;
    }
    let start = pool.rr_next.fetch_add(1, Ordering::Relaxed) as u64;
    let ramp = pool.settings.slow_start;
    let turn = |i: &usize| usable(pool, *i, exclude, eligible);
    // The next turns of the cycle; a ramping backend lets some of its turns pass.
    let turns = (pool.backends.len() as u64).min(cycle.len());
    let mut order = (0..turns).filter_map(|step| cycle.turn(start + step));
    if let Some(found) = order
        .clone()
        .find(|i| turn(i) && ramp_admits(&pool.backends[*i], ramp))
        .or_else(|| order.find(turn))
    {
        return Some(found);
    }
    // Those turns all went to backends that are out: any usable one, in index order.
    let n = pool.backends.len();
    (0..n).map(|k| (start as usize + k) % n).find(turn)
}

/// Slow start: admit a ramping backend with probability equal to its ramp fraction.
fn ramp_admits(backend: &crate::backend::Backend, ramp: Option<std::time::Duration>) -> bool {
    let fraction = backend.ramp_fraction(ramp);
    fraction >= 1.0 || (random::below(1 << 20) as f64) < fraction * f64::from(1u32 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{AdminState, Backend, Health};
    use std::sync::Arc;
    use std::time::Duration;

    fn pool(weights: &[u32], balance: Balance) -> Pool {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                Arc::new(Backend::new(addr, w, Duration::from_secs(1)))
            })
            .collect();
        let settings = crate::routing::PoolBehaviour {
            balance,
            panic_mode: PanicMode::FailClosed,
            ..Default::default()
        };
        Pool::new(
            "p",
            backends,
            Arc::new(crate::routing::PoolSettings::new(Arc::new(settings))),
        )
    }

    fn shares(pool: &Pool, picks: usize) -> Vec<f64> {
        let mut counts = vec![0usize; pool.backends.len()];
        for _ in 0..picks {
            counts[pick(pool, &[]).unwrap()] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    #[test]
    fn p2c_follows_weights_when_backends_are_idle() {
        let p = pool(&[1, 3], Balance::P2c);
        let s = shares(&p, 100_000);
        assert!((s[1] - 0.75).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn p2c_prefers_the_backend_with_fewer_in_flight() {
        let p = pool(&[1, 1], Balance::P2c);
        let _busy: Vec<_> = (0..5).map(|_| p.backends[0].track()).collect();
        let s = shares(&p, 10_000);
        assert!(s[1] > 0.99, "{s:?}");
    }

    #[test]
    fn p2c_compares_load_per_unit_of_weight() {
        // Backend 0 has 4 in flight at weight 4 (1 per unit); backend 1 has 2 at weight 1.
        let p = pool(&[4, 1], Balance::P2c);
        let _a: Vec<_> = (0..4).map(|_| p.backends[0].track()).collect();
        let _b: Vec<_> = (0..2).map(|_| p.backends[1].track()).collect();
        let s = shares(&p, 10_000);
        assert!(s[0] > 0.99, "{s:?}");
    }

    #[test]
    fn unavailable_backends_are_skipped_by_both_strategies() {
        for balance in [Balance::P2c, Balance::RoundRobin] {
            let p = pool(&[1, 1, 1], balance);
            p.backends[0].set_health(Health::Unhealthy);
            p.backends[1].set_admin_state(AdminState::Draining);
            for _ in 0..1000 {
                assert_eq!(pick(&p, &[]), Some(2));
            }
            p.backends[2].set_admin_state(AdminState::Disabled);
            assert_eq!(pick(&p, &[]), None);
        }
    }

    #[test]
    fn excluded_backends_are_not_picked_again() {
        for balance in [Balance::P2c, Balance::RoundRobin] {
            let p = pool(&[1, 1], balance);
            for _ in 0..1000 {
                assert_eq!(pick(&p, &[0]), Some(1));
            }
            assert_eq!(pick(&p, &[0, 1]), None);
        }
    }

    #[test]
    fn fail_open_spreads_over_unhealthy_backends_but_not_drained_ones() {
        let backends: Vec<_> = (0..3)
            .map(|i| {
                Arc::new(Backend::new(
                    format!("127.0.0.1:{}", 2000 + i).parse().unwrap(),
                    1,
                    Duration::from_secs(1),
                ))
            })
            .collect();
        let open = Pool::new(
            "p",
            backends.clone(),
            Arc::new(crate::routing::PoolSettings::default()),
        );
        for b in &backends {
            b.set_health(Health::Unhealthy);
        }
        backends[2].set_admin_state(AdminState::Draining);
        let picks: Vec<_> = (0..1000).map(|_| pick(&open, &[]).unwrap()).collect();
        assert!(picks.contains(&0) && picks.contains(&1) && !picks.contains(&2));
        let closed = pool(&[1, 1], Balance::P2c);
        for b in &closed.backends {
            b.set_health(Health::Unhealthy);
        }
        assert_eq!(pick(&closed, &[]), None);
    }

    #[test]
    fn slow_start_holds_back_a_backend_that_just_became_healthy() {
        let backends: Vec<_> = (0..2)
            .map(|i| {
                Arc::new(Backend::new(
                    format!("127.0.0.1:{}", 3000 + i).parse().unwrap(),
                    10,
                    Duration::from_secs(1),
                ))
            })
            .collect();
        let settings = crate::routing::PoolBehaviour {
            slow_start: Some(Duration::from_secs(600)),
            ..Default::default()
        };
        let p = Pool::new(
            "p",
            backends.clone(),
            Arc::new(crate::routing::PoolSettings::new(Arc::new(settings))),
        );
        backends[1].set_health(Health::Healthy);
        let s = shares(&p, 20_000);
        // Backend 1 ramps from a tenth of its weight: about 1/11 of the traffic.
        assert!(s[1] < 0.15, "{s:?}");
    }

    #[test]
    fn round_robin_rotates_in_weight_proportion() {
        let p = pool(&[2, 1], Balance::RoundRobin);
        let picks: Vec<_> = (0..6).map(|_| pick(&p, &[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 4);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 2);
        // Smooth: never the light backend twice in a row.
        assert!(picks.windows(2).all(|w| !(w[0] == 1 && w[1] == 1)));
    }

    #[test]
    fn weighted_draw_falls_back_to_a_scan_when_most_are_down() {
        let p = pool(&[1; 50], Balance::P2c);
        for b in &p.backends[..49] {
            b.set_health(Health::Unhealthy);
        }
        for _ in 0..100 {
            assert_eq!(pick(&p, &[]), Some(49));
        }
    }
}
