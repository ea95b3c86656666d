//! GCRA (the generic cell rate algorithm) as plain arithmetic on
//! microseconds, shared by both stores.
//!
//! A rule's whole state is one number, its *theoretical arrival time* (TAT):
//! the time at which the rule would be back to a full minute's allowance. A
//! unit occupies `1 min / per_minute` of it (the emission interval); a charge
//! moves the TAT forward by `cost` intervals from `max(tat, now)`, and is
//! allowed while the TAT stays within [`BURST_US`] of now. So a rule lets a
//! full minute's worth through at once and refills evenly after that.
//!
//! Most of the arithmetic works on the *level*, `tat - now` (zero: full):
//! the Redis scripts keep the TATs and hand back levels, and everything that
//! turns levels into verdicts and headers lives here, so both stores report
//! the same windows for the same state.

use std::time::Duration;

use super::{RateKind, RateRule, Window, Windows};

/// Burst tolerance: up to a full minute's worth of a rule's units may arrive
/// at once, so `per_minute` is what a client can spend in any one minute.
pub const BURST_US: u64 = 60_000_000;

/// Levels are capped here (about 31 years) so that `now + level` in
/// microseconds since 1970 stays below 2^53, where the Lua scripts' doubles
/// stop being exact integers. A rule this far behind refuses anyway.
pub const MAX_LEVEL_US: u64 = 1_000_000_000_000_000;

const MINUTE_US: u128 = 60_000_000;

/// A charge that does not conform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonconforming {
    /// How long until the same charge would conform.
    pub retry_after: Duration,
    /// The rule's window as it stands (nothing was charged).
    pub window: Window,
}

/// Microseconds that `cost` units occupy in a rule of `per_minute`.
///
/// Rounded down: the error is under 1 µs per charge whatever the rule, and
/// rounding down keeps exactly `per_minute` unit charges within one burst
/// (rounding up would let only `per_minute - 1` through when 60 s does not
/// divide evenly). `per_minute == 0` lets nothing through.
pub fn increment(cost: u64, per_minute: u64) -> u64 {
    if cost == 0 {
        return 0;
    }
    if per_minute == 0 {
        return MAX_LEVEL_US;
    }
    let us = u128::from(cost) * MINUTE_US / u128::from(per_minute);
    u64::try_from(us).unwrap_or(MAX_LEVEL_US).min(MAX_LEVEL_US)
}

/// Charges `increment` µs to a rule at `level`: the level after, or how far
/// past the burst tolerance it would go.
pub fn charge(level: u64, increment: u64) -> Result<u64, u64> {
    let after = level.saturating_add(increment).min(MAX_LEVEL_US);
    if after > BURST_US {
        Err(after - BURST_US)
    } else {
        Ok(after)
    }
}

/// Charges `cost` units at `now` to a rule whose TAT is `tat`: the new TAT
/// and the window after the charge, or why it does not conform.
pub fn check(
    tat: u64,
    now: u64,
    cost: u64,
    per_minute: u64,
) -> Result<(u64, Window), Nonconforming> {
    let level = tat.saturating_sub(now);
    match charge(level, increment(cost, per_minute)) {
        Ok(after) => Ok((now.saturating_add(after), window_at(after, per_minute))),
        Err(over) => Err(Nonconforming {
            retry_after: Duration::from_micros(over),
            window: window_at(level, per_minute),
        }),
    }
}

/// Corrects a rule by `delta_cost` units (actual minus estimate) at `now`:
/// a positive delta charges more, a negative one refunds. The result never
/// falls below `now` (a refund cannot bank allowance beyond a full rule)
/// and is never refused: the units were already spent.
pub fn adjust(tat: u64, now: u64, delta_cost: i64, per_minute: u64) -> u64 {
    now.saturating_add(adjust_level(
        tat.saturating_sub(now),
        signed_increment(delta_cost, per_minute),
    ))
}

/// [`increment`] for a correction: negative for a refund.
pub fn signed_increment(delta_cost: i64, per_minute: u64) -> i64 {
    let step = i64::try_from(increment(delta_cost.unsigned_abs(), per_minute)).unwrap_or(i64::MAX);
    if delta_cost < 0 { -step } else { step }
}

/// The level after a correction of `delta_us`, within `0..=MAX_LEVEL_US`.
pub fn adjust_level(level: u64, delta_us: i64) -> u64 {
    let step = delta_us.unsigned_abs();
    if delta_us < 0 {
        level.saturating_sub(step)
    } else {
        level.saturating_add(step).min(MAX_LEVEL_US)
    }
}

/// The window of a rule of `per_minute` whose TAT is `tat`, at `now`.
pub fn window(tat: u64, now: u64, per_minute: u64) -> Window {
    window_at(tat.saturating_sub(now), per_minute)
}

/// The window of a rule of `per_minute` at `level`: the units that still
/// fit in the burst, and the time until the rule is full again.
pub fn window_at(level: u64, per_minute: u64) -> Window {
    let room = u128::from(BURST_US.saturating_sub(level));
    let remaining = room * u128::from(per_minute) / MINUTE_US;
    Window {
        limit: per_minute,
        remaining: u64::try_from(remaining).unwrap_or(u64::MAX),
        reset: Duration::from_micros(level),
    }
}

/// The tightest window (least remaining, the first of equals) per kind,
/// from each rule's level (`levels[i]` belongs to `rules[i]`).
pub fn tightest(rules: &[RateRule], levels: &[u64]) -> Windows {
    let mut windows = Windows::default();
    for (rule, &level) in rules.iter().zip(levels) {
        let candidate = window_at(level, rule.per_minute);
        let slot = match rule.kind {
            RateKind::Requests => &mut windows.requests,
            RateKind::Tokens => &mut windows.tokens,
        };
        match slot {
            Some(current) if current.remaining <= candidate.remaining => {}
            _ => *slot = Some(candidate),
        }
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::super::Scope;
    use super::*;

    const SECOND: u64 = 1_000_000;
    /// An arbitrary "now" far from zero, so nothing passes by underflow.
    const T0: u64 = 10_000 * SECOND;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_minute_fits_at_once_and_the_next_waits_one_interval() {
        let mut tat = 0;
        for n in 1..=60 {
            let (next, window) = check(tat, T0, 1, 60).unwrap();
            assert_eq!(window.remaining, 60 - n);
            assert_eq!(window.reset, Duration::from_secs(n));
            tat = next;
        }
        let refused = check(tat, T0, 1, 60).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(refused.window.remaining, 0);
        assert_eq!(refused.window.reset, Duration::from_secs(60));
    }

    #[test]
    fn refill_is_even() {
        let tat = T0 + 60 * SECOND; // empty at T0
        assert!(check(tat, T0 + 999_999, 1, 60).is_err());
        let (_, after) = check(tat, T0 + SECOND, 1, 60).unwrap();
        assert_eq!(after.remaining, 0);
        // Half a minute later half the rule is back.
        assert_eq!(window_at(30 * SECOND, 60).remaining, 30);
        assert_eq!(window(tat, T0 + 30 * SECOND, 60).remaining, 30);
    }

    #[test]
    fn a_stale_tat_counts_as_full_not_as_banked_allowance() {
        let (tat, window) = check(T0 - 3_600 * SECOND, T0, 1, 60).unwrap();
        assert_eq!(tat, T0 + SECOND);
        assert_eq!(window.remaining, 59);
    }

    #[test]
    fn token_cost_is_charged_in_one_go() {
        let (tat, window) = check(0, T0, 100, 150).unwrap();
        assert_eq!(tat, T0 + 40 * SECOND);
        assert_eq!(window.remaining, 50);
        let refused = check(tat, T0, 100, 150).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(20));
        assert_eq!(refused.window.remaining, 50);
    }

    #[test]
    fn uneven_intervals_still_fit_exactly_per_minute() {
        // 60 s / 7 is not a whole number of microseconds.
        let mut tat = 0;
        for _ in 0..7 {
            tat = check(tat, T0, 1, 7).unwrap().0;
        }
        assert!(check(tat, T0, 1, 7).is_err());
        assert_eq!(window_at(increment(1, 7), 7).remaining, 6);
    }

    #[test]
    fn zero_per_minute_refuses_and_zero_cost_is_free() {
        assert!(check(0, T0, 1, 0).is_err());
        let (tat, window) = check(0, T0, 0, 10).unwrap();
        assert_eq!(tat, T0);
        assert_eq!(window.remaining, 10);
    }

    #[test]
    fn corrections_refund_down_to_now_and_charge_past_the_burst() {
        let tat = T0 + 40 * SECOND;
        assert_eq!(adjust(tat, T0, -90, 150), T0 + 4 * SECOND);
        assert_eq!(adjust(tat, T0, -1_000, 150), T0);
        // A refund on a full rule banks nothing.
        assert_eq!(adjust(0, T0, -50, 150), T0);
        // Actual usage beyond the estimate is charged even past the burst.
        let over = adjust(tat, T0, 100, 150);
        assert_eq!(over, T0 + 80 * SECOND);
        assert_eq!(
            check(over, T0, 0, 150).unwrap_err().retry_after,
            Duration::from_secs(20)
        );
        assert_eq!(window(over, T0, 150).remaining, 0);
    }

    #[test]
    fn levels_are_capped_so_lua_doubles_stay_exact() {
        assert_eq!(increment(u64::MAX, 1), MAX_LEVEL_US);
        assert_eq!(adjust_level(MAX_LEVEL_US, i64::MAX), MAX_LEVEL_US);
        assert_eq!(signed_increment(i64::MIN, 1), -(MAX_LEVEL_US as i64));
    }

    #[test]
    fn tightest_window_per_kind_is_the_one_with_least_remaining() {
        let rule = |scope, kind, per_minute| RateRule {
            scope,
            kind,
            per_minute,
        };
        let rules = [
            rule(Scope::Key, RateKind::Requests, 60),
            rule(Scope::Account, RateKind::Requests, 600),
            rule(Scope::Account, RateKind::Tokens, 1_000),
        ];
        // Key: 59 left; account: 300 left; tokens: 500 left.
        let windows = tightest(&rules, &[SECOND, 30 * SECOND, 30 * SECOND]);
        assert_eq!(
            windows.requests,
            Some(Window {
                limit: 60,
                remaining: 59,
                reset: Duration::from_secs(1)
            })
        );
        assert_eq!(windows.tokens.map(|w| w.remaining), Some(500));
        // Now the account rule is the tighter one.
        let windows = tightest(&rules, &[SECOND, 59_950 * 1_000, 0]);
        assert_eq!(
            windows.requests.map(|w| (w.limit, w.remaining)),
            Some((600, 0))
        );
        assert_eq!(windows.requests.map(|w| w.reset), Some(ms(59_950)));
        assert_eq!(tightest(&[], &[]), Windows::default());
    }
}
