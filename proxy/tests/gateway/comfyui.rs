//! Image generation on ComfyUI (`protocol = "comfyui"`): an OpenAI images
//! request, live or as a job, runs as the backend's workflow template with
//! its fields filled in, against a stateful fake of ComfyUI's API
//! (`tollgate_testkit::comfyui`); its images come back as `b64_json` and are
//! billed as images.

use base64::Engine;
use tollgate_testkit::comfyui::FakeComfyUi;

use super::*;

/// A text-to-image workflow as ComfyUI's "Save (API)" writes it, with the
/// request's fields as placeholders.
const WORKFLOW: &str = r#"{
  "3": {"class_type": "KSampler", "inputs": {"seed": "{{seed}}", "steps": "{{steps}}", "cfg": 7,
        "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0],
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
  "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
  "5": {"class_type": "EmptyLatentImage", "inputs": {"width": "{{width}}", "height": "{{height}}",
        "batch_size": "{{n}}"}},
  "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}", "clip": ["4", 1]}},
  "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{negative_prompt}}", "clip": ["4", 1]}},
  "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
  "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
}"#;

async fn comfy_gateway(comfy: &FakeComfyUi) -> (Gateway, PathBuf) {
    let workflow = std::env::temp_dir().join(format!("{}.json", unique("workflow")));
    std::fs::write(&workflow, WORKFLOW).unwrap();
    let gateway = Gateway::start(
        &[],
        Options {
            tail: format!(
                "[[backends]]\nname = \"comfy\"\nurl = \"{}\"\nprotocol = \"comfyui\"\n\
                 models = [\"sdxl\"]\nworkflow = \"{}\"\n",
                comfy.url(),
                workflow.display()
            ),
            ..Options::default()
        },
    )
    .await;
    (gateway, workflow)
}

/// The PNGs of an images answer.
fn pngs(answer: &Value) -> Vec<Vec<u8>> {
    answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|image| {
            base64::engine::general_purpose::STANDARD
                .decode(image["b64_json"].as_str().unwrap())
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn image_generations_run_as_the_backends_comfyui_workflow() {
    let comfy = FakeComfyUi::start(20).await;
    let (gateway, workflow) = comfy_gateway(&comfy).await;
    let key = gateway.create_key("studio", &[]);
    let request = json!({"model": "sdxl", "prompt": "a lighthouse at dusk", "n": 2,
                         "size": "64x48", "seed": 42, "steps": 4,
                         "negative_prompt": "blurry"});
    let (status, answer) = gateway
        .post_json(&key, "/v1/images/generations", &request)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        pngs(&answer),
        [0, 1].map(|i| FakeComfyUi::image(42, 64, 48, i)).to_vec()
    );
    // The workflow ComfyUI ran: the template with the request's fields.
    let graph = &comfy.graphs()[0];
    assert_eq!(graph["3"]["inputs"]["seed"], 42);
    assert_eq!(graph["3"]["inputs"]["steps"], 4);
    assert_eq!(
        graph["5"]["inputs"],
        json!({"width": 64, "height": 48, "batch_size": 2})
    );
    assert_eq!(graph["6"]["inputs"]["text"], "a lighthouse at dusk");
    assert_eq!(graph["7"]["inputs"]["text"], "blurry");
    assert_eq!(
        graph["4"]["inputs"]["ckpt_name"],
        "sd_xl_base_1.0.safetensors"
    );
    // Billed as two images.
    let event = eventually_event(&gateway, "image").await;
    assert_eq!((event.unit_kind.as_str(), event.units), ("images", 2));

    // As a job: the images are its result.
    let asked = json!({"model": "sdxl", "prompt": "a harbour", "size": "32x32", "seed": 7});
    let response = gateway
        .ask_async(&key, "/v1/images/generations", &asked, &[])
        .await;
    assert_eq!(response.status(), 202);
    let job: Value = response.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    eventually("the image job succeeds", || async {
        let job: Value = gateway
            .get(&key, &format!("/v1/jobs/{id}"))
            .await
            .json()
            .await
            .unwrap();
        job["status"] == "succeeded"
    })
    .await;
    let result: Value = gateway
        .get(&key, &format!("/v1/jobs/{id}/result"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(pngs(&result), vec![FakeComfyUi::image(7, 32, 32, 0)]);

    // What ComfyUI cannot do is refused, and nothing reaches it.
    let before = comfy.graphs().len();
    for (path, body) in [
        (
            "/v1/chat/completions",
            chat("hi", 4).to_string().replace("sim-model", "sdxl"),
        ),
        (
            "/v1/images/generations",
            json!({"model": "sdxl", "prompt": "x", "size": "huge"}).to_string(),
        ),
        (
            "/v1/images/generations",
            json!({"model": "sdxl", "prompt": "x", "steps": 500}).to_string(),
        ),
    ] {
        let response = gateway
            .client
            .post(format!("{}{path}", gateway.url))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
    }
    assert_eq!(comfy.graphs().len(), before);
    let _ = std::fs::remove_file(workflow);
}

/// The usage event of the last request of `kind`, once stored.
async fn eventually_event(gateway: &Gateway, kind: &str) -> super::metering::StoredEvent {
    eventually(&format!("a {kind} event is stored"), || async {
        gateway.usage_events().await.iter().any(|e| e.kind == kind)
    })
    .await;
    gateway
        .usage_events()
        .await
        .into_iter()
        .rfind(|e| e.kind == kind)
        .unwrap()
}

#[test]
fn a_comfyui_backend_needs_a_workflow_that_fills_the_prompt() {
    struct NoEnv;
    impl tollgate::config::Env for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }
    let dir = std::env::temp_dir().join(unique("workflows"));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |workflow: Option<&str>| {
        let mut config = "[[tiers]]\nname = \"pro\"\n[[backends]]\nname = \"comfy\"\n\
                          url = \"http://127.0.0.1:8188\"\nprotocol = \"comfyui\"\nmodels = [\"sdxl\"]\n"
            .to_owned();
        if let Some(text) = workflow {
            let path = dir.join(unique("wf"));
            std::fs::write(&path, text).unwrap();
            config.push_str(&format!("workflow = \"{}\"\n", path.display()));
        }
        let path = dir.join(unique("config"));
        std::fs::write(&path, config).unwrap();
        tollgate::config::Config::load(Some(&path), &NoEnv).map(|_| ())
    };
    let no_prompt = r#"{"1": {"class_type": "KSampler", "inputs": {"seed": "{{seed}}"}}}"#;
    for (workflow, says) in [
        (None, "workflow"),
        (Some("not json"), "not JSON"),
        (Some(no_prompt), "{{prompt}}"),
    ] {
        let error = load(workflow).unwrap_err().to_string();
        assert!(
            error.contains("backends[0].workflow") && error.contains(says),
            "{error}"
        );
    }
    assert!(load(Some(WORKFLOW)).is_ok());
    let _ = std::fs::remove_dir_all(dir);
}
