//! GCRA, the rolling requests-per-minute limit.

use super::MICROS_PER_MINUTE;
use crate::window::Micros;

/// GCRA (the generic cell rate algorithm) for requests per minute.
///
/// Emission interval `T = 60 s / limit`, burst tolerance `(limit - 1) * T`: an idle user may
/// send `limit` requests at once; after that one request is admitted every `T`. Over any
/// span of `d` seconds at most `limit + d / T` requests are admitted, so a 60-second span
/// can hold up to `2 * limit` requests when a full burst is followed by a steady stream,
/// while the sustained rate never exceeds `limit` per minute.
#[derive(Clone, Copy, Debug)]
pub(super) struct Gcra {
    interval: i64,
    tolerance: i64,
}

impl Gcra {
    pub(super) fn new(limit: u32) -> Gcra {
        let interval = MICROS_PER_MINUTE / limit.max(1) as i64;
        Gcra {
            interval,
            tolerance: interval * (limit.max(1) as i64 - 1),
        }
    }

    /// Whether `n` more requests fit at `now`, and the arrival time after admitting them.
    pub(super) fn try_admit(&self, tat: Micros, now: Micros, n: u64) -> (bool, Micros) {
        if n == 0 {
            return (true, tat);
        }
        let start = tat.max(now);
        let new_tat = start.saturating_add(self.interval.saturating_mul(n as i64));
        // The last of the n requests must arrive within the tolerance.
        let ok = new_tat - self.interval - now <= self.tolerance;
        (ok, new_tat)
    }

    /// The arrival time after counting `n` requests a limit in shadow admitted beyond the
    /// rate: counted, but never more than a full burst ahead of `now`, so that enforcing
    /// the limit later refuses for at most one interval past a burst.
    pub(super) fn counted(&self, tat: Micros, now: Micros, n: u64) -> Micros {
        let (_, new_tat) = self.try_admit(tat, now, n);
        new_tat.min(
            now.saturating_add(self.tolerance)
                .saturating_add(self.interval),
        )
    }

    /// Requests counted against the burst at `now`.
    pub(super) fn used(&self, tat: Micros, now: Micros) -> u64 {
        let ahead = tat.saturating_sub(now).max(0);
        (ahead + self.interval - 1)
            .checked_div(self.interval)
            .unwrap_or(0) as u64
    }

    /// When the next request will be admitted.
    pub(super) fn next_allowed(&self, tat: Micros, now: Micros) -> Micros {
        tat.saturating_sub(self.tolerance).max(now)
    }
}
