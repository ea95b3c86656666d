//! RunPod's pods API as a [`Provider`]: a pod is rented from a template,
//! stopped to keep its volume (the weights) while only storage is billed,
//! resumed on the same host when that host still has a free GPU, and deleted
//! for good.
//!
//! - this module: the configuration (`[backends.runpod]`) and [`RunPod`],
//!   which turns pods into [`Instance`]s and RunPod's answers into
//!   [`ProviderError`]s;
//! - `client`: the REST v1 calls and their wire shapes (private).
//!
//! Tests run it against `tollgate_testkit::runpod`, a stateful stand-in for
//! the API on loopback (`testkit/src/runpod.rs`), never shipped with this crate.
//!
//! Reaching the inference server: RunPod gives a pod's TCP ports a public
//! `publicIp:port` mapping (`portMappings`) and its HTTP ports only an HTTPS
//! proxy URL. Tollgate connects to the pod directly, so the inference port
//! must be exposed as `PORT/tcp`; [`RunPodConfig::validate`] insists on it.
//!
//! Names: every pod is created under the name the controller gives
//! (`{pod.name}-{backend}-{uuid v7}`), and [`Provider::find`] lists pods by
//! it (`GET /pods?name=…`): that is how a create whose answer was lost is
//! found again instead of rented twice.

mod client;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::{anyhow, bail};
use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use self::client::{ApiError, Pod, PodCreateInput, PodsClient};
use super::{HourlyCost, Instance, InstanceStatus, Provider, ProviderError};

/// RunPod's REST API v1.
pub const DEFAULT_API_URL: &str = "https://rest.runpod.io/v1";

/// RunPod's own CLI gives every REST call 30 s (runpodctl
/// `internal/api/client.go`); a create answers once the pod is scheduled, not
/// once it runs, so it fits too.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest `pod.name`: the controller names each pod
/// `{pod.name}-{backend}-{uuid}`, cutting the backend's name to 64 characters
/// too, and 64 + 1 + 64 + 1 + 36 stays within RunPod's 191 (`maxLength` of
/// a pod's name in its OpenAPI document).
const MAX_PREFIX_LEN: usize = 64;

/// RunPod's answers when no GPU can be had, lowercased. RunPod sends them
/// with HTTP 500 (and in the GraphQL era with 200 and an `errors` list), so
/// the text is all there is to tell "no capacity" from a failure.
const NO_CAPACITY_MESSAGES: &[&str] = &[
    // A resume whose host has had its GPUs rented meanwhile:
    // "start pod: There are not enough free GPUs on the host machine to start this pod."
    "not enough free gpus",
    // A create finding no machine: "create pod: There are no instances currently available".
    "no instances currently available",
    // The same, worded by the older API (still seen through runpodctl):
    // "There are no longer any instances available with the requested specifications."
    "no longer any instances available",
];

/// Where RunPod may place the pod (`cloudType`), spelt as RunPod spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CloudType {
    /// RunPod's data centres; a pod there always has a public IP (RunPod's
    /// default).
    #[default]
    Secure,
    /// Hosts run by others; cheaper, public IP only on hosts that offer one
    /// (the create asks for one with `supportPublicIp`).
    Community,
}

impl CloudType {
    pub fn as_str(self) -> &'static str {
        match self {
            CloudType::Secure => "SECURE",
            CloudType::Community => "COMMUNITY",
        }
    }
}

/// `[backends.runpod]`: the account, what to rent, and how to reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunPodConfig {
    /// Base URL of RunPod's REST API v1; tests point it at the test kit's fake.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// Never printed, not even by `{:?}`.
    pub api_key: SecretString,
    /// What every created pod looks like.
    pub pod: PodTemplate,
    /// The container port the inference server (OpenAI API or Triton)
    /// listens on; it must be in `pod.ports` as `PORT/tcp`.
    pub inference_port: u16,
    /// Bound on each API call ("30s", "500ms").
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

/// The pod to rent: the fields of RunPod's `PodCreateInput`, snake_case.
/// Defaults are RunPod's own.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodTemplate {
    /// How every pod's name begins: pods are named
    /// `{name}-{backend}-{uuid v7}`, a name new to each create, so that a
    /// create whose answer was lost is found again by its name.
    #[serde(default = "default_pod_name")]
    pub name: String,
    /// The container image, e.g. `vllm/vllm-openai:v0.9.1`.
    pub image_name: String,
    /// Acceptable GPU types in order of preference, e.g. `"NVIDIA RTX A6000"`.
    pub gpu_type_ids: Vec<String>,
    #[serde(default = "default_gpu_count")]
    pub gpu_count: u32,
    #[serde(default)]
    pub cloud_type: CloudType,
    /// Wiped on every stop.
    #[serde(default = "default_container_disk_in_gb")]
    pub container_disk_in_gb: u32,
    /// Kept while stopped (and billed): where the weights should live.
    #[serde(default = "default_volume_in_gb")]
    pub volume_in_gb: u32,
    #[serde(default = "default_volume_mount_path")]
    pub volume_mount_path: String,
    /// `PORT/tcp` or `PORT/http`.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Prints the names of `env` but not the values: they are often tokens
/// (`HF_TOKEN`, `VLLM_API_KEY`).
impl fmt::Debug for PodTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodTemplate")
            .field("name", &self.name)
            .field("image_name", &self.image_name)
            .field("gpu_type_ids", &self.gpu_type_ids)
            .field("gpu_count", &self.gpu_count)
            .field("cloud_type", &self.cloud_type)
            .field("container_disk_in_gb", &self.container_disk_in_gb)
            .field("volume_in_gb", &self.volume_in_gb)
            .field("volume_mount_path", &self.volume_mount_path)
            .field("ports", &self.ports)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn default_api_url() -> String {
    DEFAULT_API_URL.to_owned()
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn default_pod_name() -> String {
    "tollgate".to_owned()
}

fn default_gpu_count() -> u32 {
    1
}

fn default_container_disk_in_gb() -> u32 {
    50
}

fn default_volume_in_gb() -> u32 {
    20
}

fn default_volume_mount_path() -> String {
    "/workspace".to_owned()
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(text.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration like \"30s\" or \"500ms\": {e}"
        ))
    })
}

impl RunPodConfig {
    /// Checks what RunPod would refuse, or accept and then leave Tollgate
    /// unable to reach the pod. Each error names the key to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        let url = reqwest::Url::parse(&self.api_url)
            .map_err(|e| anyhow!("`api_url`: `{}` is not a URL: {e}", self.api_url))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            bail!("`api_url`: `{}` is not an http(s) URL", self.api_url);
        }
        if self.api_key.expose_secret().trim().is_empty() {
            bail!("`api_key` is empty");
        }
        if self.timeout.is_zero() {
            bail!("`timeout` must be more than 0s");
        }
        if self.inference_port == 0 {
            bail!("`inference_port` must be a port number (1-65535)");
        }
        let pod = &self.pod;
        if pod.name.trim().is_empty() || pod.name.chars().count() > MAX_PREFIX_LEN {
            bail!(
                "`pod.name` must have 1 to {MAX_PREFIX_LEN} characters: it begins the name \
                 of every pod, `{{pod.name}}-{{backend}}-{{uuid}}`"
            );
        }
        if pod.image_name.trim().is_empty() {
            bail!("`pod.image_name` is empty: name the container image to run");
        }
        if pod.gpu_type_ids.is_empty() || pod.gpu_type_ids.iter().any(|id| id.trim().is_empty()) {
            bail!("`pod.gpu_type_ids` must list GPU types, e.g. [\"NVIDIA RTX A6000\"]");
        }
        if pod.gpu_count == 0 {
            bail!("`pod.gpu_count` must be at least 1");
        }
        for port in &pod.ports {
            let valid = port.split_once('/').is_some_and(|(number, protocol)| {
                number.parse::<u16>().is_ok_and(|n| n > 0) && matches!(protocol, "tcp" | "http")
            });
            if !valid {
                bail!("`pod.ports`: `{port}` is not like \"8000/tcp\" or \"8888/http\"");
            }
        }
        let tcp = format!("{}/tcp", self.inference_port);
        if !pod.ports.contains(&tcp) {
            bail!(
                "`pod.ports` must contain \"{tcp}\": RunPod maps only TCP ports to \
                 publicIp:port, and Tollgate reaches `inference_port` that way \
                 (\"/http\" ports are served only through RunPod's HTTPS proxy)"
            );
        }
        Ok(())
    }
}

/// RunPod pods as GPU instances. Every trait call is one HTTP request,
/// bounded by [`RunPodConfig::timeout`]; nothing is retried here.
#[derive(Debug)]
pub struct RunPod {
    client: PodsClient,
    pod: PodTemplate,
    inference_port: u16,
    cost: HourlyCost,
}

impl RunPod {
    /// Validates `config` and builds the HTTP client; sends nothing yet.
    /// `cost`: the pod's hourly prices (the backend's `hourly_cost` and
    /// `stopped_hourly_cost`).
    pub fn new(config: RunPodConfig, cost: HourlyCost) -> anyhow::Result<Self> {
        config.validate()?;
        let client = PodsClient::new(&config.api_url, config.api_key, config.timeout)?;
        Ok(Self {
            client,
            pod: config.pod,
            inference_port: config.inference_port,
            cost,
        })
    }

    fn create_input<'a>(&'a self, name: &'a str) -> PodCreateInput<'a> {
        let pod = &self.pod;
        PodCreateInput {
            name,
            image_name: &pod.image_name,
            compute_type: "GPU",
            cloud_type: pod.cloud_type.as_str(),
            gpu_type_ids: &pod.gpu_type_ids,
            gpu_count: pod.gpu_count,
            container_disk_in_gb: pod.container_disk_in_gb,
            volume_in_gb: pod.volume_in_gb,
            volume_mount_path: &pod.volume_mount_path,
            ports: &pod.ports,
            env: &pod.env,
            // Without it a Community Cloud pod may get no public IP, and then
            // no address Tollgate can reach. Secure Cloud pods always have one.
            support_public_ip: true,
        }
    }

    fn instance(&self, pod: &Pod) -> Instance {
        Instance {
            id: pod.id.clone(),
            address: address(pod, self.inference_port),
        }
    }
}

/// `publicIp:port` for `inference_port`, once the pod runs and RunPod has
/// assigned both (they are empty while the container starts and after a
/// stop; a resumed pod may get a different port).
fn address(pod: &Pod, inference_port: u16) -> Option<String> {
    if pod.desired_status.as_deref() != Some("RUNNING") {
        return None;
    }
    let ip = pod
        .public_ip
        .as_deref()
        .map(str::trim)
        .filter(|ip| !ip.is_empty())?;
    let port = pod
        .port_mappings
        .as_ref()?
        .get(&inference_port.to_string())?;
    Some(if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    })
}

/// RunPod's `desiredStatus` (`RUNNING`, `EXITED`, `TERMINATED`) as an
/// [`InstanceStatus`]. A pod RUNNING without an address is still starting.
fn status(pod: &Pod, inference_port: u16) -> Result<InstanceStatus, ProviderError> {
    match pod.desired_status.as_deref() {
        Some("RUNNING") if address(pod, inference_port).is_some() => Ok(InstanceStatus::Running),
        Some("RUNNING") => Ok(InstanceStatus::Pending),
        Some("EXITED") => Ok(InstanceStatus::Stopped),
        Some("TERMINATED") => Ok(InstanceStatus::Terminated),
        other => Err(ProviderError::Other(anyhow!(
            "runpod: pod {} has desiredStatus {other:?}, not RUNNING, EXITED or TERMINATED",
            pod.id
        ))),
    }
}

/// The call an [`ApiError`] came from, which decides what it means.
#[derive(Debug, Clone, Copy)]
enum Call<'a> {
    Create,
    List,
    Start(&'a str),
    Stop(&'a str),
    Terminate(&'a str),
    Status(&'a str),
}

impl<'a> Call<'a> {
    fn pod_id(self) -> Option<&'a str> {
        match self {
            Call::Create | Call::List => None,
            Call::Start(id) | Call::Stop(id) | Call::Terminate(id) | Call::Status(id) => Some(id),
        }
    }

    /// Only renting a GPU can find none free.
    fn can_lack_capacity(self) -> bool {
        match self {
            Call::Create | Call::Start(_) => true,
            Call::List | Call::Stop(_) | Call::Terminate(_) | Call::Status(_) => false,
        }
    }
}

fn is_no_capacity(message: &str) -> bool {
    let message = message.to_lowercase();
    NO_CAPACITY_MESSAGES.iter().any(|m| message.contains(m))
}

fn provider_error(call: Call<'_>, error: ApiError) -> ProviderError {
    if let ApiError::Status {
        status, message, ..
    } = &error
    {
        if let Some(id) = call.pod_id()
            && *status == reqwest::StatusCode::NOT_FOUND
        {
            return ProviderError::NotFound(id.to_owned());
        }
        if call.can_lack_capacity() && is_no_capacity(message) {
            return ProviderError::NoCapacity(format!("runpod: {message}"));
        }
    }
    ProviderError::Other(anyhow::Error::new(error).context("runpod"))
}

#[async_trait]
impl Provider for RunPod {
    fn kind(&self) -> &'static str {
        "runpod"
    }

    async fn create(&self, name: &str) -> Result<Instance, ProviderError> {
        let pod = self
            .client
            .create_pod(&self.create_input(name))
            .await
            .map_err(|e| provider_error(Call::Create, e))?;
        tracing::debug!(pod = %pod.id, name, status = ?pod.desired_status, "runpod: pod created");
        Ok(self.instance(&pod))
    }

    /// `GET /pods?name=…`: RunPod lists no terminated pods.
    async fn find(&self, name: &str) -> Result<Vec<Instance>, ProviderError> {
        let pods = self
            .client
            .list_pods_named(name)
            .await
            .map_err(|e| provider_error(Call::List, e))?;
        Ok(pods
            .iter()
            .filter(|pod| pod.desired_status.as_deref() != Some("TERMINATED"))
            .map(|pod| self.instance(pod))
            .collect())
    }

    async fn start(&self, instance: &Instance) -> Result<Instance, ProviderError> {
        let answer = self
            .client
            .start_pod(&instance.id)
            .await
            .map_err(|e| provider_error(Call::Start(&instance.id), e))?;
        tracing::debug!(pod = %instance.id, "runpod: pod started");
        // RunPod documents no body for a start; when it sends the pod, its
        // address (usually not assigned yet) is used, else `status` finds it.
        Ok(match answer {
            Some(pod) if pod.id == instance.id => self.instance(&pod),
            Some(_) | None => Instance {
                id: instance.id.clone(),
                address: None,
            },
        })
    }

    async fn stop(&self, instance: &Instance) -> Result<(), ProviderError> {
        self.client
            .stop_pod(&instance.id)
            .await
            .map_err(|e| provider_error(Call::Stop(&instance.id), e))?;
        tracing::debug!(pod = %instance.id, "runpod: pod stopped");
        Ok(())
    }

    async fn terminate(&self, instance: &Instance) -> Result<(), ProviderError> {
        self.client
            .delete_pod(&instance.id)
            .await
            .map_err(|e| provider_error(Call::Terminate(&instance.id), e))?;
        tracing::debug!(pod = %instance.id, "runpod: pod deleted");
        Ok(())
    }

    /// A pod RunPod no longer knows (deleted) is [`ProviderError::NotFound`].
    async fn status(
        &self,
        instance: &Instance,
    ) -> Result<(InstanceStatus, Instance), ProviderError> {
        let pod = self
            .client
            .get_pod(&instance.id)
            .await
            .map_err(|e| provider_error(Call::Status(&instance.id), e))?;
        Ok((status(&pod, self.inference_port)?, self.instance(&pod)))
    }

    fn cost(&self) -> HourlyCost {
        self.cost
    }

    fn name_prefix(&self) -> &str {
        &self.pod.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: &str, ip: Option<&str>, mappings: Option<&[(&str, u16)]>) -> Pod {
        Pod {
            id: "xedezhzb9la3ye".to_owned(),
            name: Some("tollgate-gpu-1".to_owned()),
            desired_status: Some(status.to_owned()),
            public_ip: ip.map(str::to_owned),
            port_mappings: mappings.map(|m| m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()),
        }
    }

    #[test]
    fn running_with_ip_and_mapping_is_running_at_that_address() {
        let pod = pod(
            "RUNNING",
            Some("100.65.0.119"),
            Some(&[("22", 10341), ("8000", 41234)]),
        );
        assert_eq!(status(&pod, 8000).unwrap(), InstanceStatus::Running);
        assert_eq!(address(&pod, 8000).as_deref(), Some("100.65.0.119:41234"));
    }

    /// RunPod says RUNNING at once after a create; IP and ports come later.
    #[test]
    fn running_without_ip_or_mapping_is_pending() {
        for pod in [
            pod("RUNNING", Some(""), Some(&[("8000", 41234)])),
            pod("RUNNING", None, Some(&[("8000", 41234)])),
            pod("RUNNING", Some("100.65.0.119"), None),
            pod("RUNNING", Some("100.65.0.119"), Some(&[])),
            // Only the SSH port mapped: the inference port was not exposed as tcp.
            pod("RUNNING", Some("100.65.0.119"), Some(&[("22", 10341)])),
        ] {
            assert_eq!(
                status(&pod, 8000).unwrap(),
                InstanceStatus::Pending,
                "{pod:?}"
            );
            assert_eq!(address(&pod, 8000), None);
        }
    }

    /// A stopped pod may still report its last IP; it is not reachable.
    #[test]
    fn exited_has_no_address_even_with_a_stale_ip() {
        let pod = pod("EXITED", Some("100.65.0.119"), Some(&[("8000", 41234)]));
        assert_eq!(status(&pod, 8000).unwrap(), InstanceStatus::Stopped);
        assert_eq!(address(&pod, 8000), None);
    }

    #[test]
    fn terminated_and_unknown_statuses() {
        assert_eq!(
            status(&pod("TERMINATED", None, None), 8000).unwrap(),
            InstanceStatus::Terminated
        );
        let error = status(&pod("MIGRATING", None, None), 8000).unwrap_err();
        assert!(error.to_string().contains("MIGRATING"), "{error}");
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let pod = pod("RUNNING", Some("2001:db8::7"), Some(&[("8000", 41234)]));
        assert_eq!(address(&pod, 8000).as_deref(), Some("[2001:db8::7]:41234"));
    }

    fn status_error(status: u16, message: &str) -> ApiError {
        ApiError::Status {
            method: reqwest::Method::POST,
            path: "/pods".to_owned(),
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            message: message.to_owned(),
        }
    }

    #[test]
    fn capacity_messages_are_no_capacity_only_where_a_gpu_is_rented() {
        let resume =
            "start pod: There are not enough free GPUs on the host machine to start this pod.";
        let create = "create pod: There are no instances currently available";
        let older = "There are no longer any instances available with the requested specifications. \
                     Please refresh and try again.";
        for message in [resume, create, older] {
            assert!(matches!(
                provider_error(Call::Create, status_error(500, message)),
                ProviderError::NoCapacity(m) if m.contains(message)
            ));
            assert!(matches!(
                provider_error(Call::Start("p"), status_error(500, message)),
                ProviderError::NoCapacity(_)
            ));
            assert!(matches!(
                provider_error(Call::Stop("p"), status_error(500, message)),
                ProviderError::Other(_)
            ));
        }
        assert!(matches!(
            provider_error(
                Call::Create,
                status_error(500, "create pod: internal error")
            ),
            ProviderError::Other(_)
        ));
    }

    #[test]
    fn not_found_names_the_pod_and_keeps_runpods_message_otherwise() {
        assert!(matches!(
            provider_error(Call::Status("abc"), status_error(404, "pod not found")),
            ProviderError::NotFound(id) if id == "abc"
        ));
        // A 404 on create is no missing instance.
        let error = provider_error(Call::Create, status_error(404, "no such route"));
        let text = format!("{:#}", anyhow::Error::from(error));
        assert!(
            text.contains("404") && text.contains("no such route"),
            "{text}"
        );
    }
}
