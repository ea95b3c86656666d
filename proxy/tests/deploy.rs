//! The docker-compose deployment, checked without Docker: `docker-compose.yml`,
//! the `Dockerfile`, `config/compose.toml` (through the real config loader),
//! `deploy/prometheus/prometheus.yml` and Grafana's datasources must agree on
//! service names, ports, paths and files. Each test collects every mismatch
//! it finds and fails with the whole list, naming the file and what to change.
//!
//! What this cannot show: that the images build and the stack comes up. That
//! needs Docker (`docker compose up --build`).

#![allow(
    clippy::panic,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_yaml::Value;
use tollgate::config::{Config, Env};

const COMPOSE: &str = "docker-compose.yml";
const DOCKERFILE: &str = "Dockerfile";
const COMPOSE_CONFIG: &str = "config/compose.toml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const GRAFANA_DATASOURCES: &str = "grafana/provisioning/datasources/datasources.yml";
const GRAFANA_DASHBOARD_PROVIDERS: &str = "grafana/provisioning/dashboards/dashboards.yml";

/// The services the deployment is made of (the list).
const REQUIRED_SERVICES: &[&str] = &[
    "postgres",
    "redis",
    "tollgate",
    "gpu-sim-1",
    "gpu-sim-2",
    "prometheus",
    "grafana",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

fn yaml(relative: &str) -> Value {
    serde_yaml::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
}

/// Fails with every problem at once, one per line.
fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

struct Compose {
    doc: Value,
}

impl Compose {
    fn load() -> Self {
        Self { doc: yaml(COMPOSE) }
    }

    /// Service names in file order.
    fn service_names(&self) -> Vec<String> {
        self.doc
            .get("services")
            .and_then(Value::as_mapping)
            .unwrap_or_else(|| panic!("{COMPOSE} has no `services:` mapping"))
            .keys()
            .map(|k| k.as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn service(&self, name: &str) -> &Value {
        self.doc
            .get("services")
            .and_then(|s| s.get(name))
            .unwrap_or_else(|| panic!("{COMPOSE} has no service `{name}`"))
    }

    /// The service's command as words: a list as written, a string split on
    /// whitespace, and a `sh -c SCRIPT` list with its script split too.
    fn command(&self, name: &str) -> Vec<String> {
        let words: Vec<String> = match self.service(name).get("command") {
            None => return Vec::new(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|v| scalar(v).unwrap_or_default())
                .collect(),
            Some(other) => panic!("{COMPOSE}: service `{name}` has a command of {other:?}"),
        };
        if words.len() == 3 && matches!(words[0].as_str(), "sh" | "/bin/sh") && words[1] == "-c" {
            return words[2].split_whitespace().map(str::to_owned).collect();
        }
        words
    }

    /// `environment:` as a map or a `KEY=VALUE` list, `${VAR:-default}` resolved
    /// to the default (the environment of whoever runs the test is ignored).
    fn environment(&self, name: &str) -> HashMap<String, String> {
        self.raw_environment(name)
            .into_iter()
            .map(|(k, v)| (k, interpolate(&v)))
            .collect()
    }

    /// Container ports the service publishes (short and long syntax).
    fn published_container_ports(&self, name: &str) -> Result<Vec<u16>, String> {
        Ok(self
            .published_ports(name)?
            .into_iter()
            .map(|p| p.container)
            .collect())
    }

    /// The service's published ports with the host address each is bound
    /// to (`None`: every interface).
    fn published_ports(&self, name: &str) -> Result<Vec<Published>, String> {
        let Some(ports) = self.service(name).get("ports") else {
            return Ok(Vec::new());
        };
        let ports = ports
            .as_sequence()
            .ok_or_else(|| format!("service `{name}`: `ports` is not a list"))?;
        ports
            .iter()
            .map(|entry| match entry {
                Value::Mapping(_) => {
                    let container = entry
                        .get("target")
                        .and_then(Value::as_u64)
                        .and_then(|p| u16::try_from(p).ok())
                        .ok_or_else(|| format!("service `{name}`: port {entry:?} has no target"))?;
                    let host_ip = entry.get("host_ip").and_then(scalar);
                    Ok(Published { host_ip, container })
                }
                _ => {
                    // [IP:][HOST:]CONTAINER[/PROTOCOL]; IP may be [::1].
                    let text = scalar(entry).unwrap_or_default();
                    let text = text.split('/').next().unwrap_or_default();
                    let parts: Vec<&str> = text.rsplitn(3, ':').collect();
                    let container = parts[0].parse().map_err(|_| {
                        format!("service `{name}`: cannot read the container port of `{text}`")
                    })?;
                    let host_ip = parts.get(2).map(|ip| (*ip).to_owned());
                    Ok(Published { host_ip, container })
                }
            })
            .collect()
    }

    /// `environment:` as written, `${VAR:-default}` and all.
    fn raw_environment(&self, name: &str) -> HashMap<String, String> {
        let mut env = HashMap::new();
        match self.service(name).get("environment") {
            None => {}
            Some(Value::Mapping(map)) => {
                for (k, v) in map {
                    let value = if v.is_null() {
                        String::new()
                    } else {
                        scalar(v).unwrap_or_default()
                    };
                    env.insert(scalar(k).unwrap_or_default(), value);
                }
            }
            Some(Value::Sequence(items)) => {
                for item in items {
                    let item = scalar(item).unwrap_or_default();
                    let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                    env.insert(k.to_owned(), v.to_owned());
                }
            }
            Some(other) => panic!("{COMPOSE}: service `{name}` has an environment of {other:?}"),
        }
        env
    }

    /// `(source, target)` of each volume: a bind mount's source is a path
    /// (starts with `.` or `/`), a named volume's is its name.
    fn volumes(&self, name: &str) -> Vec<(String, String)> {
        let Some(volumes) = self
            .service(name)
            .get("volumes")
            .and_then(Value::as_sequence)
        else {
            return Vec::new();
        };
        volumes
            .iter()
            .map(|entry| match entry {
                Value::Mapping(_) => (
                    entry.get("source").and_then(scalar).unwrap_or_default(),
                    entry.get("target").and_then(scalar).unwrap_or_default(),
                ),
                _ => {
                    let text = scalar(entry).unwrap_or_default();
                    let mut parts = text.split(':');
                    let source = parts.next().unwrap_or_default().to_owned();
                    let target = parts.next().unwrap_or_default().to_owned();
                    (source, target)
                }
            })
            .collect()
    }

    /// The container directory a bind mount of `host_dir` (like
    /// `./deploy/prometheus`) lands on in `service`.
    fn mount_target(&self, service: &str, host_dir: &str) -> Option<String> {
        let wanted = normalize(host_dir);
        self.volumes(service)
            .into_iter()
            .find(|(source, _)| normalize(source) == wanted)
            .map(|(_, target)| target)
    }

    /// The host and port a service listens on, from `--listen HOST:PORT` in
    /// its command (gpu-sim's flag).
    fn listen_port(&self, name: &str) -> Option<u16> {
        let command = self.command(name);
        let at = command.iter().position(|w| w == "--listen")?;
        command.get(at + 1)?.rsplit(':').next()?.parse().ok()
    }

    /// Services that run gpu-sim.
    fn gpu_sim_services(&self) -> Vec<String> {
        self.service_names()
            .into_iter()
            .filter(|name| self.command(name).first().map(String::as_str) == Some("gpu-sim"))
            .collect()
    }
}

/// A published port: `host_ip` is `None` when it listens on every interface.
struct Published {
    host_ip: Option<String>,
    container: u16,
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn normalize(path: &str) -> String {
    path.trim_start_matches("./")
        .trim_end_matches('/')
        .to_owned()
}

/// Resolves Compose's `${VAR:-default}`, `${VAR-default}` and `${VAR}` to
/// the default (empty when there is none), as on a machine with none set.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let expression = &after[..end];
        if let Some((_, default)) = expression.split_once(":-") {
            out.push_str(default);
        } else if let Some((_, default)) = expression.split_once('-') {
            out.push_str(default);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The tollgate service's environment as the config loader sees it.
struct ComposeEnv(HashMap<String, String>);

impl Env for ComposeEnv {
    fn var(&self, name: &str) -> Option<String> {
        // As ProcessEnv: an empty variable counts as unset.
        self.0.get(name).filter(|v| !v.is_empty()).cloned()
    }
}

/// config/compose.toml through the real loader, with the environment the
/// tollgate service gets.
fn compose_config(compose: &Compose) -> Config {
    let env = ComposeEnv(compose.environment("tollgate"));
    Config::load(Some(&root().join(COMPOSE_CONFIG)), &env).unwrap_or_else(|e| {
        panic!("{COMPOSE_CONFIG} does not load with the tollgate service's environment: {e}")
    })
}

/// A Dockerfile's stages: instructions with continuation lines joined and
/// comments dropped, each as (INSTRUCTION, arguments).
fn dockerfile_stages() -> Vec<Vec<(String, String)>> {
    let text = read(DOCKERFILE);
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for instruction in instructions {
        let (keyword, args) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((&instruction, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push((keyword, args.trim().to_owned()));
        }
    }
    stages
}

fn runtime_stage() -> Vec<(String, String)> {
    dockerfile_stages()
        .pop()
        .unwrap_or_else(|| panic!("{DOCKERFILE} has no FROM"))
}

/// Where the runtime image puts `config/` (its `COPY config/ DEST`).
fn image_config_dir() -> String {
    runtime_stage()
        .into_iter()
        .filter(|(k, _)| k == "COPY")
        .find_map(|(_, args)| {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            match words.as_slice() {
                [source, dest] if normalize(source) == "config" => Some(normalize(dest)),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("the runtime stage of {DOCKERFILE} does not COPY config/"))
}

#[test]
fn compose_has_every_required_service() {
    let names = Compose::load().service_names();
    let problems: Vec<String> = REQUIRED_SERVICES
        .iter()
        .filter(|s| !names.iter().any(|n| n == *s))
        .map(|s| {
            format!(
                "{COMPOSE} has no service `{s}` (it has: {})",
                names.join(", ")
            )
        })
        .collect();
    assert_no_problems("missing services", &problems);
}

#[test]
fn every_service_has_an_image_or_a_build_that_exists() {
    let compose = Compose::load();
    let mut problems = Vec::new();
    for name in compose.service_names() {
        let service = compose.service(&name);
        match service.get("build") {
            Some(build) => {
                let (context, dockerfile) = match build {
                    Value::Mapping(_) => (
                        build
                            .get("context")
                            .and_then(scalar)
                            .unwrap_or_else(|| ".".into()),
                        build
                            .get("dockerfile")
                            .and_then(scalar)
                            .unwrap_or_else(|| "Dockerfile".into()),
                    ),
                    _ => (scalar(build).unwrap_or_default(), "Dockerfile".into()),
                };
                let context_dir = root().join(&context);
                if !context_dir.is_dir() {
                    problems.push(format!(
                        "service `{name}`: build context `{context}` is not a directory"
                    ));
                } else if !context_dir.join(&dockerfile).is_file() {
                    problems.push(format!(
                        "service `{name}`: `{dockerfile}` does not exist in build context `{context}`"
                    ));
                }
            }
            None if service.get("image").and_then(scalar).is_none() => {
                problems.push(format!("service `{name}` has neither `image` nor `build`"));
            }
            None => {}
        }
    }
    assert_no_problems("services that cannot get an image", &problems);
}

#[test]
fn volumes_name_paths_in_the_repo_or_declared_volumes() {
    let compose = Compose::load();
    let declared: BTreeSet<String> = compose
        .doc
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().filter_map(scalar).collect())
        .unwrap_or_default();
    let mut problems = Vec::new();
    for name in compose.service_names() {
        for (source, target) in compose.volumes(&name) {
            if source.starts_with('.') {
                if !root().join(&source).exists() {
                    problems.push(format!(
                        "service `{name}` mounts `{source}` (at {target}), which does not exist in the repo"
                    ));
                }
            } else if source.starts_with('/') {
                problems.push(format!(
                    "service `{name}` mounts the host's absolute path `{source}`: use a path under the repo (./...) or a named volume"
                ));
            } else if !declared.contains(&source) {
                problems.push(format!(
                    "service `{name}` uses volume `{source}`, which is not declared under the top-level `volumes:`"
                ));
            }
        }
    }
    for needed in ["postgres", "grafana", "tollgate"] {
        if !compose
            .volumes(needed)
            .iter()
            .any(|(source, _)| declared.contains(source))
        {
            problems.push(format!(
                "service `{needed}` has no named volume: its data would not outlive the container"
            ));
        }
    }
    assert_no_problems("volume problems", &problems);
}

#[test]
fn tollgate_command_migrates_then_serves_with_config_files_that_exist() {
    let compose = Compose::load();
    let command = compose.command("tollgate");
    let config_dir = image_config_dir();
    let mut problems = Vec::new();
    let configs: Vec<&String> = command
        .windows(2)
        .filter(|w| w[0] == "--config")
        .map(|w| &w[1])
        .collect();
    if configs.is_empty() {
        problems.push(format!(
            "the tollgate service's command names no --config file: {command:?}"
        ));
    }
    for path in configs {
        match normalize(path).strip_prefix(&format!("{config_dir}/")) {
            Some(file) if root().join("config").join(file).is_file() => {}
            Some(file) => problems.push(format!(
                "the tollgate service's command uses {path}, but config/{file} does not exist"
            )),
            None => problems.push(format!(
                "the tollgate service's command uses {path}, outside {config_dir} where {DOCKERFILE} copies config/"
            )),
        }
    }
    let migrate = command.iter().position(|w| w == "migrate");
    let serve = command.iter().position(|w| w == "serve");
    if !matches!((migrate, serve), (Some(m), Some(s)) if m < s) {
        problems.push(format!(
            "the tollgate service's command must run `migrate` and then `serve`: {command:?}"
        ));
    }
    assert_no_problems("the tollgate service's command", &problems);
}

#[test]
fn tollgate_publishes_the_listeners_of_compose_toml() {
    let compose = Compose::load();
    let config = compose_config(&compose);
    let server = &config.server;
    let listeners = [
        ("server.listen", server.listen),
        ("server.admin_listen", server.admin_listen),
        ("server.metrics_listen", server.metrics_listen),
    ];
    let published: BTreeSet<u16> = compose
        .published_container_ports("tollgate")
        .unwrap_or_else(|e| panic!("{COMPOSE}: {e}"))
        .into_iter()
        .collect();
    let mut problems = Vec::new();
    for (key, address) in listeners {
        if !address.ip().is_unspecified() {
            problems.push(format!(
                "{COMPOSE_CONFIG}: {key} = {address} is unreachable from outside the container: listen on 0.0.0.0"
            ));
        }
        if !published.contains(&address.port()) {
            problems.push(format!(
                "{COMPOSE}: the tollgate service does not publish port {} ({key} in {COMPOSE_CONFIG}); it publishes {published:?}",
                address.port()
            ));
        }
    }
    let listened: BTreeSet<u16> = listeners.iter().map(|(_, a)| a.port()).collect();
    for port in published.difference(&listened) {
        problems.push(format!(
            "{COMPOSE}: the tollgate service publishes container port {port}, which no listener in {COMPOSE_CONFIG} uses"
        ));
    }
    let spool = config.metering.spool_dir.display().to_string();
    if !compose
        .volumes("tollgate")
        .iter()
        .any(|(_, target)| normalize(target) == normalize(&spool))
    {
        problems.push(format!(
            "{COMPOSE}: metering.spool_dir = {spool} in {COMPOSE_CONFIG} is not a volume of the tollgate service: the spool would be lost with the container"
        ));
    }
    assert_no_problems("tollgate's ports and volumes", &problems);
}

#[test]
fn compose_toml_backends_are_the_gpu_sim_services() {
    let compose = Compose::load();
    let config = compose_config(&compose);
    let services = compose.service_names();
    let mut problems = Vec::new();
    for backend in &config.backends {
        let host = &backend.host;
        let port = backend.address.rsplit(':').next().unwrap_or_default();
        if !services.contains(host) {
            problems.push(format!(
                "{COMPOSE_CONFIG}: backend `{}` points at `{host}`, which is not a service in {COMPOSE}",
                backend.name
            ));
            continue;
        }
        match compose.listen_port(host) {
            Some(listen) if listen.to_string() == port => {}
            Some(listen) => problems.push(format!(
                "{COMPOSE_CONFIG}: backend `{}` uses port {port}, but service `{host}` listens on {listen} (--listen in its command)",
                backend.name
            )),
            None => problems.push(format!(
                "{COMPOSE}: service `{host}` (backend `{}`) has no `--listen HOST:PORT` in its command",
                backend.name
            )),
        }
    }
    for sim in compose.gpu_sim_services() {
        if !config.backends.iter().any(|b| b.host == sim) {
            problems.push(format!(
                "{COMPOSE}: service `{sim}` runs gpu-sim but no backend in {COMPOSE_CONFIG} points at it"
            ));
        }
    }
    if compose.gpu_sim_services().len() < 2 {
        problems.push(format!(
            "{COMPOSE}: expected two gpu-sim services, found {:?}",
            compose.gpu_sim_services()
        ));
    }
    assert_no_problems("backends", &problems);
}

#[test]
fn prometheus_scrapes_compose_services_on_their_ports() {
    let compose = Compose::load();
    let config = compose_config(&compose);
    let prometheus = yaml(PROMETHEUS_CONFIG);
    let mut problems = Vec::new();

    // Where deploy/prometheus/ lands in the container: the config file and the
    // rule files must be under it.
    let host_dir = Path::new(PROMETHEUS_CONFIG)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mounted = compose.mount_target("prometheus", &host_dir);
    match &mounted {
        None => problems.push(format!(
            "{COMPOSE}: the prometheus service does not mount ./{host_dir}"
        )),
        Some(dir) => {
            let config_file = format!("{}/prometheus.yml", dir.trim_end_matches('/'));
            let flag = format!("--config.file={config_file}");
            if !compose.command("prometheus").contains(&flag) {
                problems.push(format!(
                    "{COMPOSE}: the prometheus service's command should pass {flag} (./{PROMETHEUS_CONFIG} is mounted there)"
                ));
            }
            let rule_files: Vec<String> = prometheus
                .get("rule_files")
                .and_then(Value::as_sequence)
                .map(|s| s.iter().filter_map(scalar).collect())
                .unwrap_or_default();
            let glob = format!("{}/alerts*.yml", dir.trim_end_matches('/'));
            if !rule_files.contains(&glob) {
                problems.push(format!(
                    "{PROMETHEUS_CONFIG}: rule_files should include \"{glob}\" (alerts written to ./{host_dir}); it has {rule_files:?}"
                ));
            }
        }
    }

    let mut scraped: HashMap<String, Vec<u16>> = HashMap::new();
    let jobs = prometheus
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    if jobs.is_empty() {
        problems.push(format!("{PROMETHEUS_CONFIG} has no scrape_configs"));
    }
    let services = compose.service_names();
    for job in &jobs {
        let job_name = job.get("job_name").and_then(scalar).unwrap_or_default();
        let path = job
            .get("metrics_path")
            .and_then(scalar)
            .unwrap_or_else(|| "/metrics".into());
        if path != "/metrics" {
            problems.push(format!(
                "{PROMETHEUS_CONFIG}: job `{job_name}` scrapes {path}; tollgate and gpu-sim serve /metrics"
            ));
        }
        let targets = job
            .get("static_configs")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("targets").and_then(Value::as_sequence))
            .flatten()
            .filter_map(scalar);
        for target in targets {
            let Some((host, port)) = target
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            else {
                problems.push(format!(
                    "{PROMETHEUS_CONFIG}: job `{job_name}` target `{target}` is not HOST:PORT"
                ));
                continue;
            };
            if !services.contains(&host) {
                problems.push(format!(
                    "{PROMETHEUS_CONFIG}: job `{job_name}` scrapes `{host}`, which is not a service in {COMPOSE}"
                ));
            }
            scraped.entry(host).or_default().push(port);
        }
    }

    let metrics_port = config.server.metrics_listen.port();
    match scraped.get("tollgate") {
        Some(ports) if ports.contains(&metrics_port) => {}
        other => problems.push(format!(
            "{PROMETHEUS_CONFIG}: tollgate must be scraped at tollgate:{metrics_port} (server.metrics_listen in {COMPOSE_CONFIG}); found ports {other:?}"
        )),
    }
    for sim in compose.gpu_sim_services() {
        let Some(listen) = compose.listen_port(&sim) else {
            continue; // reported by compose_toml_backends_are_the_gpu_sim_services
        };
        match scraped.get(&sim) {
            Some(ports) if ports.contains(&listen) => {}
            other => problems.push(format!(
                "{PROMETHEUS_CONFIG}: gpu-sim service `{sim}` must be scraped at {sim}:{listen} (its --listen); found ports {other:?}"
            )),
        }
    }
    assert_no_problems("Prometheus scrape configuration", &problems);
}

#[test]
fn grafana_datasources_reach_prometheus_and_postgres_from_the_environment() {
    let compose = Compose::load();
    let datasources = yaml(GRAFANA_DATASOURCES);
    let grafana_env = compose.environment("grafana");
    let mut problems = Vec::new();
    if compose
        .mount_target("grafana", "./grafana/provisioning")
        .as_deref()
        != Some("/etc/grafana/provisioning")
    {
        problems.push(format!(
            "{COMPOSE}: the grafana service must mount ./grafana/provisioning at /etc/grafana/provisioning"
        ));
    }
    let list = datasources
        .get("datasources")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let of_type = |kinds: &[&str]| {
        list.iter()
            .find(|d| {
                d.get("type")
                    .and_then(scalar)
                    .is_some_and(|t| kinds.contains(&t.as_str()))
            })
            .cloned()
    };
    match of_type(&["prometheus"]) {
        Some(d) if d.get("url").and_then(scalar).as_deref() == Some("http://prometheus:9090") => {}
        Some(d) => problems.push(format!(
            "{GRAFANA_DATASOURCES}: the Prometheus datasource's url should be http://prometheus:9090, not {:?}",
            d.get("url")
        )),
        None => problems.push(format!(
            "{GRAFANA_DATASOURCES} has no Prometheus datasource"
        )),
    }
    match of_type(&["postgres", "grafana-postgresql-datasource"]) {
        None => problems.push(format!("{GRAFANA_DATASOURCES} has no Postgres datasource")),
        Some(d) => {
            let fields = [
                ("url", d.get("url")),
                ("user", d.get("user")),
                (
                    "jsonData.database",
                    d.get("jsonData").and_then(|j| j.get("database")),
                ),
                (
                    "secureJsonData.password",
                    d.get("secureJsonData").and_then(|j| j.get("password")),
                ),
            ];
            for (field, value) in fields {
                let value = value.and_then(scalar).unwrap_or_default();
                match env_reference(&value) {
                    Some(var) if grafana_env.contains_key(var) => {}
                    Some(var) => problems.push(format!(
                        "{GRAFANA_DATASOURCES}: Postgres {field} reads ${var}, which the grafana service in {COMPOSE} does not set"
                    )),
                    None => problems.push(format!(
                        "{GRAFANA_DATASOURCES}: Postgres {field} should come from the environment ($__env{{VAR}}), not `{value}`"
                    )),
                }
            }
        }
    }
    assert_no_problems("Grafana datasources", &problems);
}

#[test]
fn grafana_dashboard_provider_reads_the_mounted_dashboards_folder() {
    let compose = Compose::load();
    let providers = yaml(GRAFANA_DASHBOARD_PROVIDERS);
    let mut problems = Vec::new();
    let mounted = compose.mount_target("grafana", "./grafana/dashboards");
    if mounted.is_none() {
        problems.push(format!(
            "{COMPOSE}: the grafana service must mount ./grafana/dashboards (where {GRAFANA_DASHBOARD_PROVIDERS} reads them)"
        ));
    }
    let list = providers
        .get("providers")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let files: Vec<Value> = list
        .into_iter()
        .filter(|p| p.get("type").and_then(scalar).as_deref() == Some("file"))
        .collect();
    if files.is_empty() {
        problems.push(format!(
            "{GRAFANA_DASHBOARD_PROVIDERS} has no provider of type `file`"
        ));
    }
    for provider in &files {
        let path = provider
            .get("options")
            .and_then(|o| o.get("path"))
            .and_then(scalar)
            .unwrap_or_default();
        if let Some(target) = &mounted
            && normalize(&path) != normalize(target)
        {
            problems.push(format!(
                "{GRAFANA_DASHBOARD_PROVIDERS}: options.path is `{path}`, but {COMPOSE} mounts ./grafana/dashboards at `{target}`"
            ));
        }
    }
    let dashboards = std::fs::read_dir(root().join("grafana/dashboards"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0);
    if dashboards == 0 {
        problems.push("grafana/dashboards holds no dashboard (*.json)".to_owned());
    }
    assert_no_problems("Grafana dashboard provisioning", &problems);
}

/// Everything but the public API is for this host only: admin API, metrics,
/// Prometheus, the backends and Grafana (whose login is the only thing
/// between the Internet and every account's usage) are reached from
/// elsewhere through a tunnel or a proxy of the operator's choice.
#[test]
fn only_the_public_api_is_published_beyond_this_host() {
    let compose = Compose::load();
    let public = compose_config(&compose).server.listen.port();
    let mut problems = Vec::new();
    for name in compose.service_names() {
        let ports = compose
            .published_ports(&name)
            .unwrap_or_else(|e| panic!("{COMPOSE}: {e}"));
        for port in ports {
            if name == "tollgate" && port.container == public {
                continue;
            }
            if !matches!(port.host_ip.as_deref(), Some("127.0.0.1" | "[::1]" | "::1")) {
                problems.push(format!(
                    "{COMPOSE}: service `{name}` publishes container port {} on {}: write \"127.0.0.1:{0}:{0}\"",
                    port.container,
                    port.host_ip.as_deref().unwrap_or("every interface")
                ));
            }
        }
    }
    if !compose
        .published_container_ports("grafana")
        .unwrap_or_default()
        .contains(&3000)
    {
        problems.push(format!(
            "{COMPOSE}: the grafana service does not publish 3000"
        ));
    }
    assert_no_problems("ports open beyond this host", &problems);
}

/// Grafana's Postgres datasource logs in as the read-only role the
/// migrations create, with the password `tollgate migrate` gives it, never as
/// the owner of the tables.
#[test]
fn grafana_logs_in_to_postgres_as_the_read_only_role() {
    let compose = Compose::load();
    let datasources = yaml(GRAFANA_DATASOURCES);
    let grafana = compose.environment("grafana");
    let (grafana_raw, tollgate_raw) = (
        compose.raw_environment("grafana"),
        compose.raw_environment("tollgate"),
    );
    let role = tollgate::db::GRAFANA_ROLE;
    let mut problems = Vec::new();
    let postgres = datasources
        .get("datasources")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|d| {
            d.get("type")
                .and_then(scalar)
                .is_some_and(|t| t == "postgres" || t == "grafana-postgresql-datasource")
        })
        .unwrap_or_else(|| panic!("{GRAFANA_DATASOURCES} has no Postgres datasource"));
    let variable = |field: Option<&Value>| {
        field
            .and_then(scalar)
            .and_then(|v| env_reference(&v).map(str::to_owned))
            .unwrap_or_default()
    };
    let user_var = variable(postgres.get("user"));
    match grafana.get(&user_var) {
        Some(user) if user == role => {}
        other => problems.push(format!(
            "{COMPOSE}: the grafana service's {user_var} (the datasource's user) is {other:?}; it must be the read-only role {role}"
        )),
    }
    let migration = read("sql/V7__grafana_reader.sql");
    if !migration.contains(&format!("CREATE ROLE {role} NOLOGIN")) {
        problems.push(format!(
            "sql/V7__grafana_reader.sql does not create the role {role} (NOLOGIN)"
        ));
    }
    let password_var = variable(
        postgres
            .get("secureJsonData")
            .and_then(|j| j.get("password")),
    );
    let datasource_password = grafana_raw.get(&password_var).cloned().unwrap_or_default();
    let migrate_password = tollgate_raw
        .get("GRAFANA_DB_PASSWORD")
        .cloned()
        .unwrap_or_default();
    if interpolate(&migrate_password).is_empty() {
        problems.push(format!(
            "{COMPOSE}: the tollgate service does not set GRAFANA_DB_PASSWORD, so `tollgate migrate` never lets {role} log in"
        ));
    }
    if datasource_password != migrate_password {
        problems.push(format!(
            "{COMPOSE}: the datasource's password ({password_var} = {datasource_password}) is not the GRAFANA_DB_PASSWORD the tollgate service migrates with ({migrate_password})"
        ));
    }
    if datasource_password.contains("POSTGRES_PASSWORD") {
        problems.push(format!(
            "{COMPOSE}: Grafana must not hold POSTGRES_PASSWORD, the tables' owner's password"
        ));
    }
    assert_no_problems("Grafana's Postgres login", &problems);
}

/// The variable a Grafana provisioning value reads: `$__env{VAR}`, `${VAR}` or `$VAR`.
fn env_reference(value: &str) -> Option<&str> {
    let var = value
        .strip_prefix("$__env{")
        .or_else(|| value.strip_prefix("${"))
        .and_then(|v| v.strip_suffix('}'))
        .or_else(|| value.strip_prefix('$'))?;
    (!var.is_empty() && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')).then_some(var)
}

#[test]
fn dockerfile_runtime_stage_runs_unprivileged_with_a_healthcheck() {
    let compose = Compose::load();
    let config = compose_config(&compose);
    let stages = dockerfile_stages();
    let mut problems = Vec::new();
    if stages.len() < 2 {
        problems.push(format!(
            "{DOCKERFILE} should be multi-stage (build, then runtime); it has {} stage(s)",
            stages.len()
        ));
    }
    let runtime = runtime_stage();
    let last = |keyword: &str| {
        runtime
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, args)| args.clone())
    };
    match last("USER") {
        None => problems.push(format!(
            "the runtime stage of {DOCKERFILE} has no USER: the container would run as root"
        )),
        Some(user) => {
            let name = user.split(':').next().unwrap_or_default();
            if name == "root" || name == "0" {
                problems.push(format!(
                    "the runtime stage of {DOCKERFILE} runs as `{user}`; use a non-root user"
                ));
            }
        }
    }
    let public_port = config.server.listen.port();
    match last("HEALTHCHECK") {
        None => problems.push(format!(
            "the runtime stage of {DOCKERFILE} has no HEALTHCHECK"
        )),
        Some(check) => {
            let url = format!(":{public_port}/healthz");
            if !check.contains(&url) {
                problems.push(format!(
                    "the HEALTHCHECK of {DOCKERFILE} should request {url} (server.listen in {COMPOSE_CONFIG}): {check}"
                ));
            }
        }
    }
    for binary in ["tollgate", "gpu-sim"] {
        let copied = runtime.iter().any(|(k, args)| {
            k == "COPY"
                && args.contains("--from=")
                && args
                    .split_whitespace()
                    .any(|w| w.ends_with(&format!("/{binary}")))
        });
        if !copied {
            problems.push(format!(
                "the runtime stage of {DOCKERFILE} does not COPY --from the build stage a `{binary}` binary"
            ));
        }
    }
    assert_no_problems(DOCKERFILE, &problems);
}

#[test]
fn interpolation_takes_compose_defaults() {
    assert_eq!(interpolate("a${X:-b}c"), "abc");
    assert_eq!(interpolate("${X-b}"), "b");
    assert_eq!(interpolate("${X}"), "");
    assert_eq!(interpolate("plain"), "plain");
    assert_eq!(
        interpolate("postgres://u:${P:-pw}@h/db"),
        "postgres://u:pw@h/db"
    );
}
