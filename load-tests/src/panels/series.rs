//! PromQL's arithmetic over a recording, for the few shapes the dashboards
//! use: `sum by (..) (gauge)`, `sum by (..) (rate(counter[w]))` and
//! `histogram_quantile(q, sum by (.., le) (rate(h_bucket[w])))`.
//!
//! Rates follow Prometheus: each series' increase is computed on its own
//! (a value that drops is a counter reset, after which the whole new value
//! counts), then series are summed. Unlike Prometheus, a series that first
//! appears within the recording is taken to have started from 0 at the
//! previous scrape: the `prometheus` crate creates a labelled child on its
//! first increment, so its first value is all new. There is no
//! extrapolation to the window's edges: a rate is the increase between two
//! real scrapes divided by the time between them.

use std::collections::{BTreeMap, BTreeSet};

use crate::scrape::{Scrape, SeriesId};

/// One line per group (the values of the `by` labels), one point per scrape:
/// `(seconds since the first scrape, value)`, `None` where there is none.
pub type Grouped = BTreeMap<Vec<String>, Vec<(f64, Option<f64>)>>;

/// `sum by (by) (name)` at every scrape.
pub fn gauge_sum(scrapes: &[Scrape], name: &str, by: &[&str]) -> Grouped {
    let groups = groups(scrapes, name, by);
    let start = start(scrapes);
    groups
        .into_iter()
        .map(|group| {
            let points = scrapes
                .iter()
                .map(|scrape| {
                    let values: Vec<f64> =
                        matching(scrape, name, by, &group).map(|(_, v)| v).collect();
                    let value = (!values.is_empty()).then(|| values.iter().sum());
                    (scrape.at - start, value)
                })
                .collect();
            (group, points)
        })
        .collect()
}

/// `sum by (by) (rate(name[window]))` at every scrape at least `window`
/// seconds after the first.
pub fn rate_sum(scrapes: &[Scrape], name: &str, by: &[&str], window: f64) -> Grouped {
    let groups = groups(scrapes, name, by);
    let start = start(scrapes);
    let mut out: Grouped = groups.iter().map(|g| (g.clone(), Vec::new())).collect();
    for (i, scrape) in scrapes.iter().enumerate() {
        let Some(j) = window_start(scrapes, i, window) else {
            continue;
        };
        let increases = increases(&scrapes[j..=i], name);
        let elapsed = scrape.at - scrapes[j].at;
        for (group, points) in &mut out {
            let total: f64 = increases
                .iter()
                .filter(|(id, _)| group_of(id, by) == *group)
                .map(|(_, inc)| inc)
                .sum();
            points.push((scrape.at - start, Some(total / elapsed)));
        }
    }
    out
}

/// `histogram_quantile(q, sum by (by, le) (rate(name_bucket[window])))`:
/// `None` at scrapes whose window saw no observation.
pub fn quantile(scrapes: &[Scrape], name: &str, q: f64, by: &[&str], window: f64) -> Grouped {
    let bucket = format!("{name}_bucket");
    let groups = groups(scrapes, &bucket, by);
    let start = start(scrapes);
    let mut out: Grouped = groups.iter().map(|g| (g.clone(), Vec::new())).collect();
    for i in 0..scrapes.len() {
        let Some(j) = window_start(scrapes, i, window) else {
            continue;
        };
        let increases = increases(&scrapes[j..=i], &bucket);
        for (group, points) in &mut out {
            // Sum by upper bound across the group's series (`sum by (le)`).
            let mut by_le: Vec<(f64, f64)> = Vec::new();
            for (id, inc) in increases
                .iter()
                .filter(|(id, _)| group_of(id, by) == *group)
            {
                let Some(le) = id.label("le").and_then(le_bound) else {
                    continue;
                };
                match by_le.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, count)) => *count += inc,
                    None => by_le.push((le, *inc)),
                }
            }
            points.push((scrapes[i].at - start, histogram_quantile(q, by_le)));
        }
    }
    out
}

/// Prometheus' `histogram_quantile` over cumulative `(upper bound, count)`
/// buckets: linear interpolation inside the bucket holding the rank, the
/// first bucket starting at 0, and the highest finite bound when the rank
/// falls in `+Inf`. `None` without a `+Inf` bucket or without observations.
pub fn histogram_quantile(q: f64, mut buckets: Vec<(f64, f64)>) -> Option<f64> {
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.len() < 2 || buckets.last().is_none_or(|(le, _)| *le != f64::INFINITY) {
        return None;
    }
    // Counts summed from separately computed rates can dip by a rounding
    // error; a cumulative histogram never decreases.
    for i in 1..buckets.len() {
        buckets[i].1 = buckets[i].1.max(buckets[i - 1].1);
    }
    let total = buckets.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let index = buckets.iter().position(|(_, count)| *count >= rank)?;
    if index == buckets.len() - 1 {
        return Some(buckets[index - 1].0);
    }
    let (upper, count) = buckets[index];
    let (lower, below) = match index {
        0 => (0.0, 0.0),
        _ => buckets[index - 1],
    };
    if count <= below {
        return Some(lower);
    }
    Some(lower + (upper - lower) * (rank - below) / (count - below))
}

/// How much a counter grew from `prev` to `cur`: a drop is a reset (the
/// process restarted), after which all of `cur` is new.
pub fn increase(prev: f64, cur: f64) -> f64 {
    if cur >= prev { cur - prev } else { cur }
}

/// Each series' increase over consecutive scrapes of `window` (reset-aware
/// step by step, so a reset inside the window loses nothing).
fn increases<'a>(window: &'a [Scrape], name: &str) -> BTreeMap<&'a SeriesId, f64> {
    let mut out = BTreeMap::new();
    for pair in window.windows(2) {
        for (id, cur) in pair[1].samples.iter().filter(|(id, _)| id.name == name) {
            let prev = pair[0].samples.get(id).copied().unwrap_or(0.0);
            *out.entry(id).or_insert(0.0) += increase(prev, *cur);
        }
    }
    out
}

/// The latest scrape at least `window` seconds before scrape `i`.
fn window_start(scrapes: &[Scrape], i: usize, window: f64) -> Option<usize> {
    let at = scrapes.get(i)?.at;
    (0..i).rev().find(|&j| at - scrapes[j].at >= window)
}

fn start(scrapes: &[Scrape]) -> f64 {
    scrapes.first().map_or(0.0, |s| s.at)
}

/// Every group of `name`'s series seen anywhere in the recording.
fn groups(scrapes: &[Scrape], name: &str, by: &[&str]) -> BTreeSet<Vec<String>> {
    scrapes
        .iter()
        .flat_map(|s| s.samples.keys())
        .filter(|id| id.name == name)
        .map(|id| group_of(id, by))
        .collect()
}

fn matching<'a>(
    scrape: &'a Scrape,
    name: &'a str,
    by: &'a [&'a str],
    group: &'a [String],
) -> impl Iterator<Item = (&'a SeriesId, f64)> + 'a {
    scrape
        .samples
        .iter()
        .filter(move |(id, _)| id.name == name && group_of(id, by) == group)
        .map(|(id, v)| (id, *v))
}

fn group_of(id: &SeriesId, by: &[&str]) -> Vec<String> {
    by.iter()
        .map(|l| id.label(l).unwrap_or_default().to_owned())
        .collect()
}

fn le_bound(raw: &str) -> Option<f64> {
    match raw {
        "+Inf" => Some(f64::INFINITY),
        _ => raw.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::parse;

    fn scrape(at: f64, text: &str) -> Scrape {
        Scrape {
            at,
            samples: parse(text).unwrap(),
        }
    }

    fn values(grouped: &Grouped, group: &[&str]) -> Vec<Option<f64>> {
        let key: Vec<String> = group.iter().map(|s| (*s).to_owned()).collect();
        grouped[&key].iter().map(|(_, v)| *v).collect()
    }

    #[test]
    fn rate_survives_a_counter_reset() {
        // 10/s, then the process restarts between t=2 and t=3 and counts 5 again.
        let scrapes = [
            scrape(0.0, "c{tier=\"pro\"} 100"),
            scrape(1.0, "c{tier=\"pro\"} 110"),
            scrape(2.0, "c{tier=\"pro\"} 120"),
            scrape(3.0, "c{tier=\"pro\"} 5"),
        ];
        let rates = rate_sum(&scrapes, "c", &["tier"], 1.0);
        assert_eq!(
            values(&rates, &["pro"]),
            [Some(10.0), Some(10.0), Some(5.0)]
        );
        // Over a window spanning the reset: 10 + 10 + 5 in 3 s, never negative.
        let rates = rate_sum(&scrapes, "c", &["tier"], 3.0);
        assert_eq!(values(&rates, &["pro"]), [Some(25.0 / 3.0)]);
    }

    #[test]
    fn rate_sums_series_per_group_and_counts_a_new_series_from_zero() {
        let scrapes = [
            scrape(0.0, "r{tier=\"free\",reason=\"busy\"} 4"),
            scrape(
                2.0,
                "r{tier=\"free\",reason=\"busy\"} 8\nr{tier=\"pro\",reason=\"busy\"} 2\n\
                 r{tier=\"pro\",reason=\"queue_timeout\"} 6",
            ),
        ];
        let rates = rate_sum(&scrapes, "r", &["reason"], 2.0);
        assert_eq!(values(&rates, &["busy"]), [Some(3.0)]);
        assert_eq!(values(&rates, &["queue_timeout"]), [Some(3.0)]);
    }

    #[test]
    fn gauge_sum_has_no_value_where_the_series_is_missing() {
        let scrapes = [
            scrape(
                0.0,
                "q{pool=\"a\",tier=\"pro\"} 1\nq{pool=\"b\",tier=\"pro\"} 2",
            ),
            scrape(1.0, "other 1"),
        ];
        let depth = gauge_sum(&scrapes, "q", &["tier"]);
        assert_eq!(values(&depth, &["pro"]), [Some(3.0), None]);
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        // 100 observations: 50 under 0.1 s, 40 in (0.1, 0.5], 10 in (0.5, 1].
        let b = [
            (0.1, 50.0),
            (0.5, 90.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(histogram_quantile(0.5, b.to_vec()), Some(0.1));
        let p70 = histogram_quantile(0.7, b.to_vec()).unwrap();
        assert!((p70 - 0.3).abs() < 1e-9, "{p70}");
        let p99 = histogram_quantile(0.99, b.to_vec()).unwrap();
        assert!((p99 - 0.95).abs() < 1e-9, "{p99}");
        // The first bucket starts at 0.
        let p10 = histogram_quantile(0.1, b.to_vec()).unwrap();
        assert!((p10 - 0.02).abs() < 1e-9, "{p10}");
    }

    #[test]
    fn quantile_in_the_inf_bucket_is_the_highest_finite_bound() {
        let b = vec![(0.1, 1.0), (1.0, 2.0), (f64::INFINITY, 10.0)];
        assert_eq!(histogram_quantile(0.99, b), Some(1.0));
    }

    #[test]
    fn quantile_of_empty_or_malformed_buckets_is_none() {
        let empty = vec![(0.1, 0.0), (1.0, 0.0), (f64::INFINITY, 0.0)];
        assert_eq!(histogram_quantile(0.5, empty), None);
        let no_inf = vec![(0.1, 1.0), (1.0, 2.0)];
        assert_eq!(histogram_quantile(0.5, no_inf), None);
        assert_eq!(histogram_quantile(0.5, Vec::new()), None);
    }

    #[test]
    fn quantile_sums_buckets_by_le_and_gaps_idle_windows() {
        let h = |a: u32, b: u32| {
            format!(
                "d_bucket{{tier=\"pro\",model=\"m1\",le=\"1\"}} {a}\n\
                 d_bucket{{tier=\"pro\",model=\"m1\",le=\"+Inf\"}} {a}\n\
                 d_bucket{{tier=\"pro\",model=\"m2\",le=\"1\"}} 0\n\
                 d_bucket{{tier=\"pro\",model=\"m2\",le=\"+Inf\"}} {b}\n"
            )
        };
        let scrapes = [
            scrape(0.0, &h(0, 0)),
            scrape(1.0, &h(10, 10)),
            scrape(2.0, &h(10, 10)),
        ];
        let p = quantile(&scrapes, "d", 0.5, &["tier"], 1.0);
        // 10 of 20 at or under 1 s: the median is the bucket's top; no traffic: no value.
        assert_eq!(values(&p, &["pro"]), [Some(1.0), None]);
    }
}
