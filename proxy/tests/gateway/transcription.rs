//! Transcription uploads through the gateway: multipart bodies streamed to
//! the backend rather than held, billed in audio seconds (the backend's
//! duration, else the length the file's header declares), and refused
//! with nothing billed when the form breaks.

use std::sync::Arc;

use reqwest::multipart::{Form, Part};
use tokio::sync::Barrier;
use tollgate_testkit::multipart::form as raw_form;

use super::metering::sim_counter;
use super::*;

const TRANSCRIBED: &str = "gpu_sim_transcribed_seconds_total";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/audio")
            .join(name),
    )
    .unwrap()
}

/// How long each fixture plays, as PyPI's `mutagen` reads it: a reader
/// independent of the demuxers Tollgate (and gpu-sim) use. scripts/test.sh
/// installs it in target/sdk-venv.
fn mutagen_seconds(names: &[&str]) -> Vec<f64> {
    let python = test_python("TOLLGATE_TEST_PYTHON", "sdk-venv");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio");
    let output = Command::new(&python)
        .arg("-c")
        .arg("import sys, mutagen\nfor f in sys.argv[1:]: print(mutagen.File(f).info.length)")
        .args(names.iter().map(|name| dir.join(name)))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} not runnable ({e}): run scripts/test.sh",
                python.display()
            )
        });
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect()
}

/// A form as the Python SDK sends it: `model` first, then the file.
fn form(model: &str, file: Vec<u8>, name: &str, format: &str) -> Form {
    Form::new()
        .text("model", model.to_owned())
        .part("file", Part::bytes(file).file_name(name.to_owned()))
        .text("response_format", format.to_owned())
}

/// A 16-bit mono 16 kHz WAV header for `data` bytes of samples.
fn wav_header(data: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"RIFF");
    header.extend_from_slice(&(36 + data).to_le_bytes());
    header.extend_from_slice(b"WAVEfmt ");
    for field in [16u32.to_le_bytes(), [1, 0, 1, 0]] {
        header.extend_from_slice(&field);
    }
    header.extend_from_slice(&16_000u32.to_le_bytes());
    header.extend_from_slice(&32_000u32.to_le_bytes());
    header.extend_from_slice(&[2, 0, 16, 0]);
    header.extend_from_slice(b"data");
    header.extend_from_slice(&data.to_le_bytes());
    header
}

/// A WAV of `bytes` bytes in all (silence): `(bytes - 44) / 32000` seconds.
fn silent_wav(bytes: usize) -> Vec<u8> {
    let mut file = wav_header((bytes - 44) as u32);
    file.resize(bytes, 0);
    file
}

impl Gateway {
    pub(super) async fn upload(
        &self,
        key: &str,
        path: &str,
        form: Form,
        id: &str,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .header("x-request-id", id)
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    /// Posts a hand-made multipart `body` (boundary `B`).
    async fn post_form(&self, key: &str, body: Vec<u8>, id: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/audio/transcriptions", self.url))
            .bearer_auth(key)
            .header("x-request-id", id)
            .header("content-type", "multipart/form-data; boundary=B")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// The process's peak resident memory so far, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let pid = self.proc.as_ref().unwrap().pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

#[tokio::test]
async fn transcriptions_bill_the_seconds_each_file_plays_by_an_independent_reading() {
    let sim = Sim::start(&["--model", "sim-nousage"]);
    let silent = Sim::start(&["--no-usage", "--model", "sim-nousage"]);
    let mut nousage = BackendSpec::new(&silent.url);
    nousage.models = r#"["sim-nousage"]"#;
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url), nousage], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let files = ["tone.wav", "tone.flac", "tone.mp3", "tone.ogg"];
    let plays = mutagen_seconds(&files);
    for (name, seconds) in files.iter().zip(plays) {
        let billed = seconds.ceil() as i64;
        // The backend reports its duration: billed by it, answer unchanged.
        let through = gateway
            .upload(
                &key,
                "/v1/audio/transcriptions",
                form("sim-model", fixture(name), name, "json"),
                name,
            )
            .await;
        assert_eq!(through.status(), 200, "{name}");
        let through = through.text().await.unwrap();
        let direct = reqwest::Client::new()
            .post(format!("{}/v1/audio/transcriptions", sim.url))
            .multipart(form("sim-model", fixture(name), name, "json"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(through, direct, "{name}");
        let event = gateway.event_of(name).await;
        assert_eq!(
            (
                event.kind.as_str(),
                event.unit_kind.as_str(),
                event.units,
                event.usage_source.as_str()
            ),
            ("transcription", "audio_seconds", billed, "backend"),
            "{name} plays {seconds} s"
        );
        // A backend that reports nothing: billed by the file's own header.
        let id = format!("{name}-header");
        let response = gateway
            .upload(
                &key,
                "/v1/audio/translations",
                form("sim-nousage", fixture(name), name, "text"),
                &id,
            )
            .await;
        assert_eq!(response.status(), 200, "{name}");
        let event = gateway.event_of(&id).await;
        assert_eq!(
            (
                event.kind.as_str(),
                event.units,
                event.usage_source.as_str()
            ),
            ("translation", billed, "counted"),
            "{name} plays {seconds} s"
        );
    }
    // The file before the model (curl's and the Node SDK's usual order):
    // held until the model arrives, billed the same.
    let file_first = Form::new()
        .part(
            "file",
            Part::bytes(fixture("tone.wav")).file_name("tone.wav"),
        )
        .text("model", "sim-nousage");
    let response = gateway
        .upload(&key, "/v1/audio/transcriptions", file_first, "file-first")
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(gateway.event_of("file-first").await.units, 4);
}

/// 21 uploads of 25 MiB at once, each paused a MiB in until all have
/// started: a gateway that held bodies whole would grow by ~525 MiB.
#[tokio::test]
async fn a_25_mib_upload_beside_20_others_streams_through_without_being_held() {
    const UPLOADS: usize = 21;
    const FILE_BYTES: usize = 25 * 1024 * 1024 - 1024;
    let sim = Sim::fast();
    let mut backend = BackendSpec::new(&sim.url);
    backend.max_concurrency = Some(UPLOADS as u32 + 3);
    let gateway = Gateway::start(&[backend], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    // Warm up (the first request loads lazily built state), then measure.
    let response = gateway
        .upload(
            &key,
            "/v1/audio/transcriptions",
            form("sim-model", fixture("tone.wav"), "a.wav", "json"),
            "warm",
        )
        .await;
    assert_eq!(response.status(), 200);
    let before = gateway.peak_rss_kib();
    let file = bytes::Bytes::from(silent_wav(FILE_BYTES));
    let started = Arc::new(Barrier::new(UPLOADS));
    let uploads = (0..UPLOADS).map(|i| {
        let (file, started, gateway, key) = (file.clone(), Arc::clone(&started), &gateway, &key);
        async move {
            let chunks = futures_util::stream::unfold(0usize, move |sent| {
                let (file, started) = (file.clone(), Arc::clone(&started));
                async move {
                    if sent == 1 << 20 {
                        started.wait().await;
                    }
                    (sent < file.len()).then(|| {
                        let end = (sent + (1 << 20)).min(file.len());
                        (Ok::<_, std::io::Error>(file.slice(sent..end)), end)
                    })
                }
            });
            let part =
                Part::stream_with_length(reqwest::Body::wrap_stream(chunks), FILE_BYTES as u64)
                    .file_name("long.wav");
            let form = Form::new().text("model", "sim-model").part("file", part);
            gateway
                .upload(key, "/v1/audio/transcriptions", form, &format!("long-{i}"))
                .await
                .status()
        }
    });
    let statuses = futures_util::future::join_all(uploads).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let grown_mib = (gateway.peak_rss_kib().saturating_sub(before)) as f64 / 1024.0;
    let sent_mib = (UPLOADS * FILE_BYTES) as f64 / (1024.0 * 1024.0);
    eprintln!("peak RSS grew {grown_mib:.1} MiB while {sent_mib:.0} MiB of uploads went through");
    assert!(
        grown_mib < sent_mib / 8.0,
        "peak RSS grew {grown_mib:.1} MiB for {sent_mib:.0} MiB of uploads"
    );
    // Each billed what its header declares: 26,213,332 bytes of samples at 32,000 a second.
    let seconds = ((FILE_BYTES - 44) as f64 / 32_000.0).ceil() as i64;
    for i in 0..UPLOADS {
        assert_eq!(gateway.event_of(&format!("long-{i}")).await.units, seconds);
    }
}

#[tokio::test]
async fn a_truncated_or_lying_form_gets_400_and_nothing_is_billed() {
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            server: "max_upload_bytes = 4194304",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    // Two MiB of audio: its body streams past the head admission reads.
    let long = silent_wav(2 << 20);
    let cases: [(&str, Vec<u8>); 6] = [
        // Small enough to be read whole before admission.
        (
            "unclosed-small",
            raw_form(&[("model", b"sim-model"), ("file", &long[..4096])], false),
        ),
        // Found only at the end of a streamed body.
        (
            "unclosed-long",
            raw_form(&[("model", b"sim-model"), ("file", &long)], false),
        ),
        (
            "cut-in-the-file",
            raw_form(&[("model", b"sim-model"), ("file", &long)], true)[..(1 << 20)].to_vec(),
        ),
        // A second model after the file, which a backend might take.
        (
            "second-model",
            raw_form(
                &[
                    ("model", b"sim-model"),
                    ("file", &long),
                    ("model", b"other"),
                ],
                true,
            ),
        ),
        (
            "not-audio",
            raw_form(
                &[
                    ("model", b"sim-model"),
                    ("file", b"plain text, not a recording"),
                ],
                true,
            ),
        ),
        ("no-file", raw_form(&[("model", b"sim-model")], true)),
    ];
    for (id, body) in cases {
        let response = gateway.post_form(&key, body, id).await;
        assert_eq!(response.status(), 400, "{id}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(
            error["error"]["type"], "invalid_request_error",
            "{id}: {error}"
        );
    }
    // Not multipart at all.
    let response = gateway
        .client
        .post(format!("{}/v1/audio/transcriptions", gateway.url))
        .bearer_auth(&key)
        .json(&json!({"model": "sim-model", "file": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // Larger than the limit, declared or not.
    let big = raw_form(
        &[("model", b"sim-model"), ("file", &silent_wav(5 << 20))],
        true,
    );
    let response = gateway
        .post_form(&key, big.clone(), "declared-too-big")
        .await;
    assert_eq!(response.status(), 413);
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(
        big.chunks(1 << 20)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    ));
    let response = gateway
        .client
        .post(format!("{}/v1/audio/transcriptions", gateway.url))
        .bearer_auth(&key)
        .header("content-type", "multipart/form-data; boundary=B")
        .body(chunked)
        .send()
        .await;
    // The gateway answers 413 mid-body; the client may see it or a reset.
    if let Ok(response) = response {
        assert_eq!(response.status(), 413);
    }
    // A body shorter than its Content-Length: the client is gone.
    let mut socket =
        std::net::TcpStream::connect(gateway.url.trim_start_matches("http://")).unwrap();
    let body = raw_form(&[("model", b"sim-model"), ("file", &long)], true);
    std::io::Write::write_all(
        &mut socket,
        format!(
            "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             x-request-id: short\r\nContent-Type: multipart/form-data; boundary=B\r\n\
             Content-Length: {}\r\n\r\n",
            body.len() + 100
        )
        .as_bytes(),
    )
    .unwrap();
    std::io::Write::write_all(&mut socket, &body).unwrap();
    socket.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut socket, &mut answer);
    // Each refusal is recorded, none billed; the backend transcribed nothing.
    for id in ["unclosed-long", "second-model", "cut-in-the-file"] {
        let event = gateway.event_of(id).await;
        assert_eq!(
            (event.units, event.status.as_str()),
            (0, "rejected"),
            "{id}"
        );
    }
    assert_eq!(gateway.event_of("short").await.units, 0);
    assert!(gateway.usage_events().await.iter().all(|e| e.units == 0));
    assert_eq!(sim_counter(&sim, TRANSCRIBED).await, 0.0);
}

/// Before: the demuxers ran in the gateway, and a hundred-byte WebM whose
/// header claims a petabyte element made it allocate a petabyte: the
/// process aborted, every client's requests with it. They now run in a
/// child process with a memory limit.
#[tokio::test]
async fn a_file_whose_header_claims_a_petabyte_does_not_take_the_gateway_down() {
    // No usage from the backend: the next upload is billed by the probe.
    let sim = Sim::start(&["--no-usage"]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    // EBML header of 2^52 bytes holding a DocType element of 2^50.
    let mut evil = vec![
        0x1A, 0x45, 0xDF, 0xA3, 0x01, 0x0F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    evil.extend_from_slice(&[0x42, 0x82, 0x01, 0x04, 0, 0, 0, 0, 0, 0]);
    evil.extend_from_slice(&b"webm".repeat(16));
    let response = gateway
        .post_form(
            &key,
            raw_form(&[("model", b"sim-model"), ("file", &evil)], true),
            "evil",
        )
        .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "file", "{error}");
    // Still serving, and a new probe process reads the next file's length.
    let response = gateway
        .upload(
            &key,
            "/v1/audio/transcriptions",
            form("sim-model", fixture("tone.wav"), "a.wav", "json"),
            "after",
        )
        .await;
    assert_eq!(response.status(), 200);
    let event = gateway.event_of("after").await;
    assert_eq!((event.units, event.usage_source.as_str()), (4, "counted"));
}

/// Before: a streamed upload that had to wait for a GPU slot was dropped:
/// the check for a client gone read a byte of its body, which counted as
/// the client misbehaving.
#[tokio::test]
async fn streamed_uploads_wait_their_turn_for_a_busy_slot() {
    // One slot; each upload holds it for its 32 s of audio at 20 ms a second.
    let sim = Sim::start(&["--ms-per-audio-second", "20"]);
    let mut backend = BackendSpec::new(&sim.url);
    backend.max_concurrency = Some(1);
    let gateway = Gateway::start(&[backend], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let long = silent_wav(1 << 20);
    let uploads = (0..3).map(|i| {
        let form = form("sim-model", long.clone(), "long.wav", "json");
        let id = format!("queued-{i}");
        let gateway = &gateway;
        let key = &key;
        async move {
            gateway
                .upload(key, "/v1/audio/transcriptions", form, &id)
                .await
                .status()
        }
    });
    let statuses = futures_util::future::join_all(uploads).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    for i in 0..3 {
        assert_eq!(gateway.event_of(&format!("queued-{i}")).await.units, 33);
    }
}
