//! Calendar windows: the day and the month that an instant falls in, in the deployment's
//! time zone.
//!
//! Counters are keyed by `(scope, window, window_start)`. A new window is a new key, so
//! nothing ever has to be reset, and nothing a concurrent request spent can be wiped.
//! Time is always an argument (microseconds since the Unix epoch); nothing here reads a clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering, fence};

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch.
pub type Micros = i64;

/// A calendar window kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// The rolling last minute (requests per minute).
    Minute,
    /// The calendar day.
    Day,
    /// The calendar month.
    Month,
    /// Seven days of report counters: the days whose start falls in one seven-day bucket
    /// aligned to the Unix epoch (see [`week_bucket`]). The store keeps them for users so
    /// that reports over many days read fewer rows; no limit counts in this window.
    Week,
    /// No window: a level that goes up and down (concurrent requests, one request's size).
    None,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Day => "day",
            Window::Month => "month",
            Window::Week => "week",
            Window::None => "none",
        }
    }
}

/// The length of a [`Window::Week`] bucket: seven days of 24 hours.
pub const WEEK_MICROS: Micros = 7 * 86_400_000_000;

/// The bucket of [`Window::Week`] that the day starting at `day_start` belongs to: the
/// multiple of [`WEEK_MICROS`] at or before it. A bucket holds the days whose start falls in
/// `[bucket, bucket + WEEK_MICROS)`, whatever the time zone, so every day is in exactly one.
pub fn week_bucket(day_start: Micros) -> Micros {
    day_start - day_start.rem_euclid(WEEK_MICROS)
}

/// `[start, end)` of one calendar period, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub start: Micros,
    pub end: Micros,
}

impl Period {
    pub fn contains(&self, t: Micros) -> bool {
        self.start <= t && t < self.end
    }
}

/// The day and the month an instant falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Periods {
    pub day: Period,
    pub month: Period,
}

/// Computes calendar periods in one time zone, remembering the current ones so the hot
/// path does no time-zone arithmetic.
#[derive(Debug)]
pub struct Calendar {
    tz: TimeZone,
    name: String,
    current: Current,
}

/// The remembered periods, read without taking a lock: four atomics inside a sequence
/// number that is odd while a writer changes them (a sequence lock), so the hot path's
/// read is a handful of plain loads. Writers (once a day) take a mutex.
#[derive(Debug, Default)]
struct Current {
    /// 0 while nothing is remembered; odd while being written.
    seq: AtomicU64,
    /// Day start, day end, month start, month end.
    bounds: [AtomicI64; 4],
    write: Mutex<()>,
}

impl Current {
    fn load(&self) -> Option<Periods> {
        let before = self.seq.load(Ordering::Acquire);
        if before == 0 || before % 2 == 1 {
            return None;
        }
        let [ds, de, ms, me] = self.bounds.each_ref().map(|b| b.load(Ordering::Relaxed));
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == before).then_some(Periods {
            day: Period { start: ds, end: de },
            month: Period { start: ms, end: me },
        })
    }

    /// Remembers `p` unless newer periods are remembered already.
    fn store_latest(&self, p: Periods) {
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        if self.load().is_some_and(|c| c.day.start >= p.day.start) {
            return;
        }
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for (b, v) in self
            .bounds
            .iter()
            .zip([p.day.start, p.day.end, p.month.start, p.month.end])
        {
            b.store(v, Ordering::Relaxed);
        }
        self.seq.store(seq + 2, Ordering::Release);
    }
}

impl Clone for Calendar {
    fn clone(&self) -> Self {
        Calendar {
            tz: self.tz.clone(),
            name: self.name.clone(),
            current: Current::default(),
        }
    }
}

/// A time zone name that is not in the time zone database, or an instant out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CalendarError(String);

impl Calendar {
    /// A calendar in an IANA time zone (`UTC`, `Europe/Berlin`, ...).
    pub fn new(time_zone: &str) -> Result<Calendar, CalendarError> {
        let tz = TimeZone::get(time_zone)
            .map_err(|e| CalendarError(format!("unknown time zone `{time_zone}`: {e}")))?;
        Ok(Calendar {
            tz,
            name: time_zone.to_owned(),
            current: Current::default(),
        })
    }

    pub fn utc() -> Calendar {
        Calendar::new("UTC").expect("UTC exists")
    }

    pub fn time_zone_name(&self) -> &str {
        &self.name
    }

    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }

    /// The day and month containing `t`. Cheap when `t` is in the remembered periods.
    pub fn periods(&self, t: Micros) -> Periods {
        if let Some(p) = self.current.load()
            && p.day.contains(t)
        {
            return p;
        }
        let p = self.compute(t);
        // Remember the latest periods only: a stale clock must not evict the current ones.
        self.current.store_latest(p);
        p
    }

    /// The first instant of a calendar date in this time zone (local midnight, or the
    /// first instant after a gap that skips it).
    pub fn date_start(&self, date: jiff::civil::Date) -> Micros {
        date.to_zoned_datetime(self.tz.clone())
            .map(|z| z.timestamp().as_microsecond())
            .unwrap_or(Micros::MAX)
    }

    /// The calendar date of an instant in this time zone.
    pub fn date_of(&self, t: Micros) -> jiff::civil::Date {
        let ts = Timestamp::from_microsecond(t).unwrap_or(if t < 0 {
            Timestamp::MIN
        } else {
            Timestamp::MAX
        });
        ts.to_zoned_datetime(self.tz.clone()).date()
    }

    /// The start of the period of `window` containing `t`.
    pub fn period(&self, window: Window, t: Micros) -> Option<Period> {
        let p = self.periods(t);
        match window {
            Window::Day => Some(p.day),
            Window::Month => Some(p.month),
            Window::Minute | Window::Week | Window::None => None,
        }
    }

    fn compute(&self, t: Micros) -> Periods {
        let date = self.date_of(t);
        let at = |d: jiff::civil::Date| self.date_start(d);
        let day_start = at(date);
        let day_end = date.tomorrow().map(at).unwrap_or(Micros::MAX);
        let first = date.first_of_month();
        let month_start = at(first);
        let month_end = first.checked_add(1.month()).map(at).unwrap_or(Micros::MAX);
        Periods {
            day: Period {
                start: day_start,
                end: day_end,
            },
            month: Period {
                start: month_start,
                end: month_end,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(s: &str) -> Micros {
        s.parse::<Timestamp>().unwrap().as_microsecond()
    }

    #[test]
    fn utc_days_and_months() {
        let c = Calendar::utc();
        let p = c.periods(micros("2024-02-29T13:45:00Z"));
        assert_eq!(p.day.start, micros("2024-02-29T00:00:00Z"));
        assert_eq!(p.day.end, micros("2024-03-01T00:00:00Z"));
        assert_eq!(p.month.start, micros("2024-02-01T00:00:00Z"));
        assert_eq!(p.month.end, micros("2024-03-01T00:00:00Z"));
        // The last microsecond of a day is in it; the next is in the next day.
        let end = micros("2024-02-29T23:59:59.999999Z");
        assert_eq!(c.periods(end).day.start, p.day.start);
        assert_eq!(c.periods(end + 1).day.start, p.day.end);
    }

    #[test]
    fn zoned_days_follow_local_midnight_and_dst() {
        let c = Calendar::new("America/New_York").unwrap();
        // 03:00 UTC on 10 March is still 9 March in New York (UTC-5).
        let p = c.periods(micros("2024-03-10T03:00:00Z"));
        assert_eq!(p.day.start, micros("2024-03-09T05:00:00Z"));
        // 10 March 2024 is 23 hours long (clocks spring forward).
        let p = c.periods(micros("2024-03-10T12:00:00Z"));
        assert_eq!(p.day.start, micros("2024-03-10T05:00:00Z"));
        assert_eq!(p.day.end, micros("2024-03-11T04:00:00Z"));
        assert_eq!(p.month.start, micros("2024-03-01T05:00:00Z"));
        assert_eq!(p.month.end, micros("2024-04-01T04:00:00Z"));
    }

    #[test]
    fn stale_times_do_not_evict_the_current_periods() {
        let c = Calendar::utc();
        let now = micros("2024-05-02T10:00:00Z");
        let a = c.periods(now);
        let old = c.periods(micros("2024-04-30T10:00:00Z"));
        assert_ne!(a, old);
        assert_eq!(c.current.load(), Some(a));
    }

    #[test]
    fn unknown_zone_is_an_error() {
        assert!(Calendar::new("Nowhere/Land").is_err());
    }
}
