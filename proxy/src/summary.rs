//! `GET /api/metrics` on the admin listener: one JSON answer for people and
//! simple uptime checkers, where Prometheus would need queries.
//!
//! Everything but the spend is read from memory: request counts and
//! latencies through handles on the metrics the data plane already records
//! (so the request path neither changes nor waits), queue depths from the admission queues, the fleet from the
//! pool and the controller. Request figures count since this Tollgate
//! started. Percentiles are *estimates* from histogram buckets, interpolated
//! linearly inside the bucket as PromQL's `histogram_quantile` does, so they
//! are only as fine as the buckets.
//!
//! The GPU spend of the current UTC day is the one figure from Postgres: the
//! time each backend spent in each state according to `instance_events`,
//! priced as the fleet controller prices it. When Postgres does not answer,
//! the rest is still served, with the spend `null`, an `errors` entry and
//! `"status": "degraded"`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use serde_json::{Value, json};
use tollgate_backends::fleet::controller::FleetController;
use tollgate_backends::fleet::providers::HourlyCost;
use tollgate_backends::fleet::state::InstanceState;
use tollgate_backends::routing::UpstreamSelector;

use crate::admission::AdmissionQueues;
use crate::config::{Config, ProviderConfig};
use crate::gateway::metrics::RequestFigures;

/// Said in the answer next to every percentile, so nobody reads them as exact.
const ESTIMATED_FROM: &str = "histogram buckets";
/// Status classes always listed, at 0 before any request: the ones the rates use.
const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];
/// An uptime checker should get its answer quickly even when Postgres hangs.
const SPEND_TIMEOUT: Duration = Duration::from_secs(2);
const DAY_SECS: u64 = 24 * 60 * 60;

/// The cost of each backend's time today, state by state: every transition
/// since midnight (UTC) and the last one before it (the state the day began
/// in); each span clipped to [midnight, now]. The span after a backend's last
/// transition runs until now, as in docs/fleet.md's cost query.
const SPEND_QUERY: &str = "\
WITH spans AS (
    SELECT backend, to_state, instance_id IS NOT NULL AS rented, hourly_cost, at,
           coalesce(lead(at) OVER (PARTITION BY backend ORDER BY at, id), $2) AS next_at
    FROM instance_events
    WHERE at >= $1
       OR id IN (SELECT DISTINCT ON (backend) id FROM instance_events
                 WHERE at < $1 ORDER BY backend, at DESC, id DESC)
)
SELECT backend, to_state, rented, hourly_cost,
       sum(extract(epoch FROM least(next_at, $2) - greatest(at, $1)))::float8 AS secs
FROM spans
WHERE next_at > $1 AND at < $2
GROUP BY backend, to_state, rented, hourly_cost";

/// What `GET /api/metrics` reads; built once at start.
pub struct Summary {
    started: Instant,
    /// Configured tier names, listed even before their first request.
    tiers: Vec<String>,
    /// Each configured backend's prices; `None` for a static backend, which
    /// the controller counts at $0.
    prices: Vec<(String, Option<HourlyCost>)>,
    pool: Pool,
    queues: Arc<AdmissionQueues>,
    selector: Arc<dyn UpstreamSelector>,
    fleet: Arc<FleetController>,
    /// The request metrics summarised, read through their own handles.
    figures: RequestFigures,
}

impl Summary {
    pub fn new(
        config: &Config,
        pool: Pool,
        queues: Arc<AdmissionQueues>,
        selector: Arc<dyn UpstreamSelector>,
        fleet: Arc<FleetController>,
        figures: RequestFigures,
    ) -> Self {
        Self {
            started: Instant::now(),
            tiers: config.tiers.iter().map(|t| t.name.clone()).collect(),
            prices: config
                .backends
                .iter()
                .map(|b| {
                    let priced = match b.provider {
                        ProviderConfig::Static => None,
                        ProviderConfig::Process { .. } | ProviderConfig::RunPod(_) => Some(b.cost),
                    };
                    (b.name.clone(), priced)
                })
                .collect(),
            pool,
            queues,
            selector,
            fleet,
            figures,
        }
    }

    /// The whole answer. Never fails: what cannot be read is `null` and
    /// explained under `errors`.
    pub async fn json(&self) -> Value {
        let mut errors: Vec<Value> = Vec::new();
        let (fleet, available) = self.fleet_json();
        if available == 0 {
            errors.push(json!({
                "source": "fleet",
                "message": "no backend is routable or able to wake"
            }));
        }
        let spend = match tokio::time::timeout(SPEND_TIMEOUT, self.spend_today()).await {
            Ok(Ok(spend)) => spend,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "GET /api/metrics: GPU spend not read");
                errors.push(
                    json!({"source": "postgres", "message": format!("GPU spend today: {e}")}),
                );
                Value::Null
            }
            Err(_) => {
                tracing::warn!("GET /api/metrics: GPU spend not read in time");
                errors.push(json!({
                    "source": "postgres",
                    "message": format!("GPU spend today: Postgres did not answer within {SPEND_TIMEOUT:?}"),
                }));
                Value::Null
            }
        };
        json!({
            "status": if errors.is_empty() { "ok" } else { "degraded" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "requests": requests_json(&collect(&self.figures.requests), &self.tiers),
            "latency_secs": percentiles_json(&collect(&self.figures.duration), &[0.5, 0.95, 0.99]),
            "overhead_secs": percentiles_json(&collect(&self.figures.overhead), &[0.5, 0.99]),
            "queues": self.queues_json(),
            "fleet": fleet,
            "gpu_spend_today": spend,
            "errors": errors,
        })
    }

    /// Depth and oldest wait per tier, over every pool.
    fn queues_json(&self) -> Value {
        let mut by_tier: BTreeMap<String, (usize, Duration)> = BTreeMap::new();
        for pool in self.queues.signals() {
            for tier in pool.tiers {
                let entry = by_tier.entry(tier.tier).or_default();
                entry.0 += tier.depth;
                entry.1 = entry.1.max(tier.oldest_wait);
            }
        }
        let depth: usize = by_tier.values().map(|(depth, _)| depth).sum();
        let by_tier: serde_json::Map<String, Value> = by_tier
            .into_iter()
            .map(|(tier, (depth, oldest))| {
                let queue = json!({"depth": depth, "oldest_wait_secs": oldest.as_secs_f64()});
                (tier, queue)
            })
            .collect();
        json!({"depth": depth, "by_tier": by_tier})
    }

    /// The fleet's JSON and how many backends can serve: routable now, or
    /// scaled down and woken on demand (a fleet at zero is idle, not down).
    fn fleet_json(&self) -> (Value, usize) {
        let mut by_state: serde_json::Map<String, Value> = InstanceState::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), json!(0)))
            .collect();
        let (mut healthy, mut routable, mut available) = (0, 0, 0);
        // Both lists are in config order, one entry per backend.
        let backends: Vec<Value> = self
            .selector
            .statuses()
            .into_iter()
            .zip(self.fleet.statuses())
            .map(|(backend, life)| {
                let state = life.state.as_str();
                if let Some(count) = by_state.get_mut(state) {
                    *count = json!(count.as_u64().unwrap_or(0) + 1);
                }
                healthy += usize::from(backend.healthy);
                routable += usize::from(backend.routable);
                let wakes_on_demand = matches!(
                    life.state,
                    InstanceState::Cold
                        | InstanceState::Provisioning
                        | InstanceState::Warm
                        | InstanceState::Starting
                );
                available += usize::from(backend.routable || wakes_on_demand);
                json!({
                    "name": backend.name,
                    "state": state,
                    "healthy": backend.healthy,
                    "routable": backend.routable,
                })
            })
            .collect();
        let fleet = json!({
            "by_state": by_state,
            "healthy": healthy,
            "routable": routable,
            "backends": backends,
        });
        (fleet, available)
    }

    async fn spend_today(&self) -> anyhow::Result<Value> {
        let now = SystemTime::now();
        let since_epoch = now.duration_since(UNIX_EPOCH)?.as_secs();
        let midnight = UNIX_EPOCH + Duration::from_secs(since_epoch - since_epoch % DAY_SECS);
        let client = self.pool.get().await?;
        let rows = client.query(SPEND_QUERY, &[&midnight, &now]).await?;
        let spans: Vec<Span> = rows
            .iter()
            .map(|row| Span {
                backend: row.get(0),
                state: row.get(1),
                rented: row.get(2),
                recorded_hourly: row.get(3),
                secs: row.get(4),
            })
            .collect();
        let (dollars, by_backend) = price(&spans, &self.prices);
        let day = humantime::format_rfc3339_seconds(midnight).to_string();
        Ok(json!({
            "dollars": dollars,
            "day": day.get(..10).unwrap_or(&day),
            "by_backend": by_backend,
        }))
    }
}

/// Counts by status class and tier, and the shares of 2xx, 4xx and 5xx.
fn requests_json(requests: &MetricFamily, tiers: &[String]) -> Value {
    let mut by_status: BTreeMap<String, u64> = STATUS_CLASSES
        .iter()
        .map(|s| ((*s).to_owned(), 0))
        .collect();
    let mut by_tier: BTreeMap<String, u64> = tiers.iter().map(|t| (t.clone(), 0)).collect();
    let mut total = 0;
    for metric in requests.get_metric() {
        // Counters hold whole numbers of requests.
        let count = metric.get_counter().get_value().round() as u64;
        total += count;
        for label in metric.get_label() {
            let counts = match label.name() {
                "status" => &mut by_status,
                "tier" => &mut by_tier,
                _ => continue,
            };
            *counts.entry(label.value().to_owned()).or_default() += count;
        }
    }
    let share = |class: &str| {
        let count = by_status.get(class).copied().unwrap_or(0);
        (total > 0).then(|| count as f64 / total as f64)
    };
    json!({
        "total": total,
        "by_status": by_status,
        "by_tier": by_tier,
        "success_rate": share("2xx"),
        "client_error_rate": share("4xx"),
        "server_error_rate": share("5xx"),
    })
}

/// The `quantiles` of a histogram over all its series, `null` each before
/// the first observation.
fn percentiles_json(histogram: &MetricFamily, quantiles: &[f64]) -> Value {
    let buckets = merged_buckets(histogram);
    let mut answer = serde_json::Map::new();
    for q in quantiles {
        let key = format!("p{}", (q * 100.0).round());
        answer.insert(key, json!(histogram_quantile(*q, &buckets)));
    }
    answer.insert(
        "observations".to_owned(),
        json!(buckets.last().map_or(0, |(_, count)| *count)),
    );
    answer.insert("estimated_from".to_owned(), json!(ESTIMATED_FROM));
    answer.insert("histogram".to_owned(), json!(histogram.name()));
    Value::Object(answer)
}

/// A metric vector's one family, as a scrape would show it.
fn collect(metric: &impl Collector) -> MetricFamily {
    metric.collect().into_iter().next().unwrap_or_default()
}

/// The cumulative buckets of every series of a histogram, summed by upper
/// bound (`sum by (le)`), ending with `+Inf`; empty when the family has no
/// series yet.
fn merged_buckets(family: &MetricFamily) -> Vec<(f64, u64)> {
    if family.get_metric().is_empty() {
        return Vec::new();
    }
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let mut observations = 0;
    for metric in family.get_metric() {
        let histogram = metric.get_histogram();
        observations += histogram.get_sample_count();
        // The client library leaves `+Inf` implicit: it is the sample count.
        for bucket in histogram.get_bucket() {
            let bound = bucket.upper_bound();
            if bound.is_infinite() {
                continue;
            }
            match buckets.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, count)) => *count += bucket.cumulative_count(),
                None => buckets.push((bound, bucket.cumulative_count())),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets.push((f64::INFINITY, observations));
    buckets
}

/// PromQL's `histogram_quantile` on cumulative `(upper bound, count)`
/// buckets sorted by bound, the last `+Inf`: the bucket holding the
/// quantile's rank is found and the value interpolated linearly inside it
/// (the first bucket starts at 0). `None` without observations or with no
/// finite bucket. A rank in the `+Inf` bucket gives the highest finite
/// bound: all that is known is that it is at least that.
fn histogram_quantile(q: f64, buckets: &[(f64, u64)]) -> Option<f64> {
    let (last_bound, observations) = *buckets.last()?;
    if !last_bound.is_infinite() || buckets.len() < 2 || observations == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * observations as f64;
    let finite = &buckets[..buckets.len() - 1];
    let Some(b) = finite.iter().position(|(_, count)| *count as f64 >= rank) else {
        return finite.last().map(|(bound, _)| *bound);
    };
    let (end, count) = finite[b];
    if b == 0 && end <= 0.0 {
        return Some(end);
    }
    let (start, below) = if b == 0 { (0.0, 0) } else { finite[b - 1] };
    let in_bucket = count.saturating_sub(below) as f64;
    if in_bucket == 0.0 {
        // Only when q is 0 and the first bucket is empty.
        return Some(start);
    }
    Some(start + (end - start) * (rank - below as f64) / in_bucket)
}

/// Time a backend spent today in one state, as `instance_events` records it.
#[derive(Debug, Clone, PartialEq)]
struct Span {
    backend: String,
    state: String,
    /// An instance was held (a failed slot still rented bills as running).
    rented: bool,
    /// The price written with the transition.
    recorded_hourly: f64,
    secs: f64,
}

/// Today's cost in total and per backend. A configured backend is priced
/// as the controller prices it (`hourly`): its running price in a state
/// that `bills_running` or failed with an instance still rented, its stopped
/// price when `bills_stopped`, else nothing; a static one at $0. A backend
/// no longer configured keeps the price recorded with its transitions.
fn price(spans: &[Span], prices: &[(String, Option<HourlyCost>)]) -> (f64, BTreeMap<String, f64>) {
    let mut by_backend: BTreeMap<String, f64> =
        prices.iter().map(|(name, _)| (name.clone(), 0.0)).collect();
    for span in spans {
        let state = InstanceState::ALL
            .into_iter()
            .find(|s| s.as_str() == span.state);
        let hourly = match (prices.iter().find(|(name, _)| *name == span.backend), state) {
            (Some((_, None)), _) => 0.0,
            (Some((_, Some(cost))), Some(state)) => {
                if state.bills_running() || (state == InstanceState::Failed && span.rented) {
                    cost.running
                } else if state.bills_stopped() {
                    cost.stopped
                } else {
                    0.0
                }
            }
            (None, _) | (_, None) => span.recorded_hourly,
        };
        *by_backend.entry(span.backend.clone()).or_default() +=
            hourly * span.secs.max(0.0) / 3600.0;
    }
    (by_backend.values().sum(), by_backend)
}

#[cfg(test)]
mod tests {
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
    use tollgate_metering::metric_names;

    use super::*;

    const INF: f64 = f64::INFINITY;

    fn close(actual: Option<f64>, expected: f64) -> bool {
        actual.is_some_and(|a| (a - expected).abs() < 1e-9)
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_promql() {
        let buckets = [(0.1, 10), (0.5, 30), (1.0, 40), (INF, 40)];
        // Rank 20 is half-way through (0.1, 0.5]'s 20 observations.
        assert!(close(histogram_quantile(0.5, &buckets), 0.3));
        // Rank 39.6: 9.6 of (0.5, 1.0]'s 10.
        assert!(close(histogram_quantile(0.99, &buckets), 0.98));
        // The first bucket starts at 0: rank 5 of 10 in (0, 0.1].
        assert!(close(histogram_quantile(0.125, &buckets), 0.05));
    }

    #[test]
    fn no_observations_give_no_quantile() {
        assert_eq!(histogram_quantile(0.5, &[]), None);
        assert_eq!(
            histogram_quantile(0.5, &[(0.1, 0), (1.0, 0), (INF, 0)]),
            None
        );
    }

    #[test]
    fn observations_all_past_the_last_bound_give_that_bound() {
        let buckets = [(0.1, 0), (1.0, 0), (INF, 5)];
        assert_eq!(histogram_quantile(0.5, &buckets), Some(1.0));
        assert_eq!(histogram_quantile(0.99, &buckets), Some(1.0));
    }

    #[test]
    fn one_finite_bucket_interpolates_from_zero() {
        assert!(close(histogram_quantile(0.5, &[(2.0, 4), (INF, 4)]), 1.0));
        // Past it, only the bound is known.
        assert_eq!(histogram_quantile(0.99, &[(2.0, 4), (INF, 8)]), Some(2.0));
        // No finite bucket at all: nothing to interpolate in.
        assert_eq!(histogram_quantile(0.5, &[(INF, 4)]), None);
    }

    #[test]
    fn quantiles_are_ordered() {
        let buckets = [(0.005, 1), (0.01, 1), (0.05, 7), (1.0, 9), (INF, 10)];
        let p = |q| histogram_quantile(q, &buckets).unwrap();
        assert!(p(0.5) <= p(0.95) && p(0.95) <= p(0.99), "{buckets:?}");
    }

    /// Requests and durations as `RequestMetrics` counts them, empty.
    fn vectors() -> (IntCounterVec, HistogramVec) {
        let requests = IntCounterVec::new(
            Opts::new(metric_names::REQUESTS_TOTAL, "r"),
            &["tier", "status"],
        )
        .unwrap();
        let duration = HistogramVec::new(
            HistogramOpts::new(metric_names::REQUEST_DURATION_SECONDS, "d").buckets(vec![0.1, 1.0]),
            &["tier"],
        )
        .unwrap();
        (requests, duration)
    }

    fn counted() -> (MetricFamily, MetricFamily) {
        let (requests, duration) = vectors();
        requests.with_label_values(&["pro", "2xx"]).inc_by(3);
        requests.with_label_values(&["none", "4xx"]).inc();
        for (tier, seconds) in [("pro", 0.05), ("pro", 0.5), ("free", 0.5), ("free", 5.0)] {
            duration.with_label_values(&[tier]).observe(seconds);
        }
        (collect(&requests), collect(&duration))
    }

    #[test]
    fn requests_are_counted_by_status_class_and_tier() {
        let tiers = ["free".to_owned(), "pro".to_owned()];
        let requests = requests_json(&counted().0, &tiers);
        assert_eq!(requests["total"], 4);
        assert_eq!(requests["by_status"], json!({"2xx": 3, "4xx": 1, "5xx": 0}));
        assert_eq!(requests["by_tier"], json!({"free": 0, "none": 1, "pro": 3}));
        assert_eq!(requests["success_rate"], 0.75);
        assert_eq!(requests["client_error_rate"], 0.25);
        assert_eq!(requests["server_error_rate"], 0.0);
    }

    #[test]
    fn before_any_request_counts_are_zero_and_rates_null() {
        let (requests, duration) = vectors();
        let requests = requests_json(&collect(&requests), &["pro".to_owned()]);
        assert_eq!(requests["total"], 0);
        assert_eq!(requests["by_tier"], json!({"pro": 0}));
        assert_eq!(requests["success_rate"], Value::Null);
        let latency = percentiles_json(&collect(&duration), &[0.5, 0.99]);
        assert_eq!(latency["p50"], Value::Null);
        assert_eq!(latency["observations"], 0);
        assert_eq!(latency["histogram"], metric_names::REQUEST_DURATION_SECONDS);
    }

    #[test]
    fn series_are_summed_by_bucket_before_the_quantile() {
        let duration = counted().1;
        assert_eq!(merged_buckets(&duration), [(0.1, 1), (1.0, 3), (INF, 4)]);
        let latency = percentiles_json(&duration, &[0.5, 0.95, 0.99]);
        // Rank 2 of 4: the first of (0.1, 1.0]'s two.
        assert!(close(latency["p50"].as_f64(), 0.55));
        assert_eq!(latency["p99"], 1.0);
        assert_eq!(latency["observations"], 4);
        assert_eq!(latency["estimated_from"], ESTIMATED_FROM);
    }

    fn span(backend: &str, state: &str, rented: bool, secs: f64) -> Span {
        Span {
            backend: backend.to_owned(),
            state: state.to_owned(),
            rented,
            recorded_hourly: 9.0,
            secs,
        }
    }

    #[test]
    fn spend_prices_states_as_the_controller_does() {
        let prices = [
            (
                "gpu".to_owned(),
                Some(HourlyCost {
                    running: 2.0,
                    stopped: 0.1,
                }),
            ),
            ("static".to_owned(), None),
        ];
        let spans = [
            span("gpu", "hot", true, 1800.0),
            span("gpu", "warm", true, 3600.0),
            span("gpu", "cold", false, 3600.0),
            // Failed with the instance still rented bills as running; not without.
            span("gpu", "failed", true, 360.0),
            span("gpu", "failed", false, 3600.0),
            span("static", "hot", false, 3600.0),
            // Gone from the config: the price written with its transitions.
            span("retired", "hot", true, 400.0),
        ];
        let (total, by_backend) = price(&spans, &prices);
        assert!(
            (by_backend["gpu"] - (1.0 + 0.1 + 0.2)).abs() < 1e-9,
            "{by_backend:?}"
        );
        assert_eq!(by_backend["static"], 0.0);
        assert!((by_backend["retired"] - 1.0).abs() < 1e-9);
        assert!((total - 2.3).abs() < 1e-9, "{total}");
    }
}
