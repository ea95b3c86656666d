//! ComfyUI, the node-graph image server most image services run. Its API is
//! asynchronous and knows nothing of OpenAI's: a workflow graph (API format)
//! is queued with `POST /prompt`, `GET /history/{prompt_id}` shows its
//! outputs once it has run, and `GET /view` serves each image. The gateway
//! runs an OpenAI images request (`/v1/images/generations`) on it as the
//! backend's workflow template with the request's fields filled in; this
//! module holds the pure parts: filling the template, reading the history,
//! and writing OpenAI's answer.
//!
//! A template is a workflow exported from ComfyUI ("Save (API)") whose
//! values to fill are strings naming a field: `"{{prompt}}"`,
//! `"{{negative_prompt}}"`, `"{{width}}"`, `"{{height}}"`, `"{{n}}"` (the
//! batch size), `"{{seed}}"` and `"{{steps}}"`. Numbers are written as
//! numbers. Other values are left as they are.

use base64::Engine;
use serde_json::{Map, Value, json};

/// What an images request asks of a workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageAsk {
    pub prompt: String,
    pub negative_prompt: String,
    /// Images in the batch (`n`).
    pub n: u64,
    pub width: u64,
    pub height: u64,
    pub seed: u64,
    pub steps: u64,
}

/// The size when the request names none (OpenAI's default).
const DEFAULT_SIZE: (u64, u64) = (1024, 1024);
/// Sampler steps when the request names none.
pub const DEFAULT_STEPS: u64 = 20;
/// The most steps a request may ask: each is GPU time.
pub const MAX_STEPS: u64 = 150;
/// ComfyUI's largest latent side.
const MAX_SIDE: u64 = 16_384;

impl ImageAsk {
    /// The fields of an OpenAI images request (and the extensions image
    /// servers take: `negative_prompt`, `seed`, `steps`); `seed` when the
    /// request names none.
    pub fn from_request(body: &Value, seed: u64) -> Result<Self, String> {
        let prompt = body["prompt"]
            .as_str()
            .filter(|p| !p.trim().is_empty())
            .ok_or("`prompt` must be a non-empty string")?;
        let number = |field: &str, default: u64| match &body[field] {
            Value::Null => Ok(default),
            value => value
                .as_u64()
                .ok_or_else(|| format!("`{field}` must be a whole number, 0 or more")),
        };
        let (width, height) = match body["size"].as_str() {
            None | Some("auto") => DEFAULT_SIZE,
            Some(size) => size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                .filter(|&(w, h): &(u64, u64)| {
                    (1..=MAX_SIDE).contains(&w) && (1..=MAX_SIDE).contains(&h)
                })
                .ok_or_else(|| {
                    format!("`size` must be WIDTHxHEIGHT, such as 1024x1024 (not `{size}`)")
                })?,
        };
        let steps = number("steps", DEFAULT_STEPS)?;
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(format!("`steps` must be between 1 and {MAX_STEPS}"));
        }
        Ok(Self {
            prompt: prompt.to_owned(),
            negative_prompt: body["negative_prompt"].as_str().unwrap_or("").to_owned(),
            n: number("n", 1)?.max(1),
            width,
            height,
            seed: number("seed", seed)?,
            steps,
        })
    }

    fn value(&self, field: &str) -> Option<Value> {
        Some(match field {
            "prompt" => self.prompt.clone().into(),
            "negative_prompt" => self.negative_prompt.clone().into(),
            "n" => self.n.into(),
            "width" => self.width.into(),
            "height" => self.height.into(),
            "seed" => self.seed.into(),
            "steps" => self.steps.into(),
            _ => return None,
        })
    }
}

/// The placeholder a template value names, if it is one.
fn placeholder(value: &str) -> Option<&str> {
    value.strip_prefix("{{")?.strip_suffix("}}").map(str::trim)
}

/// Checks a workflow template: a graph of nodes (each with a `class_type`
/// and `inputs`) that fills at least the prompt, and names no field that
/// does not exist.
pub fn check_template(template: &Value) -> Result<(), String> {
    let nodes = template
        .as_object()
        .filter(|nodes| !nodes.is_empty())
        .ok_or("a workflow is a JSON object of nodes, as ComfyUI's \"Save (API)\" writes it")?;
    let mut fills_prompt = false;
    for (id, node) in nodes {
        if !node["class_type"].is_string() || !node["inputs"].is_object() {
            return Err(format!(
                "node {id} has no `class_type` and `inputs`: not the API format"
            ));
        }
        for value in node["inputs"].as_object().into_iter().flat_map(Map::values) {
            if let Some(field) = value.as_str().and_then(placeholder) {
                let probe = ImageAsk {
                    prompt: String::new(),
                    negative_prompt: String::new(),
                    n: 1,
                    width: 1,
                    height: 1,
                    seed: 0,
                    steps: 1,
                };
                if probe.value(field).is_none() {
                    return Err(format!(
                        "node {id} names `{{{{{field}}}}}`, which is not a field"
                    ));
                }
                fills_prompt |= field == "prompt";
            }
        }
    }
    if fills_prompt {
        Ok(())
    } else {
        Err("no input is \"{{prompt}}\": the request's prompt would not reach the model".to_owned())
    }
}

/// The template with `ask`'s fields in place of its placeholders.
pub fn fill(template: &Value, ask: &ImageAsk) -> Value {
    match template {
        Value::String(text) => placeholder(text)
            .and_then(|field| ask.value(field))
            .unwrap_or_else(|| template.clone()),
        Value::Array(items) => Value::Array(items.iter().map(|v| fill(v, ask)).collect()),
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(k, v)| (k.clone(), fill(v, ask)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// An image a prompt left, as `/view` serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputImage {
    pub filename: String,
    pub subfolder: String,
    pub kind: String,
}

impl OutputImage {
    /// `/view`'s query for it.
    pub fn view_query(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("filename", &self.filename)
            .append_pair("subfolder", &self.subfolder)
            .append_pair("type", &self.kind)
            .finish()
    }
}

/// Where a queued prompt is, from `GET /history/{prompt_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum History {
    /// Not run yet (the history is `{}`).
    Pending,
    /// Run: its output images, in node order.
    Done(Vec<OutputImage>),
    /// It failed, saying why.
    Failed(String),
}

pub fn read_history(prompt_id: &str, history: &Value) -> History {
    let Some(entry) = history.get(prompt_id) else {
        return History::Pending;
    };
    let status = &entry["status"];
    if status["status_str"] == "error" {
        let why = status["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m[0] == "execution_error")
            .and_then(|m| m[1]["exception_message"].as_str())
            .unwrap_or("the workflow failed");
        return History::Failed(why.to_owned());
    }
    if status["completed"] == false {
        return History::Pending;
    }
    let mut outputs: Vec<(&String, &Value)> = entry["outputs"]
        .as_object()
        .map(|o| o.iter().collect())
        .unwrap_or_default();
    outputs.sort_by_key(|(node, _)| node.parse::<u64>().unwrap_or(u64::MAX));
    let images = outputs
        .into_iter()
        .flat_map(|(_, output)| output["images"].as_array().cloned().unwrap_or_default())
        .filter(|image| image["type"] != "temp")
        .filter_map(|image| {
            Some(OutputImage {
                filename: image["filename"].as_str()?.to_owned(),
                subfolder: image["subfolder"].as_str().unwrap_or("").to_owned(),
                kind: image["type"].as_str().unwrap_or("output").to_owned(),
            })
        })
        .collect();
    History::Done(images)
}

/// OpenAI's images answer for the images' bytes.
pub fn images_answer(created: u64, images: &[Vec<u8>]) -> Value {
    let engine = base64::engine::general_purpose::STANDARD;
    let data: Vec<Value> = images
        .iter()
        .map(|png| json!({"b64_json": engine.encode(png)}))
        .collect();
    json!({"created": created, "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Value {
        json!({
            "3": {"class_type": "KSampler", "inputs": {"seed": "{{seed}}", "steps": "{{steps}}",
                  "cfg": 7, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                  "latent_image": ["5", 0]}},
            "5": {"class_type": "EmptyLatentImage",
                  "inputs": {"width": "{{width}}", "height": "{{height}}", "batch_size": "{{n}}"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{negative_prompt}}", "clip": ["4", 1]}},
        })
    }

    #[test]
    fn a_request_fills_the_template_with_typed_values() {
        let body = json!({"prompt": "a lighthouse", "n": 2, "size": "512x768", "seed": 7});
        let ask = ImageAsk::from_request(&body, 99).unwrap();
        let graph = fill(&template(), &ask);
        assert_eq!(graph["3"]["inputs"]["seed"], 7);
        assert_eq!(graph["3"]["inputs"]["steps"], DEFAULT_STEPS);
        assert_eq!(graph["3"]["inputs"]["cfg"], 7);
        assert_eq!(graph["5"]["inputs"]["width"], 512);
        assert_eq!(graph["5"]["inputs"]["height"], 768);
        assert_eq!(graph["5"]["inputs"]["batch_size"], 2);
        assert_eq!(graph["6"]["inputs"]["text"], "a lighthouse");
        assert_eq!(graph["7"]["inputs"]["text"], "");
        // No seed asked: the one given.
        let ask = ImageAsk::from_request(&json!({"prompt": "x"}), 99).unwrap();
        assert_eq!((ask.seed, ask.width, ask.n), (99, 1024, 1));
    }

    #[test]
    fn bad_requests_and_templates_are_refused() {
        for body in [
            json!({}),
            json!({"prompt": " "}),
            json!({"prompt": "x", "size": "big"}),
            json!({"prompt": "x", "size": "0x10"}),
            json!({"prompt": "x", "steps": 1000}),
            json!({"prompt": "x", "seed": -1}),
        ] {
            assert!(ImageAsk::from_request(&body, 0).is_err(), "{body}");
        }
        assert!(check_template(&template()).is_ok());
        assert!(check_template(&json!([])).is_err());
        assert!(check_template(&json!({"1": {"inputs": {}}})).is_err());
        let no_prompt = json!({"1": {"class_type": "X", "inputs": {"text": "fixed"}}});
        assert!(check_template(&no_prompt).is_err());
        let typo =
            json!({"1": {"class_type": "X", "inputs": {"text": "{{prompt}}", "s": "{{sed}}"}}});
        assert!(check_template(&typo).unwrap_err().contains("{{sed}}"));
    }

    #[test]
    fn the_history_says_pending_done_or_failed() {
        assert_eq!(read_history("p1", &json!({})), History::Pending);
        let done = json!({"p1": {"outputs": {
            "12": {"images": [{"filename": "b.png", "subfolder": "", "type": "output"}]},
            "9": {"images": [{"filename": "a.png", "subfolder": "s", "type": "output"},
                             {"filename": "preview.png", "subfolder": "", "type": "temp"}]}},
            "status": {"status_str": "success", "completed": true, "messages": []}}});
        let History::Done(images) = read_history("p1", &done) else {
            panic!("not done");
        };
        let names: Vec<&str> = images.iter().map(|i| i.filename.as_str()).collect();
        assert_eq!(names, ["a.png", "b.png"]);
        assert_eq!(
            images[0].view_query(),
            "filename=a.png&subfolder=s&type=output"
        );
        let failed = json!({"p1": {"outputs": {}, "status": {"status_str": "error", "completed": false,
            "messages": [["execution_error", {"exception_message": "CUDA out of memory"}]]}}});
        assert_eq!(
            read_history("p1", &failed),
            History::Failed("CUDA out of memory".into())
        );
    }
}
