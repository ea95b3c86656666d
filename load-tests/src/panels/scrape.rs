//! A recording of Prometheus scrapes: a directory of `<unix-ms>.prom` files,
//! each one `GET /metrics` body in the text exposition format, as
//! `scripts/render-panels.sh` writes them.
//!
//! The parser reads what the `prometheus` crate writes (and what any
//! exporter writes in the text format 0.0.4): `name{label="value",...} value`
//! with an optional timestamp, which is ignored (the file's name is the time).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, bail};

/// One time series: a metric name and its labels, sorted by label name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeriesId {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl SeriesId {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub samples: BTreeMap<SeriesId, f64>,
}

/// Reads every `<unix-ms>.prom` file of `dir`, oldest first; other files are
/// skipped.
pub fn read_recording(dir: &Path) -> anyhow::Result<Vec<Scrape>> {
    let mut scrapes = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(millis) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".prom"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let samples = parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        scrapes.push(Scrape {
            at: millis as f64 / 1000.0,
            samples,
        });
    }
    scrapes.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(scrapes)
}

/// Parses one scrape in the text exposition format.
pub fn parse(text: &str) -> anyhow::Result<BTreeMap<SeriesId, f64>> {
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, value) = parse_line(line).with_context(|| format!("line {}: {line}", n + 1))?;
        samples.insert(id, value);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> anyhow::Result<(SeriesId, f64)> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .context("no value")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next().context("no value")?;
    let value = parse_value(value)?;
    labels.sort();
    Ok((SeriesId { name, labels }, value))
}

/// Parses `a="x",b="y"}` and returns the labels and what follows the `}`.
fn parse_labels(mut rest: &str) -> anyhow::Result<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after_name) = rest.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = after_name.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.push((name.trim().to_owned(), value));
        rest = &after_name[end + 1..];
    }
}

fn parse_value(raw: &str) -> anyhow::Result<f64> {
    Ok(match raw {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => raw.parse().with_context(|| format!("bad value {raw:?}"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_histograms_and_escapes() {
        let text = r#"
# HELP tollgate_requests_total Inference requests.
# TYPE tollgate_requests_total counter
tollgate_requests_total{tier="pro",model="sim-model",endpoint="chat_completions",status="2xx"} 42
tollgate_overhead_seconds_bucket{endpoint="chat_completions",le="+Inf"} 7
odd{msg="a \"quoted\" \\ value, with comma"} 1.5e3 1700000000000
plain_gauge 3
"#;
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 4);
        let (id, value) = samples.iter().next().unwrap();
        assert_eq!(id.name, "odd");
        assert_eq!(id.label("msg"), Some(r#"a "quoted" \ value, with comma"#));
        assert_eq!(*value, 1500.0);
        let requests = samples
            .iter()
            .find(|(id, _)| id.name == "tollgate_requests_total")
            .unwrap();
        // Labels are sorted, so the same series always compares equal.
        assert_eq!(requests.0.labels[0].0, "endpoint");
        assert_eq!(requests.0.label("tier"), Some("pro"));
        assert_eq!(*requests.1, 42.0);
        let bucket = samples
            .keys()
            .find(|id| id.name == "tollgate_overhead_seconds_bucket")
            .unwrap();
        assert_eq!(bucket.label("le"), Some("+Inf"));
        assert!(
            samples
                .keys()
                .any(|id| id.name == "plain_gauge" && id.labels.is_empty())
        );
    }

    #[test]
    fn rejects_a_line_without_value() {
        assert!(parse("tollgate_requests_total{tier=\"pro\"}").is_err());
        assert!(parse("x{tier=\"pro} 1").is_err());
    }
}
