//! [`RedisLimits`]: limit state in Redis, shared by every instance.
//!
//! Each [`LimitStore`] call is one Lua script (`EVALSHA`, loaded again
//! after a `NOSCRIPT`), so a request costs one round trip and a script runs
//! whole or not at all. Scripts read the time with `TIME`, so every instance
//! agrees on it whatever their own clocks say. The GCRA arithmetic that turns
//! the scripts' levels into verdicts and headers is [`gcra`]'s, shared with
//! [`LocalLimits`](super::local::LocalLimits); the scripts only keep TATs.
//!
//! Keys, all under the account's hash tag so that a script touches one
//! cluster slot (`P` is the prefix, `A` the account id):
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `P:{A}:rate:key:<key id>:rpm` / `:tpm` | string | a key's GCRA TAT, µs | when full again, + 1 s |
//! | `P:{A}:rate:acct:rpm` / `:tpm` | string | the account's GCRA TAT | same |
//! | `P:{A}:q:m:<month>` | hash | `used`, `reserved` units; `primed` once its counters are known (restore.lua) | 40 days after the last write |
//! | `P:{A}:q:d:<day>` | hash | `used`, `reserved` units | 3 days after the last write |
//! | `P:{A}:res` | zset | live reservation ids, scored by expiry (ms) | with the month hash |
//! | `P:{A}:resv` | hash | reservation id → units and the period keys to give them back to | same |
//!
//! Every key a script touches is in its `KEYS`, except that purging a lapsed
//! reservation gives its units back to the period hashes recorded with it,
//! which are those of the day it was made (the same slot, by the hash tag).

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{Client, ClientLike, LuaInterface, Options};
use fred::types::Value;
use fred::types::scripts::Script;
use uuid::Uuid;

use super::local::reservation;
use super::{
    AdmitRequest, LimitStore, Period, Periods, QuotaState, RateKind, RateRule, Reservation, Scope,
    Settlement, Snapshot, StoreError, Verdict, gcra,
};

/// A month hash lives past its month for late settlements and for
/// reconciliation after the month closes; 40 days covers the longest month
/// and a week more.
const MONTH_TTL: Duration = Duration::from_secs(40 * 86_400);
/// A day hash lives past its day for late settlements and reconciliation.
const DAY_TTL: Duration = Duration::from_secs(3 * 86_400);
/// A GCRA key is kept this long past the moment its rule is full again, so
/// it never expires while it still matters, whatever the rounding.
const RATE_KEY_MARGIN: Duration = Duration::from_secs(1);

/// Settlement is off the critical path (the answer is sent): it may take
/// longer than an admission before it is given up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

const COMMON: &str = include_str!("common.lua");

pub struct RedisLimits {
    client: Client,
    prefix: String,
    timeout: Duration,
    admit: Script,
    settle: Script,
    reconcile: Script,
    state: Script,
    restore: Script,
}

impl RedisLimits {
    /// `prefix` starts every key (e.g. `tollgate:limits`). Each call but a
    /// settlement gives up after `timeout`.
    pub fn new(client: Client, prefix: impl Into<String>, timeout: Duration) -> Self {
        let with_common = |body: &str| Script::from_lua(format!("{COMMON}\n{body}"));
        Self {
            client,
            prefix: prefix.into(),
            timeout,
            admit: with_common(include_str!("admit.lua")),
            settle: with_common(include_str!("settle.lua")),
            reconcile: Script::from_lua(include_str!("reconcile.lua")),
            state: with_common(include_str!("state.lua")),
            restore: with_common(include_str!("restore.lua")),
        }
    }

    /// The account's key prefix, `P:{A}`, its hash tag the account id.
    fn account_base(&self, account: Uuid) -> String {
        format!("{}:{{{account}}}", self.prefix)
    }

    /// The four quota keys: month hash, day hash, reservations, records.
    fn quota_keys(&self, account: Uuid, periods: &Periods) -> Vec<String> {
        let base = self.account_base(account);
        vec![
            format!("{base}:q:m:{}", periods.month),
            format!("{base}:q:d:{}", periods.day),
            format!("{base}:res"),
            format!("{base}:resv"),
        ]
    }

    /// Runs `script` once within `timeout`. One attempt, failing at once
    /// while disconnected, and fred's own timeout (not just a dropped
    /// future): a call given up on is never replayed after a reconnect, so a
    /// refused or settled request cannot be admitted again behind our back.
    async fn call(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Vec<i64>, StoreError> {
        let client = self.client.with_options(&Options {
            max_attempts: Some(1),
            fail_fast: true,
            timeout: Some(timeout),
            ..Options::default()
        });
        let reply: Value = match client
            .evalsha(script.sha1().clone(), keys.clone(), args.clone())
            .await
        {
            Err(error) if error.details().starts_with("NOSCRIPT") => {
                script.load(&self.client).await?;
                client.evalsha(script.sha1().clone(), keys, args).await?
            }
            reply => reply?,
        };
        match reply {
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::Integer(n) => Ok(n),
                    other => Err(StoreError::Protocol(format!(
                        "a non-integer in a script reply: {other:?}"
                    ))),
                })
                .collect(),
            Value::Integer(n) => Ok(vec![n]),
            other => Err(StoreError::Protocol(format!(
                "an unexpected script reply: {other:?}"
            ))),
        }
    }
}

/// The GCRA key of a rule: the key's or the account's, per kind.
fn rate_key(base: &str, rule: &RateRule, key: Uuid) -> String {
    let kind = match rule.kind {
        RateKind::Requests => "rpm",
        RateKind::Tokens => "tpm",
    };
    match rule.scope {
        Scope::Key => format!("{base}:rate:key:{key}:{kind}"),
        Scope::Account => format!("{base}:rate:acct:{kind}"),
    }
}

fn millis(duration: Duration) -> Value {
    int(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// An unsigned argument. Lua reads numbers as doubles, exact below 2^53:
/// larger units or caps (far beyond any real quota) are clamped there.
fn int(n: u64) -> Value {
    const LUA_EXACT: u64 = 1 << 53;
    Value::Integer(i64::try_from(n.min(LUA_EXACT)).unwrap_or(i64::MAX))
}

/// A limit argument: -1 for none.
fn cap(limit: Option<u64>) -> Value {
    limit.map_or(Value::Integer(-1), int)
}

fn levels(reply: &[i64]) -> Vec<u64> {
    reply
        .iter()
        .map(|level| u64::try_from(*level).unwrap_or(0))
        .collect()
}

#[async_trait]
impl LimitStore for RedisLimits {
    async fn admit(&self, request: &AdmitRequest) -> Result<Verdict, StoreError> {
        let base = self.account_base(request.account);
        let mut keys = self.quota_keys(request.account, &request.periods);
        keys.extend(
            request
                .rates
                .iter()
                .map(|rule| rate_key(&base, rule, request.key)),
        );
        let quota = &request.quota;
        let month_cap = if quota.hard_cap {
            quota.included_units
        } else {
            None
        };
        let mut args = vec![
            Value::from(request.reservation_id.to_string()),
            int(request.estimate_units),
            cap(month_cap),
            cap(quota.daily_cap),
            cap(quota.max_concurrent),
            millis(request.reservation_ttl),
            millis(MONTH_TTL),
            millis(DAY_TTL),
            int(gcra::BURST_US),
            int(gcra::MAX_LEVEL_US),
            millis(RATE_KEY_MARGIN),
            int(request.min_units),
            int(u64::from(request.dry_run)),
        ];
        args.extend(request.rates.iter().map(|rule| {
            let cost = match rule.kind {
                RateKind::Requests => 1,
                RateKind::Tokens => request.estimate_tokens,
            };
            int(gcra::increment(cost, rule.per_minute))
        }));

        let reply = self.call(&self.admit, keys, args, self.timeout).await?;
        let unexpected = || StoreError::Protocol(format!("admit.lua returned {reply:?}"));
        let Some((&[status, failed, retry_after_us], rest)) = reply.split_first_chunk::<3>() else {
            return Err(unexpected());
        };
        Ok(match status {
            0 | 1 if rest.len() != request.rates.len() => return Err(unexpected()),
            0 => Verdict::Admitted {
                // The second field of an admission is the units granted.
                reservation: reservation(request, u64::try_from(failed).unwrap_or(0)),
                windows: gcra::tightest(&request.rates, &levels(rest)),
            },
            1 => Verdict::RateLimited {
                rule: usize::try_from(failed)
                    .ok()
                    .and_then(|index| request.rates.get(index))
                    .copied()
                    .ok_or_else(unexpected)?,
                retry_after: Duration::from_micros(u64::try_from(retry_after_us).unwrap_or(0)),
                windows: gcra::tightest(&request.rates, &levels(rest)),
            },
            2 => Verdict::Concurrency {
                limit: quota.max_concurrent.ok_or_else(unexpected)?,
            },
            3 => Verdict::QuotaExhausted {
                period: Period::Month,
            },
            4 => Verdict::QuotaExhausted {
                period: Period::Day,
            },
            5 => return Err(StoreError::Unprimed),
            _ => return Err(unexpected()),
        })
    }

    async fn settle(
        &self,
        reservation: &Reservation,
        actual: Settlement,
    ) -> Result<(), StoreError> {
        let base = self.account_base(reservation.account);
        let mut keys = self.quota_keys(reservation.account, &reservation.periods);
        let corrections = reservation.corrections(actual);
        keys.extend(
            corrections
                .iter()
                .map(|(rule, _)| rate_key(&base, rule, reservation.key)),
        );
        let mut args = vec![
            Value::from(reservation.id.to_string()),
            int(actual.units),
            millis(MONTH_TTL),
            millis(DAY_TTL),
            int(gcra::MAX_LEVEL_US),
            millis(RATE_KEY_MARGIN),
        ];
        args.extend(
            corrections.iter().map(|(rule, delta)| {
                Value::Integer(gcra::signed_increment(*delta, rule.per_minute))
            }),
        );
        self.call(&self.settle, keys, args, SETTLE_TIMEOUT.max(self.timeout))
            .await?;
        Ok(())
    }

    async fn reconcile(
        &self,
        account: Uuid,
        periods: &Periods,
        month_units: u64,
        day_units: u64,
    ) -> Result<(), StoreError> {
        let mut keys = self.quota_keys(account, periods);
        keys.truncate(2);
        let args = vec![
            int(month_units),
            int(day_units),
            millis(MONTH_TTL),
            millis(DAY_TTL),
        ];
        self.call(&self.reconcile, keys, args, self.timeout).await?;
        Ok(())
    }

    async fn restore(
        &self,
        account: Uuid,
        periods: &Periods,
        known: &Snapshot,
    ) -> Result<(), StoreError> {
        let keys = self.quota_keys(account, periods);
        let mut args = vec![
            int(known.month_used),
            int(known.day_used),
            millis(MONTH_TTL),
            millis(DAY_TTL),
        ];
        for held in &known.reservations {
            args.push(Value::from(held.id.to_string()));
            args.push(int(held.units));
            args.push(millis(held.remaining));
        }
        self.call(&self.restore, keys, args, self.timeout).await?;
        Ok(())
    }

    async fn quota_state(
        &self,
        account: Uuid,
        periods: &Periods,
    ) -> Result<QuotaState, StoreError> {
        let keys = self.quota_keys(account, periods);
        let reply = self
            .call(&self.state, keys, Vec::new(), self.timeout)
            .await?;
        let &[
            month_used,
            month_reserved,
            day_used,
            day_reserved,
            in_progress,
        ] = reply.as_slice()
        else {
            return Err(StoreError::Protocol(format!(
                "state.lua returned {reply:?}"
            )));
        };
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(QuotaState {
            month_used: count(month_used),
            month_reserved: count(month_reserved),
            day_used: count(day_used),
            day_reserved: count(day_reserved),
            in_progress: count(in_progress),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_an_account_shares_its_hash_tag() {
        let client = fred::prelude::Builder::default_centralized()
            .build()
            .unwrap();
        let store = RedisLimits::new(client, "tollgate:limits", Duration::from_secs(1));
        let account = Uuid::now_v7();
        let key = Uuid::now_v7();
        let base = store.account_base(account);
        assert_eq!(base, format!("tollgate:limits:{{{account}}}"));
        let periods = Periods {
            month: "2026-11".to_owned(),
            day: "2026-11-23".to_owned(),
        };
        let rule = |scope, kind| RateRule {
            scope,
            kind,
            per_minute: 1,
        };
        let mut keys = vec![
            rate_key(&base, &rule(Scope::Key, RateKind::Requests), key),
            rate_key(&base, &rule(Scope::Key, RateKind::Tokens), key),
            rate_key(&base, &rule(Scope::Account, RateKind::Requests), key),
            rate_key(&base, &rule(Scope::Account, RateKind::Tokens), key),
        ];
        keys.extend(store.quota_keys(account, &periods));
        let tag = format!("{{{account}}}");
        for k in &keys {
            // The hash tag is the first {...} of the key.
            let open = k.find('{').unwrap();
            let close = open + k[open..].find('}').unwrap();
            assert_eq!(&k[open..=close], tag, "{k}");
        }
        assert_eq!(keys[0], format!("{base}:rate:key:{key}:rpm"));
        assert_eq!(keys[3], format!("{base}:rate:acct:tpm"));
        assert_eq!(keys[4], format!("{base}:q:m:2026-11"));
        assert_eq!(keys[7], format!("{base}:resv"));
    }
}
