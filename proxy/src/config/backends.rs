//! `[[backends]]`: the inference servers, where each instance comes from
//! (its provider), what it serves and through which admission pool.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use tollgate_backends::fleet::providers::HourlyCost;
use tollgate_backends::fleet::providers::runpod::RunPodConfig;
use tollgate_backends::health::DEFAULT_HEALTH_PATH;
use tollgate_backends::protocol::Protocol;

use super::{ConfigError, Name, defaults, invalid};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    name: Name,
    url: Option<String>,
    #[serde(default)]
    protocol: Protocol,
    models: Vec<String>,
    max_concurrency: Option<u32>,
    pool: Option<Name>,
    credential: Option<SecretString>,
    health_path: Option<String>,
    /// A comfyui backend's workflow template (a file, ComfyUI's API format).
    workflow: Option<PathBuf>,
    #[serde(default)]
    provider: ProviderKind,
    command: Option<Vec<String>>,
    hourly_cost: Option<f64>,
    stopped_hourly_cost: Option<f64>,
    runpod: Option<RunPodConfig>,
}

/// `provider = "…"`: which [`ProviderConfig`] a backend gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum ProviderKind {
    #[default]
    #[serde(rename = "static")]
    Static,
    #[serde(rename = "process")]
    Process,
    #[serde(rename = "runpod")]
    RunPod,
}

/// Where a backend's instance comes from.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    /// An always-on server at `url`: no lifecycle.
    Static,
    /// A local process Tollgate starts and stops; argv with `{port}` for
    /// the port Tollgate picks at start-up.
    Process { command: Vec<String> },
    /// A RunPod pod, rented, stopped and resumed through RunPod's API.
    RunPod(Box<RunPodConfig>),
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Checked by [`Name`] when read.
    pub name: String,
    /// `host:port` to connect to.
    pub address: String,
    /// Host header / TLS server name.
    pub host: String,
    pub tls: bool,
    pub protocol: Protocol,
    /// `GET` path of an OpenAI-style backend's health check.
    pub health_path: String,
    /// A comfyui backend's workflow template, checked
    /// ([`tollgate_backends::protocol::comfyui`]).
    pub workflow: Option<Arc<Value>>,
    pub provider: ProviderConfig,
    /// Hourly prices, running and stopped, for cost accounting.
    pub cost: HourlyCost,
    pub models: Vec<String>,
    pub max_concurrency: u32,
    /// The admission queue this backend's slots belong to: backends serving
    /// the same models share one (named by its `pool`, else by its models
    /// joined with `+`).
    pub pool: String,
    /// Sent upstream as `Authorization: Bearer …` in place of the client's key.
    pub credential: Option<SecretString>,
}

pub(super) fn validate(raw: Vec<RawBackend>) -> Result<Vec<BackendConfig>, ConfigError> {
    let mut names = HashSet::new();
    let mut backends = Vec::new();
    for (i, b) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("backends[{i}].{field}");
        if !names.insert(b.name.clone()) {
            return Err(invalid(
                key("name"),
                format!("backend `{}` is defined twice", b.name),
            ));
        }
        let provider = match (b.provider, b.command, b.runpod) {
            (ProviderKind::Static, None, None) => ProviderConfig::Static,
            (ProviderKind::Process, Some(command), None) if !command.is_empty() => {
                ProviderConfig::Process { command }
            }
            (ProviderKind::Process, _, _) => {
                return Err(invalid(
                    key("command"),
                    "a process backend needs `command`, an argv list (use {port} for the port), and no [runpod]",
                ));
            }
            (ProviderKind::RunPod, None, Some(runpod)) => ProviderConfig::RunPod(Box::new(runpod)),
            (ProviderKind::RunPod, _, _) => {
                return Err(invalid(
                    key("runpod"),
                    "a runpod backend needs a [backends.runpod] table, and no `command`",
                ));
            }
            (ProviderKind::Static, _, _) => {
                return Err(invalid(
                    key("provider"),
                    "`command` and [runpod] need provider = \"process\" or \"runpod\"",
                ));
            }
        };
        let (tls, host, address) = match (&provider, b.url.as_deref()) {
            (ProviderConfig::Static, Some(url)) => {
                parse_backend_url(url).map_err(|problem| invalid(key("url"), problem))?
            }
            (ProviderConfig::Static, None) => {
                return Err(invalid(key("url"), "a static backend needs its `url`"));
            }
            // The address is learnt when the instance starts.
            (_, None) => (false, "127.0.0.1".to_owned(), String::new()),
            (_, Some(_)) => {
                return Err(invalid(
                    key("url"),
                    "only static backends have a `url`; a process or pod gets its address when it starts",
                ));
            }
        };
        if b.protocol == Protocol::Triton && b.health_path.is_some() {
            return Err(invalid(
                key("health_path"),
                "a triton backend is probed at /v2/health/ready and /v2/models/{model}/ready",
            ));
        }
        if matches!(provider, ProviderConfig::Static)
            && (b.hourly_cost.is_some() || b.stopped_hourly_cost.is_some())
        {
            return Err(invalid(
                key("hourly_cost"),
                "prices are accounted for process and runpod backends only",
            ));
        }
        let workflow = match (b.protocol, &b.workflow) {
            (Protocol::ComfyUi, Some(path)) => {
                Some(Arc::new(read_workflow(path).map_err(|problem| {
                    invalid(key("workflow"), format!("{}: {problem}", path.display()))
                })?))
            }
            (Protocol::ComfyUi, None) => {
                return Err(invalid(
                    key("workflow"),
                    "a comfyui backend runs a workflow template: name its file (ComfyUI's \"Save (API)\" format)",
                ));
            }
            (_, Some(_)) => {
                return Err(invalid(
                    key("workflow"),
                    "only a comfyui backend runs a workflow",
                ));
            }
            (_, None) => None,
        };
        let health_path = b.health_path.unwrap_or_else(|| {
            match b.protocol {
                Protocol::ComfyUi => COMFYUI_HEALTH_PATH,
                _ => DEFAULT_HEALTH_PATH,
            }
            .to_owned()
        });
        if !health_path.starts_with('/') || health_path.contains(char::is_whitespace) {
            return Err(invalid(
                key("health_path"),
                "must be a path starting with '/'",
            ));
        }
        let cost = HourlyCost {
            running: b.hourly_cost.unwrap_or(0.0),
            stopped: b.stopped_hourly_cost.unwrap_or(0.0),
        };
        if !(cost.running.is_finite()
            && cost.running >= 0.0
            && cost.stopped.is_finite()
            && cost.stopped >= 0.0)
        {
            return Err(invalid(key("hourly_cost"), "prices must be zero or more"));
        }
        if let Some(credential) = &b.credential
            && (credential.expose_secret().is_empty()
                || !credential
                    .expose_secret()
                    .bytes()
                    .all(|c| c.is_ascii_graphic()))
        {
            return Err(invalid(
                key("credential"),
                "must be printable ASCII with no spaces (it is sent in a header)",
            ));
        }
        if b.models.is_empty() || b.models.iter().any(|m| m.trim().is_empty()) {
            return Err(invalid(
                key("models"),
                "list at least one model name, none empty",
            ));
        }
        let max_concurrency = b
            .max_concurrency
            .unwrap_or(defaults::BACKEND_MAX_CONCURRENCY);
        if max_concurrency == 0 {
            return Err(invalid(key("max_concurrency"), "must be at least 1"));
        }
        let pool = b.pool.map_or_else(
            || {
                let mut models = b.models.clone();
                models.sort();
                models.join("+")
            },
            Name::into_string,
        );
        backends.push(BackendConfig {
            name: b.name.into_string(),
            address,
            host,
            tls,
            protocol: b.protocol,
            health_path,
            workflow,
            provider,
            cost,
            models: b.models,
            max_concurrency,
            pool,
            credential: b.credential,
        });
    }
    if backends.is_empty() {
        return Err(invalid(
            "backends",
            "define at least one [[backends]] entry",
        ));
    }
    // One queue per model: a model served from two pools could take a slot
    // in one and be routed to a backend of the other.
    let mut pool_of: HashMap<&str, &str> = HashMap::new();
    for (i, b) in backends.iter().enumerate() {
        for model in &b.models {
            match pool_of.insert(model, &b.pool) {
                Some(other) if other != b.pool => {
                    return Err(invalid(
                        format!("backends[{i}].pool"),
                        format!(
                            "model `{model}` is served from pools `{other}` and `{}`; \
                             backends sharing a model must share a pool (set the same `pool`)",
                            b.pool
                        ),
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(backends)
}

/// `http://host:port` → (tls, host, "host:port").
fn parse_backend_url(url: &str) -> Result<(bool, String, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("`{url}` must start with http:// or https://")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("`{url}` has no host"))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    if !matches!(uri.path(), "" | "/") {
        return Err(format!(
            "`{url}` must not have a path: Tollgate forwards /v1/... as the client sent it"
        ));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((tls, host, address))
}

/// ComfyUI answers its system stats once it is up.
const COMFYUI_HEALTH_PATH: &str = "/system_stats";

/// A workflow template from its file, checked.
fn read_workflow(path: &std::path::Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let workflow: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    tollgate_backends::protocol::comfyui::check_template(&workflow)?;
    Ok(workflow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{MINIMAL, error, no_env, parse};

    #[test]
    fn a_model_belongs_to_one_pool() {
        let text = format!(
            "{MINIMAL}\n[[backends]]\nname = \"other\"\nurl = \"http://127.0.0.1:8102\"\n\
             models = [\"sim-model\", \"big\"]\n"
        );
        let err = parse(&text, &no_env()).unwrap_err().to_string();
        assert!(err.contains("backends[1].pool"), "{err}");
        let shared = format!("{text}pool = \"sim-model\"\n");
        let config = parse(&shared, &no_env()).unwrap();
        assert_eq!(config.backends[1].pool, config.backends[0].pool);
    }

    #[test]
    fn managed_backend_and_fleet_mistakes_name_the_key() {
        let backend = "[[backends]]\nname = \"gpu\"\nmodels = [\"sim-model\"]\n";
        let cases = [
            (
                format!("{backend}provider = \"process\"\n"),
                "backends[1].command",
            ),
            (
                format!(
                    "{backend}provider = \"process\"\ncommand = [\"sim\"]\nurl = \"http://h:1\"\n"
                ),
                "backends[1].url",
            ),
            (
                format!("{backend}provider = \"gcp\"\n"),
                "backends[1].provider",
            ),
            (
                format!("{backend}url = \"http://h:1\"\nhealth_path = \"health\"\n"),
                "backends[1].health_path",
            ),
            (
                format!("{backend}provider = \"runpod\"\n"),
                "backends[1].runpod",
            ),
            (
                format!(
                    "{backend}provider = \"process\"\ncommand = [\"sim\"]\nhourly_cost = -1.0\n"
                ),
                "backends[1].hourly_cost",
            ),
            (
                format!("{backend}url = \"http://h:1\"\nhourly_cost = 1.0\n"),
                "backends[1].hourly_cost",
            ),
            (
                format!(
                    "{backend}url = \"http://h:1\"\nprotocol = \"triton\"\nhealth_path = \"/h\"\n"
                ),
                "backends[1].health_path",
            ),
            (
                format!("{backend}url = \"http://h:1\"\npool = \"Chat\"\n"),
                "backends[1].pool",
            ),
            (
                format!(
                    "{backend}provider = \"runpod\"\n[backends.runpod]\napi_key = \"k\"\ninference_port = 1\n\
                     [backends.runpod.pod]\nimage_name = \"i\"\ngpu_type_ids = []\nvolume_gb = 1\n"
                ),
                "backends[1].runpod.pod",
            ),
            (
                "[fleet]\nmin_hot = 3\nmax_hot = 2\n".to_owned(),
                "fleet.max_hot",
            ),
            (
                "[fleet]\nresume_queue_depth = 40\n".to_owned(),
                "fleet.scale_in_queue_depth",
            ),
            (
                "[fleet]\nrent_overflow_wait_secs = { gold = 30 }\n".to_owned(),
                "fleet.rent_overflow_wait_secs",
            ),
            (
                "[fleet]\nrent_overflow_wait = { gold = \"30s\" }\n".to_owned(),
                "fleet.rent_overflow_wait",
            ),
        ];
        for (extra, key) in cases {
            let err = error(&extra);
            assert!(err.contains(key), "{extra:?} → {err}");
        }
        let process = format!(
            "{MINIMAL}\n{backend}provider = \"process\"\ncommand = [\"gpu-sim\", \"--listen\", \"127.0.0.1:{{port}}\"]\n\
             [fleet]\nmin_hot = 0\n"
        );
        let config = parse(&process, &no_env()).unwrap();
        assert!(
            matches!(&config.backends[1].provider, ProviderConfig::Process { command } if command.len() == 3)
        );
        assert_eq!(config.fleet.policy.min_hot, 0);
        // Default tier triggers apply only to tiers that exist.
        assert!(
            config
                .fleet
                .policy
                .rent_overflow_wait
                .keys()
                .all(|t| config.tiers.iter().any(|c| &c.name == t))
        );
    }
}
