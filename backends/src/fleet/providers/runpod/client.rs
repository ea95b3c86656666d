//! The REST v1 calls the provider makes, and their wire shapes.
//!
//! Shapes follow RunPod's OpenAPI document for REST v1 (docs.runpod.io,
//! "API reference", `openapi.json`, server `https://rest.runpod.io/v1`):
//! `POST /pods` with a `PodCreateInput` answers 201 and a `Pod`;
//! `GET /pods?name=…` answers the array of the account's pods of that name
//! (`ListPods`; terminated pods are not listed);
//! `GET /pods/{podId}` answers a `Pod` or 404; `POST /pods/{podId}/start` and
//! `/stop` answer 200; `DELETE /pods/{podId}` answers 204. Auth is
//! `Authorization: Bearer <api key>`.
//!
//! That document describes no error bodies. Failed calls answer
//! `{"error": "<message>", "status": <code>}`, as reported from the live API
//! (a create without capacity: 500 "create pod: There are no instances
//! currently available"; a resume whose host is full: 500 "start pod: There
//! are not enough free GPUs on the host machine to start this pod."). RunPod's
//! own CLI (runpodctl `internal/api/client.go`) also accepts `message` and
//! `detail`, and so does [`error_message`].

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Longest piece of an error body kept in an error message.
const MAX_MESSAGE_CHARS: usize = 500;

/// The body of `POST /pods` (RunPod's `PodCreateInput`): the fields Tollgate
/// sets. No `Debug`: `env` may hold tokens.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCreateInput<'a> {
    pub name: &'a str,
    pub image_name: &'a str,
    /// `GPU` (or `CPU`).
    pub compute_type: &'static str,
    /// `SECURE` or `COMMUNITY`.
    pub cloud_type: &'static str,
    pub gpu_type_ids: &'a [String],
    pub gpu_count: u32,
    pub container_disk_in_gb: u32,
    pub volume_in_gb: u32,
    pub volume_mount_path: &'a str,
    pub ports: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub support_public_ip: bool,
}

/// The part of RunPod's `Pod` object the provider reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub id: String,
    /// The name it was created with.
    #[serde(default)]
    pub name: Option<String>,
    /// `RUNNING`, `EXITED` or `TERMINATED`.
    #[serde(default)]
    pub desired_status: Option<String>,
    /// Empty (or null) until the pod runs.
    #[serde(default)]
    pub public_ip: Option<String>,
    /// Container port (as a string) to public port, for the `/tcp` ports;
    /// empty (or null) until the pod runs.
    #[serde(default)]
    pub port_mappings: Option<BTreeMap<String, u16>>,
}

/// A call that failed, with what RunPod said.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// RunPod answered with an error status.
    #[error("{method} {path}: HTTP {status}: {message}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
    },
    #[error("{method} {path}: no answer within {timeout:?}")]
    Timeout {
        method: Method,
        path: String,
        timeout: Duration,
    },
    /// Connecting, sending or reading failed.
    #[error("{method} {path}: {source}")]
    Transport {
        method: Method,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    /// A success status with a body that is not what was asked for.
    #[error("{method} {path}: unexpected answer: {problem}")]
    Decode {
        method: Method,
        path: String,
        problem: String,
    },
}

/// RunPod's pods endpoints, over one connection pool.
#[derive(Debug)]
pub struct PodsClient {
    http: reqwest::Client,
    base: Url,
    key: SecretString,
    timeout: Duration,
}

impl PodsClient {
    pub fn new(api_url: &str, key: SecretString, timeout: Duration) -> anyhow::Result<Self> {
        let base = Url::parse(api_url).with_context(|| format!("`api_url` {api_url}"))?;
        if base.cannot_be_a_base() {
            return Err(anyhow!("`api_url` {api_url} cannot have paths under it"));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the RunPod HTTP client")?;
        Ok(Self {
            http,
            base,
            key,
            timeout,
        })
    }

    pub async fn create_pod(&self, input: &PodCreateInput<'_>) -> Result<Pod, ApiError> {
        let (method, path) = (Method::POST, "/pods".to_owned());
        let body = self
            .send(method.clone(), &["pods"], &[], Some(input))
            .await?;
        decode(&method, &path, &body)
    }

    pub async fn get_pod(&self, id: &str) -> Result<Pod, ApiError> {
        let body = self
            .send::<()>(Method::GET, &["pods", id], &[], None)
            .await?;
        decode(&Method::GET, &format!("/pods/{id}"), &body)
    }

    /// The pods named `name`. RunPod filters by name; the answer is checked
    /// again here, so a filter RunPod ignored or matched loosely cannot
    /// make another pod look like this one.
    pub async fn list_pods_named(&self, name: &str) -> Result<Vec<Pod>, ApiError> {
        let body = self
            .send::<()>(Method::GET, &["pods"], &[("name", name)], None)
            .await?;
        let pods: Vec<Pod> = serde_json::from_slice(&body).map_err(|e| ApiError::Decode {
            method: Method::GET,
            path: "/pods".to_owned(),
            problem: format!(
                "not a list of pods ({e}): {}",
                truncate(&String::from_utf8_lossy(&body))
            ),
        })?;
        Ok(pods
            .into_iter()
            .filter(|pod| pod.name.as_deref() == Some(name))
            .collect())
    }

    /// RunPod's answer, when it is a pod.
    pub async fn start_pod(&self, id: &str) -> Result<Option<Pod>, ApiError> {
        let body = self
            .send::<()>(Method::POST, &["pods", id, "start"], &[], None)
            .await?;
        Ok(serde_json::from_slice(&body).ok())
    }

    pub async fn stop_pod(&self, id: &str) -> Result<(), ApiError> {
        self.send::<()>(Method::POST, &["pods", id, "stop"], &[], None)
            .await?;
        Ok(())
    }

    pub async fn delete_pod(&self, id: &str) -> Result<(), ApiError> {
        self.send::<()>(Method::DELETE, &["pods", id], &[], None)
            .await?;
        Ok(())
    }

    /// One request to `base/segments…?query` (each part percent-encoded),
    /// its body when the status is a success.
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&B>,
    ) -> Result<Bytes, ApiError> {
        let path = format!("/{}", segments.join("/"));
        let mut url = self.base.clone();
        if let Ok(mut parts) = url.path_segments_mut() {
            parts.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request = self
            .http
            .request(method.clone(), url)
            .bearer_auth(self.key.expose_secret());
        if let Some(body) = body {
            request = request.json(body);
        }
        let transport = |source: reqwest::Error| {
            if source.is_timeout() {
                ApiError::Timeout {
                    method: method.clone(),
                    path: path.clone(),
                    timeout: self.timeout,
                }
            } else {
                ApiError::Transport {
                    method: method.clone(),
                    path: path.clone(),
                    source,
                }
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(ApiError::Status {
                method,
                path,
                status,
                message: error_message(&body),
            })
        }
    }
}

fn decode(method: &Method, path: &str, body: &[u8]) -> Result<Pod, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Decode {
        method: method.clone(),
        path: path.to_owned(),
        problem: format!(
            "not a pod ({e}): {}",
            truncate(&String::from_utf8_lossy(body))
        ),
    })
}

/// The message in an error body: `error`, `message` or `detail` of a JSON
/// object, else the body itself.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Envelope {
        error: Option<String>,
        message: Option<String>,
        detail: Option<String>,
    }
    let text = String::from_utf8_lossy(body);
    let message = serde_json::from_slice::<Envelope>(body)
        .ok()
        .and_then(|e| e.error.or(e.message).or(e.detail))
        .unwrap_or_else(|| text.trim().to_owned());
    if message.is_empty() {
        "(empty body)".to_owned()
    } else {
        truncate(&message)
    }
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_unwrapped_from_runpods_envelopes() {
        let body = br#"{"error":"start pod: There are not enough free GPUs on the host machine to start this pod.","status":500}"#;
        assert_eq!(
            error_message(body),
            "start pod: There are not enough free GPUs on the host machine to start this pod."
        );
        assert_eq!(
            error_message(br#"{"message":"Unauthorized."}"#),
            "Unauthorized."
        );
        assert_eq!(error_message(br#"{"detail":"no capacity"}"#), "no capacity");
        assert_eq!(error_message(b"Bad Gateway\n"), "Bad Gateway");
        assert_eq!(error_message(b""), "(empty body)");
        assert_eq!(error_message(br#"{"status":500}"#), r#"{"status":500}"#);
        assert_eq!(
            error_message("é".repeat(600).as_bytes()).chars().count(),
            501
        );
    }

    /// The documented example pod, trimmed; `costPerHr` is a string there,
    /// and the provider must not care.
    #[test]
    fn documented_pod_shape_decodes() {
        let body = br#"{
            "adjustedCostPerHr": 0.69, "costPerHr": "0.74", "desiredStatus": "RUNNING",
            "id": "xedezhzb9la3ye", "image": "runpod/pytorch:2.1.0", "machineId": "s194cr8pls2z",
            "portMappings": {"22": 10341}, "ports": ["8888/http", "22/tcp"],
            "publicIp": "100.65.0.119", "env": {"ENV_VAR": "value"}
        }"#;
        let pod = decode(&Method::GET, "/pods/x", body).unwrap();
        assert_eq!(pod.id, "xedezhzb9la3ye");
        assert_eq!(pod.desired_status.as_deref(), Some("RUNNING"));
        assert_eq!(pod.public_ip.as_deref(), Some("100.65.0.119"));
        assert_eq!(pod.port_mappings.unwrap().get("22"), Some(&10341));
    }

    #[test]
    fn null_ip_and_mappings_decode_as_absent() {
        let body = br#"{"id":"p","desiredStatus":"EXITED","publicIp":null,"portMappings":null}"#;
        let pod = decode(&Method::GET, "/pods/p", body).unwrap();
        assert_eq!((pod.public_ip, pod.port_mappings), (None, None));
    }

    #[test]
    fn a_body_without_an_id_is_not_a_pod() {
        let error = decode(&Method::POST, "/pods", br#"{"message":"ok"}"#).unwrap_err();
        assert!(
            error.to_string().contains("POST /pods: unexpected answer"),
            "{error}"
        );
        assert!(
            serde_json::from_slice::<Pod>(br#"{"message":"Pod successfully started."}"#).is_err()
        );
    }

    #[test]
    fn create_input_uses_runpods_field_names() {
        let (gpus, ports, env) = (
            vec!["NVIDIA A40".to_owned()],
            vec!["8000/tcp".to_owned()],
            BTreeMap::from([("HF_HOME".to_owned(), "/workspace/hf".to_owned())]),
        );
        let input = PodCreateInput {
            name: "n",
            image_name: "img",
            compute_type: "GPU",
            cloud_type: "SECURE",
            gpu_type_ids: &gpus,
            gpu_count: 1,
            container_disk_in_gb: 50,
            volume_in_gb: 20,
            volume_mount_path: "/workspace",
            ports: &ports,
            env: &env,
            support_public_ip: true,
        };
        let mut keys: Vec<String> = serde_json::to_value(&input)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "cloudType",
                "computeType",
                "containerDiskInGb",
                "env",
                "gpuCount",
                "gpuTypeIds",
                "imageName",
                "name",
                "ports",
                "supportPublicIp",
                "volumeInGb",
                "volumeMountPath"
            ]
        );
    }
}
