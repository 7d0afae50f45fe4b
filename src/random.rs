//! A fast per-thread random source (wyrand) for balancing and traffic splits: no lock,
//! no syscall, no shared cache line per request. Not for anything security related.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // Each RandomState gets fresh keys (OS-seeded, then stepped per instance), so every
    // thread starts from a different point.
    RandomState::new().build_hasher().finish() | 1
}

pub fn next_u64() -> u64 {
    STATE.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// Uniform in `0..bound` (Lemire's multiply-shift; the bias is below 2^-32 for the small
/// bounds used here).
pub fn below(bound: u64) -> u64 {
    ((u128::from(next_u64()) * u128::from(bound)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut seen = [0u32; 10];
        for _ in 0..100_000 {
            let v = below(10) as usize;
            seen[v] += 1;
        }
        for count in seen {
            assert!((9_000..11_000).contains(&count), "{seen:?}");
        }
    }
}
