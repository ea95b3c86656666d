//! Quota periods: the account's billing period (a Stripe subscription's
//! current period, when it has one; else the UTC calendar month) and the UTC
//! day, named for state keys and with their ends for `Retry-After`.
//!
//! A new billing period (Stripe's `invoice.paid` advancing the
//! subscription) has a new name, so its counters start from zero.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate_metering::partitions::{month_start, next_month_start, utc_date};

use super::limits::{Period, Periods};

const DAY_SECS: u64 = 86_400;

/// A subscription's current billing period, from `billing_subscriptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillingPeriod {
    pub start: SystemTime,
    pub end: SystemTime,
}

impl BillingPeriod {
    /// The period containing `at`. Past `end` (Stripe renews at the end and
    /// its events follow within the hour) the next one is assumed to be as
    /// long, until the stored period moves on.
    fn containing(self, at: SystemTime) -> BillingPeriod {
        let length = self.end.duration_since(self.start).unwrap_or_default();
        if at < self.end || length.is_zero() {
            return self;
        }
        let behind = at.duration_since(self.end).unwrap_or_default();
        let skipped = 1 + (behind.as_secs() / length.as_secs().max(1)) as u32;
        let start = self.start + length * skipped;
        BillingPeriod {
            start,
            end: start + length,
        }
    }
}

/// The periods containing `at`: `2026-11` (or `b1795000000`, a billing
/// period by its start) and `2026-11-23`.
pub fn periods(at: SystemTime, billing: Option<BillingPeriod>) -> Periods {
    let month = match billing {
        Some(billing) => format!("b{}", unix(billing.containing(at).start)),
        None => {
            let date = utc_date(at);
            format!("{}-{:02}", date.year(), u8::from(date.month()))
        }
    };
    Periods {
        month,
        day: day_name(at),
    }
}

/// The start of the billing period and of the day containing `at`.
pub fn starts(at: SystemTime, billing: Option<BillingPeriod>) -> (SystemTime, SystemTime) {
    (
        billing.map_or_else(|| month_start(at), |b| b.containing(at).start),
        UNIX_EPOCH + Duration::from_secs(whole_days(at) * DAY_SECS),
    )
}

/// How long until `period` (containing `at`) ends.
pub fn until_end(period: Period, at: SystemTime, billing: Option<BillingPeriod>) -> Duration {
    let end = match (period, billing) {
        (Period::Month, Some(billing)) => billing.containing(at).end,
        (Period::Month, None) => next_month_start(at),
        (Period::Day, _) => starts(at, billing).1 + Duration::from_secs(DAY_SECS),
    };
    end.duration_since(at).unwrap_or_default()
}

/// The first UTC midnight at or after `at`.
pub fn next_midnight(at: SystemTime) -> SystemTime {
    let days = unix(at).div_ceil(DAY_SECS);
    UNIX_EPOCH + Duration::from_secs(days * DAY_SECS)
}

fn day_name(at: SystemTime) -> String {
    let date = utc_date(at);
    format!(
        "{}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn whole_days(at: SystemTime) -> u64 {
    unix(at) / DAY_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn periods_are_utc_calendar_month_and_day() {
        // 2026-11-30T23:59:59Z, then 2026-12-01T00:00:00Z.
        let last = periods(at(1_796_083_199), None);
        assert_eq!(
            (last.month.as_str(), last.day.as_str()),
            ("2026-11", "2026-11-30")
        );
        let first = periods(at(1_796_083_200), None);
        assert_eq!(
            (first.month.as_str(), first.day.as_str()),
            ("2026-12", "2026-12-01")
        );
    }

    #[test]
    fn ends_are_the_next_midnight_and_the_next_first() {
        let now = at(1_796_083_199);
        assert_eq!(until_end(Period::Day, now, None), Duration::from_secs(1));
        assert_eq!(until_end(Period::Month, now, None), Duration::from_secs(1));
        let mid_month = at(1_796_083_200 + 10 * DAY_SECS);
        assert_eq!(
            until_end(Period::Month, mid_month, None),
            Duration::from_secs(21 * DAY_SECS)
        );
    }

    #[test]
    fn a_billing_period_names_the_month_counter_and_rolls_on_past_its_end() {
        let billing = BillingPeriod {
            start: at(1_795_000_000),
            end: at(1_795_000_000 + 30 * DAY_SECS),
        };
        let inside = at(1_795_000_000 + 29 * DAY_SECS);
        assert_eq!(periods(inside, Some(billing)).month, "b1795000000");
        assert_eq!(
            until_end(Period::Month, inside, Some(billing)),
            Duration::from_secs(DAY_SECS)
        );
        // Renewed at Stripe, its event not here yet: the next period.
        let renewed = at(1_795_000_000 + 30 * DAY_SECS + 60);
        assert_eq!(
            periods(renewed, Some(billing)).month,
            format!("b{}", 1_795_000_000 + 30 * DAY_SECS)
        );
        assert_eq!(
            starts(renewed, Some(billing)).0,
            at(1_795_000_000 + 30 * DAY_SECS)
        );
        // The day is the UTC day all the same.
        assert_eq!(
            periods(renewed, Some(billing)).day,
            periods(renewed, None).day
        );
    }
}
