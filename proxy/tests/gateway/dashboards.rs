//! The Grafana dashboards in `grafana/dashboards/`, checked as far as they can
//! be without Grafana. Every file in the folder (listed, so a new dashboard is
//! covered without touching this test) must parse, and every panel must name a
//! provisioned datasource and carry a query. Every PromQL expression must parse
//! under `promtool` and name only metrics a live gateway exports after some
//! traffic; every SQL query, with Grafana's macros expanded as its Postgres
//! datasource expands them, must run on a migrated database holding sample
//! data and return rows, logged in as the read-only role the datasource uses
//! (`tollgate_grafana`, what it may not do is in tests/postgres.rs). Each test
//! collects every problem and fails with the whole list.
//!
//! What this cannot show: that Grafana draws the panels as intended.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

const DASHBOARDS: &str = "grafana/dashboards";
const DATASOURCES: &str = "grafana/provisioning/datasources/datasources.yml";

/// What Grafana puts in place of its interval variables when the test
/// substitutes them: any valid duration does for a syntax check.
const BUILTINS: [(&str, &str); 7] = [
    ("__rate_interval", "1m"),
    ("__interval", "1m"),
    ("__interval_ms", "60000"),
    ("__range", "1h"),
    ("__range_s", "3600"),
    ("__range_ms", "3600000"),
    ("__rate_interval_ms", "60000"),
];

/// Series a histogram `name` exposes besides its own name.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_count", "_sum"];

fn fail_with(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

// ---------------------------------------------------------------- the files

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Prometheus,
    Postgres,
}

/// The provisioned datasources by uid.
fn datasources() -> BTreeMap<String, Kind> {
    let path = workspace().join(DATASOURCES);
    let text = std::fs::read_to_string(&path).unwrap();
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    yaml["datasources"]
        .as_sequence()
        .expect("a datasources list")
        .iter()
        .filter_map(|d| {
            let kind = match d["type"].as_str()? {
                "prometheus" => Kind::Prometheus,
                "postgres" | "grafana-postgresql-datasource" => Kind::Postgres,
                _ => return None,
            };
            Some((d["uid"].as_str()?.to_owned(), kind))
        })
        .collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Dashboard {
    file: String,
    json: Value,
}

impl Dashboard {
    /// Every `*.json` in the dashboards folder.
    fn all() -> Vec<Self> {
        let dir = workspace().join(DASHBOARDS);
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{DASHBOARDS}: {e}"))
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        assert!(!paths.is_empty(), "no dashboards in {DASHBOARDS}");
        paths
            .into_iter()
            .map(|path| {
                let file = format!("{DASHBOARDS}/{}", path.file_name().unwrap().display());
                let text = std::fs::read_to_string(&path).unwrap();
                let json = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{file} is not valid JSON: {e}"));
                Self { file, json }
            })
            .collect()
    }

    /// Every panel, those inside rows included.
    fn panels(&self) -> Vec<&Value> {
        fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
            for panel in panels.as_array().into_iter().flatten() {
                out.push(panel);
                walk(&panel["panels"], out);
            }
        }
        let mut out = Vec::new();
        walk(&self.json["panels"], &mut out);
        out
    }

    fn variables(&self) -> Vec<Variable> {
        self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(Variable::from_json)
            .collect()
    }

    /// Every target of every panel, with the datasource it goes to.
    fn queries(&self, datasources: &BTreeMap<String, Kind>) -> Vec<Query> {
        let mut queries = Vec::new();
        for panel in self.panels() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let uid = target["datasource"]["uid"]
                    .as_str()
                    .or_else(|| panel["datasource"]["uid"].as_str())
                    .unwrap_or_default();
                let (Some(kind), Some(text)) = (
                    datasources.get(uid),
                    target["expr"].as_str().or(target["rawSql"].as_str()),
                ) else {
                    continue; // reported by `dashboards_are_well_formed`
                };
                queries.push(Query {
                    at: format!(
                        "{} panel {} \"{}\" query {}",
                        self.file,
                        panel["id"],
                        panel["title"].as_str().unwrap_or_default(),
                        target["refId"].as_str().unwrap_or("?"),
                    ),
                    record: format!(
                        "dashboard:{}:panel_{}_{}",
                        self.json["uid"]
                            .as_str()
                            .unwrap_or_default()
                            .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
                        panel["id"],
                        target["refId"].as_str().unwrap_or("x"),
                    ),
                    kind: *kind,
                    text: text.to_owned(),
                });
            }
        }
        queries
    }
}

/// One target of a panel.
struct Query {
    /// File, panel and refId, for messages.
    at: String,
    /// A recording-rule name for promtool, unique per target.
    record: String,
    kind: Kind,
    text: String,
}

/// A dashboard variable and where its values come from.
struct Variable {
    name: String,
    source: VariableSource,
    /// Multi-value or with "All": Grafana's SQL datasources quote and join it.
    multi: bool,
    datasource: Option<String>,
}

enum VariableSource {
    /// textbox, constant, custom: the value as written.
    Text(String),
    /// A query on the variable's datasource.
    Query(String),
}

impl Variable {
    fn from_json(json: &Value) -> Self {
        let query = json["query"]["query"]
            .as_str()
            .or(json["query"].as_str())
            .or(json["definition"].as_str())
            .unwrap_or_default()
            .to_owned();
        let source = match json["type"].as_str() {
            Some("query") => VariableSource::Query(query),
            _ => VariableSource::Text(
                json["current"]["value"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or(query),
            ),
        };
        Self {
            name: json["name"].as_str().unwrap_or_default().to_owned(),
            source,
            multi: json["multi"].as_bool() == Some(true)
                || json["includeAll"].as_bool() == Some(true),
            datasource: json["datasource"]["uid"].as_str().map(str::to_owned),
        }
    }
}

#[test]
fn dashboards_are_well_formed() {
    let datasources = datasources();
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    for dashboard in Dashboard::all() {
        let (file, json) = (&dashboard.file, &dashboard.json);
        match json["uid"].as_str() {
            Some(uid) if !uid.is_empty() => {
                if !uids.insert(uid.to_owned()) {
                    problems.push(format!("{file}: uid `{uid}` is another dashboard's too"));
                }
            }
            _ => problems.push(format!("{file}: no fixed `uid` (links would break)")),
        }
        if json["title"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{file}: no title"));
        }
        if json["schemaVersion"].as_u64().is_none_or(|v| v < 39) {
            problems.push(format!("{file}: schemaVersion should be 39 or later"));
        }
        if json["time"]["from"].as_str().is_none() || json["time"]["to"].as_str().is_none() {
            problems.push(format!("{file}: no default `time` range"));
        }
        let mut ids = BTreeSet::new();
        for panel in dashboard.panels() {
            let title = panel["title"].as_str().unwrap_or_default();
            match panel["id"].as_u64() {
                Some(id) if ids.insert(id) => {}
                Some(id) => {
                    problems.push(format!("{file}: panel id {id} (\"{title}\") is not unique"))
                }
                None => problems.push(format!("{file}: panel \"{title}\" has no numeric id")),
            }
            if panel["type"] == "row" {
                continue;
            }
            let at = format!("{file} panel {} \"{title}\"", panel["id"]);
            let panel_uid = panel["datasource"]["uid"].as_str();
            if !panel_uid.is_some_and(|uid| datasources.contains_key(uid)) {
                problems.push(format!(
                    "{at}: datasource uid {panel_uid:?} is not one of {DATASOURCES}'s {:?}",
                    datasources.keys().collect::<Vec<_>>()
                ));
            }
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{at}: no targets"));
            }
            for target in &targets {
                let ref_id = target["refId"].as_str().unwrap_or("?");
                let uid = target["datasource"]["uid"].as_str().or(panel_uid);
                let (field, kind) = match uid.and_then(|uid| datasources.get(uid)) {
                    Some(Kind::Prometheus) => ("expr", Kind::Prometheus),
                    Some(Kind::Postgres) => ("rawSql", Kind::Postgres),
                    None => {
                        problems.push(format!(
                            "{at} query {ref_id}: datasource uid {uid:?} is not provisioned"
                        ));
                        continue;
                    }
                };
                if target[field].as_str().is_none_or(|q| q.trim().is_empty()) {
                    problems.push(format!(
                        "{at} query {ref_id}: {kind:?} target without `{field}`"
                    ));
                }
            }
        }
        for variable in dashboard.variables() {
            if let VariableSource::Query(query) = &variable.source {
                let uid = variable.datasource.as_deref();
                if !uid.is_some_and(|uid| datasources.contains_key(uid)) {
                    problems.push(format!(
                        "{file}: variable `{}` queries datasource {uid:?}, which is not provisioned",
                        variable.name
                    ));
                }
                if query.trim().is_empty() {
                    problems.push(format!("{file}: variable `{}` has no query", variable.name));
                }
            }
        }
    }
    fail_with("dashboard problems", &problems);
}

// ---------------------------------------------------------------- PromQL

/// Replaces `$name` and `${name}` by `values[name]`; unknown names stay.
fn interpolate(text: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            },
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match values.get(name) {
            Some(value) if len > 0 => out.push_str(value),
            _ => out.push_str(&rest[at..=at + len]),
        }
        rest = &rest[at + 1 + len..];
    }
    out.push_str(rest);
    out
}

fn builtins() -> BTreeMap<String, String> {
    BUILTINS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A PromQL expression as Prometheus would receive it: interval variables as
/// durations, query variables as `.+` (they sit in `=~` matchers), text
/// variables as written.
fn promql_for_check(expr: &str, variables: &[Variable]) -> String {
    let mut values = builtins();
    for variable in variables {
        let value = match &variable.source {
            VariableSource::Text(text) => text.clone(),
            VariableSource::Query(_) => ".+".to_owned(),
        };
        values.insert(variable.name.clone(), value);
    }
    interpolate(expr, &values)
}

/// Words that precede a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: [&str; 7] = ["and", "or", "unless", "bool", "offset", "inf", "nan"];

/// The metric names an expression selects: identifiers that are not
/// functions, aggregations, keywords, label names (in `{}` or `by (...)`),
/// durations or template variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // The index after the `close` matching the `open` at `i`, quotes skipped.
    let skip_to = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        let mut quote: Option<char> = None;
        while i < chars.len() {
            let c = chars[i];
            match quote {
                Some(_) if c == '\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == open => depth += 1,
                None if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                None => {}
            }
            i += 1;
        }
        i
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i, '{', '}');
        } else if c == '[' {
            i = skip_to(i, '[', ']');
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A variable or a number / duration: skip the whole word.
            i += 1;
            while i < chars.len() && (is_word(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_word(c) {
            let start = i;
            while i < chars.len() && is_word(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let next_word: String = chars[next..].iter().take_while(|c| is_word(**c)).collect();
            if LABEL_LISTS.contains(&word.as_str()) {
                if chars.get(next) == Some(&'(') {
                    i = skip_to(next, '(', ')');
                }
            } else if KEYWORDS.contains(&word.as_str())
                || chars.get(next) == Some(&'(')
                || next_word == "by"
                || next_word == "without"
            {
                // a keyword, a function, or an aggregation before its clause
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The first argument of `label_values(metric, label)`, if there are two.
fn label_values_metric(query: &str) -> Option<(String, String)> {
    let args = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = args.rsplit_once(',')?;
    Some((selector.trim().to_owned(), label.trim().to_owned()))
}

#[test]
fn promql_names_skip_functions_labels_keywords_and_variables() {
    let expr = r#"histogram_quantile(0.95, sum by (tier, le) (rate(a_bucket{tier=~"$tier", x="b_total"}[$__rate_interval])))
        / on (tier) group_left (pool) max without (pool) (b) or sum(c offset 5m) by (le) > bool 1e3 * $hourly_price"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(names, ["a_bucket", "b", "c"]);
    let mut values = builtins();
    values.insert("tier".to_owned(), ".+".to_owned());
    assert_eq!(
        interpolate("x{t=~\"${tier}\"}[$__range] $__range_s $unknown", &values),
        "x{t=~\".+\"}[1h] 3600 $unknown"
    );
}

/// The scrape, by family: sample names and `# TYPE` lines.
struct Scrape {
    text: String,
    sample_names: BTreeSet<String>,
    histograms: BTreeSet<String>,
}

impl Scrape {
    async fn of(url: &str) -> Self {
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        let mut sample_names = BTreeSet::new();
        let mut histograms = BTreeSet::new();
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                let mut words = declared.split_whitespace();
                if let (Some(name), Some("histogram" | "summary")) = (words.next(), words.next()) {
                    histograms.insert(name.to_owned());
                }
            } else if !line.starts_with('#') && !line.is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                sample_names.insert(line[..end].to_owned());
            }
        }
        Self {
            text,
            sample_names,
            histograms,
        }
    }

    /// Whether `name` (or the histogram it is a `_bucket`/`_count`/`_sum` of) is exported.
    fn exports(&self, name: &str) -> bool {
        self.sample_names.contains(name)
            || HISTOGRAM_SUFFIXES.iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|family| self.histograms.contains(family))
            })
    }

    /// The values label `label` takes in the samples of `metric`.
    fn label_values(&self, metric: &str, label: &str) -> BTreeSet<String> {
        let wanted = format!("{label}=\"");
        self.text
            .lines()
            .filter_map(|line| line.strip_prefix(metric)?.strip_prefix('{'))
            .filter_map(|labels| {
                let start = labels
                    .split(',')
                    .find_map(|pair| pair.trim().strip_prefix(&wanted))?;
                Some(start[..start.find('"')?].to_owned())
            })
            .collect()
    }
}

/// A free tier and a priced, rate-limited pro tier: every panel has a tier
/// to show.
const TIERS: &str = "[[tiers]]\nname = \"free\"\npriority = 0\nrequests_per_minute = 100\n\
                     [[tiers]]\nname = \"pro\"\npriority = 10\nrequests_per_minute = 2\n\
                     monthly_price = 49.0\nincluded_units = 2000000\nhard_cap = false\n\
                     overage_price = 0.00002\n";

/// A gateway after the traffic the dashboards watch. Its Redis never
/// answers, so refusals, Redis errors and fallbacks have series too: `free`
/// fails closed (503 rate_limiter_unavailable), `pro` falls back to this
/// instance's limits, two a minute (the third request gets 429). Probes every
/// 200 ms so the first round's load signals arrive quickly.
async fn gateway_with_traffic() -> (Sim, Gateway) {
    let sim = Sim::fast();
    let options = Options {
        redis: Some(format!("redis://127.0.0.1:{}", free_port())),
        tiers: Some(TIERS.to_owned()),
        health: "interval = \"200ms\"",
        // A managed backend: instance time and cost are only counted for one.
        tail: super::api_metrics::priced_process_backend(),
        ..Options::default()
    };
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], options).await;
    let pro = gateway.create_key_on("pro-co", "pro", &[]);
    let free = gateway.create_key_on("free-co", "free", &[]);

    let (status, body) = gateway
        .post_json(&pro, "/v1/chat/completions", &chat("Hello", 5))
        .await;
    assert_eq!(status, 200, "{body}");
    let stream = gateway
        .post(
            &pro,
            "/v1/chat/completions",
            &streamed(chat("Hello there", 4)),
        )
        .await;
    assert_eq!(stream.status(), 200);
    stream.text().await.unwrap();
    let (status, body) = gateway
        .post_json(&pro, "/v1/chat/completions", &chat("Hello", 5))
        .await;
    assert_eq!(status, 429, "the third in a minute is refused: {body}");
    let (status, body) = gateway
        .post_json(&free, "/v1/chat/completions", &chat("Hello", 5))
        .await;
    assert_eq!(status, 503, "free fails closed without Redis: {body}");

    let metrics = gateway.metrics_url.as_str();
    eventually("four requests are counted", || async {
        super::metering::scrape(metrics, "tollgate_requests_total").await == 4.0
    })
    .await;
    eventually("a probe round read the backend's signals", || async {
        Scrape::of(metrics)
            .await
            .exports("tollgate_backend_gpu_utilization")
    })
    .await;
    let db = gateway.db_client().await;
    eventually(
        "both answers are stored (the rollups in the same statement)",
        || async {
            let row = db
                .query_one("SELECT count(*) FROM usage_events WHERE status = 'ok'", &[])
                .await
                .unwrap();
            row.get::<_, i64>(0) >= 2
        },
    )
    .await;
    (sim, gateway)
}

#[tokio::test]
async fn promql_expressions_parse_under_promtool() {
    let datasources = datasources();
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    let mut problems = Vec::new();
    for dashboard in Dashboard::all() {
        let variables = dashboard.variables();
        for query in dashboard.queries(&datasources) {
            if query.kind != Kind::Prometheus {
                continue;
            }
            let expr = promql_for_check(&query.text, &variables);
            if expr.contains('$') {
                problems.push(format!(
                    "{}: a variable is left unresolved: {expr}",
                    query.at
                ));
            }
            let quoted = serde_json::to_string(&expr).unwrap(); // a JSON string is a YAML scalar
            rules.push_str(&format!(
                "      - record: {}\n        expr: {quoted}\n",
                query.record
            ));
        }
    }
    fail_with("PromQL variables", &problems);

    let promtool_runs = tokio::process::Command::new("promtool")
        .arg("--version")
        .output()
        .await
        .is_ok_and(|out| out.status.success());
    if !promtool_runs {
        eprintln!("promtool not on PATH: PromQL syntax not checked (scripts/lib.sh installs it)");
        return;
    }
    let path = std::env::temp_dir().join(format!("{}.yml", unique("dashboard_rules")));
    std::fs::write(&path, &rules).unwrap();
    let out = tokio::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "promtool check rules (record names are dashboard:UID:panel_ID_REFID):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn every_metric_the_dashboards_query_is_exported_by_a_live_gateway() {
    let (_sim, gateway) = gateway_with_traffic().await;
    let scrape = Scrape::of(&gateway.metrics_url).await;
    let datasources = datasources();
    // Metric name -> the first place that needs it.
    let mut missing: BTreeMap<String, String> = BTreeMap::new();
    for dashboard in Dashboard::all() {
        let variables = dashboard.variables();
        let mut needed: Vec<(String, String)> = Vec::new();
        for query in dashboard.queries(&datasources) {
            if query.kind == Kind::Prometheus {
                for name in metric_names(&promql_for_check(&query.text, &variables)) {
                    needed.push((name, query.at.clone()));
                }
            }
        }
        for variable in &variables {
            let is_prometheus = variable
                .datasource
                .as_deref()
                .and_then(|uid| datasources.get(uid))
                == Some(&Kind::Prometheus);
            if let (true, VariableSource::Query(query)) = (is_prometheus, &variable.source) {
                let selector = label_values_metric(query).map_or(query.clone(), |(m, _)| m);
                for name in metric_names(&selector) {
                    needed.push((
                        name,
                        format!("{} variable `{}`", dashboard.file, variable.name),
                    ));
                }
            }
        }
        for (name, at) in needed {
            if !scrape.exports(&name) {
                missing.entry(name).or_insert(at);
            }
        }
    }
    let problems: Vec<String> = missing
        .iter()
        .map(|(name, at)| format!("{name} (first used by {at})"))
        .collect();
    fail_with(
        "metrics the dashboards query that the gateway's /metrics does not export after traffic",
        &problems,
    );
}

// ---------------------------------------------------------------- SQL

/// The time range the SQL queries are run for, as Grafana formats it.
struct Range {
    from: String,
    to: String,
    from_epoch: i64,
    to_epoch: i64,
}

/// Grafana's duration arguments (`'1m'`, `1h`, `30s`) in seconds.
fn interval_seconds(arg: &str) -> Result<i64, String> {
    let arg = arg.trim().trim_matches(|c| c == '\'' || c == '"');
    let split = arg.find(|c: char| !c.is_ascii_digit()).unwrap_or(arg.len());
    let number: i64 = arg[..split]
        .parse()
        .map_err(|_| format!("bad interval `{arg}`"))?;
    let unit = match &arg[split..] {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        other => return Err(format!("bad interval unit `{other}` in `{arg}`")),
    };
    Ok(number * unit)
}

/// Expands Grafana's Postgres macros as its datasource does
/// (pkg/tsdb/grafana-postgresql-datasource/macros.go, without TimescaleDB).
fn expand_macros(sql: &str, range: &Range) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(at) = rest.find("$__") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 3..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let Some(open) = after[name_len..].strip_prefix('(') else {
            return Err(format!(
                "`$__{name}` is neither a macro call nor a variable"
            ));
        };
        let mut depth = 1;
        let close = open
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map(|(i, _)| i)
            .ok_or_else(|| format!("`$__{name}(` is not closed"))?;
        let args: Vec<&str> = open[..close]
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        let arg = |i: usize| {
            args.get(i)
                .copied()
                .ok_or_else(|| format!("`$__{name}` needs argument {}", i + 1))
        };
        let group = || -> Result<String, String> {
            let seconds = interval_seconds(arg(1)?)?;
            Ok(format!(
                "floor(extract(epoch from {})/{seconds})*{seconds}",
                arg(0)?
            ))
        };
        let expansion = match name {
            "time" => format!("{} AS \"time\"", arg(0)?),
            "timeEpoch" => format!("extract(epoch from {}) AS \"time\"", arg(0)?),
            "timeFilter" => format!("{} BETWEEN '{}' AND '{}'", arg(0)?, range.from, range.to),
            "timeFrom" => format!("'{}'", range.from),
            "timeTo" => format!("'{}'", range.to),
            "timeGroup" => group()?,
            "timeGroupAlias" => format!("{} AS \"time\"", group()?),
            "unixEpochFilter" => format!(
                "{0} >= {1} AND {0} <= {2}",
                arg(0)?,
                range.from_epoch,
                range.to_epoch
            ),
            "unixEpochFrom" => range.from_epoch.to_string(),
            "unixEpochTo" => range.to_epoch.to_string(),
            other => return Err(format!("macro `$__{other}` is not expanded by this test")),
        };
        out.push_str(&expansion);
        rest = &open[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `'a','b'`: a multi-value variable as Grafana's SQL datasources write it.
fn sql_list(values: &BTreeSet<String>) -> String {
    values
        .iter()
        .map(|v| format!("'{}'", v.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Rows the dashboards need beyond what the traffic left: a Stripe
/// subscription and exported units, usage past the free tier's included
/// units, images (a second unit kind), and an instance that was rented,
/// slept and resumed.
const SAMPLE_DATA: &str = "
UPDATE accounts SET billing_subscription_id = 'sub_dash' WHERE name = 'pro-co';
INSERT INTO billing_customers (account_id, stripe_customer_id)
    SELECT id, 'cus_dash' FROM accounts WHERE name = 'pro-co';
INSERT INTO billing_subscriptions (subscription_id, account_id, stripe_customer_id, status, tier,
                                   current_period_start, current_period_end, updated_at)
    SELECT 'sub_dash', id, 'cus_dash', 'active', 'pro',
           now() - interval '3 days', now() + interval '27 days', now()
    FROM accounts WHERE name = 'pro-co';
INSERT INTO billing_usage_exports (account_id, meter, bucket_start, seq, units, stripe_customer_id,
                                   identifier, state)
    SELECT id, 'tollgate_units', date_trunc('hour', now()) - interval '1 hour', 0, 42, 'cus_dash',
           'dash:sample:0', 'sent'
    FROM accounts WHERE name = 'pro-co';
INSERT INTO usage_rollup_minute (bucket, account_id, key_id, model, tier, requests, failed_requests,
                                 prompt_tokens, completion_tokens, total_tokens, units)
    SELECT date_trunc('minute', now()) - interval '2 hours', a.id, k.id, 'sample-large', 'free',
           3, 1, 40, 20, 60, 60
    FROM accounts a JOIN api_keys k ON k.account_id = a.id WHERE a.name = 'free-co';
INSERT INTO usage_rollup_minute (bucket, account_id, key_id, model, tier, unit_kind, requests,
                                 failed_requests, prompt_tokens, completion_tokens, total_tokens,
                                 units)
    SELECT date_trunc('minute', now()) - interval '90 minutes', a.id, k.id, 'sample-image', 'free',
           'images', 2, 0, 0, 0, 0, 8
    FROM accounts a JOIN api_keys k ON k.account_id = a.id WHERE a.name = 'free-co';
INSERT INTO usage_rollup_day (bucket, account_id, key_id, model, tier, unit_kind, requests,
                              failed_requests, prompt_tokens, completion_tokens, total_tokens,
                              units)
    SELECT date_trunc('day', now(), 'UTC'), account_id, key_id, model, tier, unit_kind, requests,
           failed_requests, prompt_tokens, completion_tokens, total_tokens, units
    FROM usage_rollup_minute WHERE model IN ('sample-large', 'sample-image');
INSERT INTO instance_events (at, backend, instance_id, from_state, to_state, reason, hourly_cost)
    SELECT now() - at, 'b0', 'sample-1', f, t, r, c
    FROM (VALUES (interval '5 hours', 'cold', 'provisioning', 'create', 1.2),
                 (interval '4 hours 55 minutes', 'provisioning', 'starting', 'created', 1.2),
                 (interval '4 hours 54 minutes', 'starting', 'hot', 'probe passed', 1.2),
                 (interval '3 hours', 'hot', 'draining', 'idle', 1.2),
                 (interval '2 hours 59 minutes', 'draining', 'warm', 'drained', 0.1),
                 (interval '1 hour', 'warm', 'starting', 'queue', 1.2),
                 (interval '58 minutes', 'starting', 'hot', 'probe passed', 1.2))
         AS e (at, f, t, r, c);
";

/// What `tollgate migrate` gives the read-only role here. The test server
/// trusts local connections, so the login is checked, not the password.
const GRAFANA_PASSWORD: &str = "dashboards-test-password";

/// Logs in as Grafana's datasource does, once `tollgate migrate` with
/// GRAFANA_DB_PASSWORD (as in docker-compose.yml) let the role log in.
async fn login_as_grafana(gateway: &Gateway) -> tokio_postgres::Client {
    let migrated = gateway
        .cli(&["migrate"])
        .env("GRAFANA_DB_PASSWORD", GRAFANA_PASSWORD)
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let mut config: tokio_postgres::Config = gateway.db.url.parse().unwrap();
    config
        .user(tollgate::db::GRAFANA_ROLE)
        .password(GRAFANA_PASSWORD);
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, tollgate::db::GRAFANA_ROLE);
    client
}

#[tokio::test]
async fn every_sql_query_runs_as_the_grafana_role_and_returns_rows() {
    let (_sim, gateway) = gateway_with_traffic().await;
    gateway
        .db_client()
        .await
        .batch_execute(SAMPLE_DATA)
        .await
        .unwrap();
    let db = login_as_grafana(&gateway).await;
    let scrape = Scrape::of(&gateway.metrics_url).await;
    db.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    let bounds = db
        .query_one(
            "SELECT to_char(now() - interval '6 hours', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(now() + interval '1 minute', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    extract(epoch FROM now() - interval '6 hours')::bigint,
                    extract(epoch FROM now() + interval '1 minute')::bigint",
            &[],
        )
        .await
        .unwrap();
    let range = Range {
        from: bounds.get(0),
        to: bounds.get(1),
        from_epoch: bounds.get(2),
        to_epoch: bounds.get(3),
    };
    let datasources = datasources();
    let error = |e: tokio_postgres::Error| {
        e.as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_owned())
    };
    let mut problems = Vec::new();
    for dashboard in Dashboard::all() {
        // Variables first: their values go into the queries.
        let mut values = builtins();
        for variable in dashboard.variables() {
            let kind = variable
                .datasource
                .as_deref()
                .and_then(|uid| datasources.get(uid));
            let found: BTreeSet<String> = match (&variable.source, kind) {
                (VariableSource::Text(text), _) => [text.clone()].into(),
                (VariableSource::Query(query), Some(Kind::Postgres)) => {
                    match db.query(query.as_str(), &[]).await {
                        Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect(),
                        Err(e) => {
                            problems.push(format!(
                                "{} variable `{}`: {}",
                                dashboard.file,
                                variable.name,
                                error(e)
                            ));
                            BTreeSet::new()
                        }
                    }
                }
                (VariableSource::Query(query), _) => label_values_metric(query)
                    .map(|(metric, label)| scrape.label_values(&metric, &label))
                    .unwrap_or_default(),
            };
            if found.is_empty() {
                problems.push(format!(
                    "{} variable `{}` has no values for the sample data",
                    dashboard.file, variable.name
                ));
            }
            let value = match (&variable.source, variable.multi) {
                (VariableSource::Query(_), true) => sql_list(&found),
                _ => found.into_iter().next().unwrap_or_default(),
            };
            values.insert(variable.name, value);
        }
        for query in dashboard.queries(&datasources) {
            if query.kind != Kind::Postgres {
                continue;
            }
            let sql = match expand_macros(&interpolate(&query.text, &values), &range) {
                Ok(sql) => sql,
                Err(e) => {
                    problems.push(format!("{}: {e}", query.at));
                    continue;
                }
            };
            match db.query(sql.as_str(), &[]).await {
                Ok(rows) if rows.is_empty() => {
                    problems.push(format!("{}: no rows for the sample data:\n{sql}", query.at))
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("{}: {}:\n{sql}", query.at, error(e))),
            }
        }
    }
    fail_with("dashboard SQL", &problems);
}

/// Every counter a dashboard or an alert names, with the expressions that
/// name it: a counter missing until its first event shows "No data" in a
/// panel and makes `increase()` miss that first event.
fn counters_named_by_dashboards_and_alerts() -> BTreeMap<String, String> {
    let datasources = datasources();
    let mut named = BTreeMap::new();
    for dashboard in Dashboard::all() {
        let variables = dashboard.variables();
        for query in dashboard.queries(&datasources) {
            if query.kind == Kind::Prometheus {
                for name in metric_names(&promql_for_check(&query.text, &variables)) {
                    named.entry(name).or_insert_with(|| query.at.clone());
                }
            }
        }
    }
    let alerts: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(workspace().join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let at = format!("alert {}", rule["alert"].as_str().unwrap_or("?"));
            for name in metric_names(rule["expr"].as_str().unwrap()) {
                named.entry(name).or_insert_with(|| at.clone());
            }
        }
    }
    named.retain(|name, _| name.ends_with("_total"));
    named
}

#[tokio::test]
async fn every_counter_dashboards_and_alerts_name_is_exported_before_any_traffic() {
    let sim = Sim::fast();
    // The same configuration as the traffic test: Redis configured, billing
    // with a priced tier, a managed backend.
    let options = Options {
        redis: Some(redis_url()),
        tiers: Some(TIERS.to_owned()),
        tail: super::api_metrics::priced_process_backend(),
        ..Options::default()
    };
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], options).await;
    let scrape = Scrape::of(&gateway.metrics_url).await;
    let problems: Vec<String> = counters_named_by_dashboards_and_alerts()
        .into_iter()
        .filter(|(name, _)| !scrape.exports(name))
        .map(|(name, at)| format!("{name} (first used by {at})"))
        .collect();
    fail_with(
        "counters the dashboards and alerts name that a fresh gateway does not export",
        &problems,
    );
}
