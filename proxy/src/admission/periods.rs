//! Quota periods: the UTC month (the billing period until subscriptions set
//! their own) and the UTC day, named for state keys and with their ends for
//! `Retry-After`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate_metering::partitions::{month_index, month_start};

use super::limits::{Period, Periods};

const DAY_SECS: u64 = 86_400;
/// Any day in the next month is at most this far past a month's start.
const PAST_MONTH_END: Duration = Duration::from_secs(32 * DAY_SECS);

/// The periods containing `at`: `2026-11` and `2026-11-23`.
pub fn periods(at: SystemTime) -> Periods {
    let month = month_index(at);
    let (year, month_of_year) = (1970 + month.div_euclid(12), month.rem_euclid(12) + 1);
    let day_of_month = 1 + whole_days(at) - whole_days(month_start(at));
    Periods {
        month: format!("{year}-{month_of_year:02}"),
        day: format!("{year}-{month_of_year:02}-{day_of_month:02}"),
    }
}

/// The start of the month and of the day containing `at`.
pub fn starts(at: SystemTime) -> (SystemTime, SystemTime) {
    (
        month_start(at),
        UNIX_EPOCH + Duration::from_secs(whole_days(at) * DAY_SECS),
    )
}

/// How long until `period` (containing `at`) ends.
pub fn until_end(period: Period, at: SystemTime) -> Duration {
    let (month, day) = starts(at);
    let end = match period {
        Period::Month => month_start(month + PAST_MONTH_END),
        Period::Day => day + Duration::from_secs(DAY_SECS),
    };
    end.duration_since(at).unwrap_or_default()
}

fn whole_days(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / DAY_SECS
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
        let last = periods(at(1_796_083_199));
        assert_eq!(
            (last.month.as_str(), last.day.as_str()),
            ("2026-11", "2026-11-30")
        );
        let first = periods(at(1_796_083_200));
        assert_eq!(
            (first.month.as_str(), first.day.as_str()),
            ("2026-12", "2026-12-01")
        );
    }

    #[test]
    fn ends_are_the_next_midnight_and_the_next_first() {
        let now = at(1_796_083_199);
        assert_eq!(until_end(Period::Day, now), Duration::from_secs(1));
        assert_eq!(until_end(Period::Month, now), Duration::from_secs(1));
        let mid_month = at(1_796_083_200 + 10 * DAY_SECS);
        assert_eq!(
            until_end(Period::Month, mid_month),
            Duration::from_secs(21 * DAY_SECS)
        );
    }
}
