//! `loadgen soak` against the real gpu-sim (and against nothing at all), and
//! `loadgen soak-check` against a real Postgres holding the real schema (sql/).
//!
//! Assertions are on ledger lines and check lines, never on timing.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokio_postgres::NoTls;
use tollgate_testkit::TestDb;

use super::{gpu_sim_paced, run_loadgen};

/// A file under the test target's temporary directory, unique to this process.
fn temp_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("soak-{}-{name}", std::process::id()))
}

fn keys_file(name: &str) -> PathBuf {
    let path = temp_path(name);
    std::fs::write(
        &path,
        "# KEY ACCOUNT TIER WEIGHT\ntg_test_free acme-free free 1\ntg_test_pro acme-pro pro 1\n",
    )
    .unwrap();
    path
}

fn read_ledger(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Runs `loadgen soak` with `args` after the usual ones and returns the ledger.
fn soak(name: &str, url: &str, args: &[&str]) -> Vec<Value> {
    let keys = keys_file(&format!("{name}.keys"));
    let ledger = temp_path(&format!("{name}.jsonl"));
    let mut all = vec![
        "soak",
        "--url",
        url,
        "--keys-file",
        keys.to_str().unwrap(),
        "--ledger",
        ledger.to_str().unwrap(),
        "--run-id",
        "run-1",
        "--timeout",
        "10",
    ];
    all.extend(args);
    let output = run_loadgen(&all);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "loadgen {all:?} failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.starts_with("loadgen soak: "), "{stdout}");
    read_ledger(&ledger)
}

fn words(texts: &Value) -> u64 {
    texts
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().split_whitespace().count() as u64)
        .sum()
}

#[test]
fn soak_ledger_records_every_request_as_the_client_saw_it() {
    // Paced, so a stream lasts long enough for its client to hang up in the middle.
    let sim = gpu_sim_paced(&["--ttft-ms", "0", "--tokens-per-sec", "400"], &[]);
    let ledger = soak(
        "mix",
        sim.base(),
        &["--rate", "60", "--duration", "1", "--max-tokens", "24"],
    );
    assert_eq!(ledger.len(), 60, "one line per scheduled request");
    let mut ids: Vec<&str> = ledger
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 60, "request ids are unique");
    assert!(ids.iter().all(|id| id.starts_with("run-1-")), "{ids:?}");
    let of_kind =
        |kind: &str| -> Vec<&Value> { ledger.iter().filter(|e| e["kind"] == kind).collect() };
    for entry in &ledger {
        assert!(
            matches!(entry["account"].as_str(), Some("acme-free" | "acme-pro")),
            "{entry}"
        );
        let tier = if entry["account"] == "acme-free" {
            "free"
        } else {
            "pro"
        };
        assert_eq!(entry["tier"], tier, "{entry}");
    }
    for kind in ["chat", "chat_stream", "completion"] {
        let entries = of_kind(kind);
        assert!(!entries.is_empty(), "the default mix sends {kind}");
        for entry in entries {
            assert_eq!(
                (entry["status"].as_u64(), entry["end"].as_str()),
                (Some(200), Some("complete")),
                "{entry}"
            );
            assert_eq!(entry["texts"].as_array().unwrap().len(), 1, "{entry}");
            // gpu-sim's words are one token each and its usage is the true count.
            assert_eq!(
                Some(words(&entry["texts"])),
                entry["reported_completion_tokens"].as_u64(),
                "{entry}"
            );
            assert!(entry["bytes"].as_u64().unwrap() > 0);
        }
    }
    for entry in of_kind("embedding") {
        assert_eq!(entry["end"], "complete", "{entry}");
        assert!(
            entry
                .get("texts")
                .is_none_or(|t| t.as_array().unwrap().is_empty()),
            "{entry}"
        );
    }
    let disconnects = of_kind("disconnect");
    assert!(!disconnects.is_empty());
    for entry in disconnects {
        assert_eq!(entry["status"], 200, "{entry}");
        // A client that reads up to 18 events of an answer of 16 or more tokens hangs
        // up before the end unless the answer was shorter than what it meant to read.
        match entry["end"].as_str() {
            Some("client_disconnect") => {
                let read = words(&entry["texts"]);
                assert!((1..24).contains(&read), "read {read}: {entry}");
                assert!(
                    entry.get("reported_completion_tokens").is_none(),
                    "hung up before usage: {entry}"
                );
            }
            Some("complete") => {}
            other => panic!("disconnect ended {other:?}: {entry}"),
        }
    }
    assert!(
        of_kind("disconnect")
            .iter()
            .any(|e| e["end"] == "client_disconnect"),
        "at least one client hung up mid-stream"
    );
    for entry in of_kind("completion_multi") {
        match entry["status"].as_u64() {
            // gpu-sim answers one prompt per request today.
            Some(400) => assert_eq!(entry["end"], "refused", "{entry}"),
            // Once it answers prompt arrays × n: 2 prompts × n = 2.
            Some(200) => assert_eq!(entry["texts"].as_array().unwrap().len(), 4, "{entry}"),
            other => panic!("completion_multi status {other:?}: {entry}"),
        }
    }
}

#[test]
fn soak_keeps_going_while_nothing_listens() {
    // A port that was free a moment ago: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ledger = soak(
        "down",
        &format!("http://127.0.0.1:{port}"),
        &["--rate", "20", "--duration", "1"],
    );
    assert_eq!(ledger.len(), 20);
    for entry in &ledger {
        assert_eq!(
            (
                entry["status"].as_u64(),
                entry["end"].as_str(),
                entry["error"].as_str()
            ),
            (Some(0), Some("no_answer"), Some("connect")),
            "{entry}"
        );
    }
}

/// A database of its own with Tollgate's migrations applied, dropped at the
/// end, driven from these synchronous tests through a runtime of its own.
struct UsageDb {
    client: tokio_postgres::Client,
    database: TestDb,
    runtime: tokio::runtime::Runtime,
}

impl UsageDb {
    fn create() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (database, client) = runtime.block_on(async {
            let database = TestDb::migrated().await;
            let (client, connection) = tokio_postgres::connect(&database.url, NoTls).await.unwrap();
            tokio::spawn(connection);
            (database, client)
        });
        Self {
            client,
            database,
            runtime,
        }
    }

    fn execute(&self, sql: &str) {
        self.runtime
            .block_on(self.client.batch_execute(sql))
            .unwrap();
    }

    /// One usage event of `account` for `request`, as Tollgate writes them.
    fn event(&self, account: &str, request: &str, status: &str, completion: u64, units: u64) {
        self.execute(&format!(
            "INSERT INTO usage_events (event_id, created_at, request_id, account_id, key_id, tier, \
             model, kind, status, prompt_tokens, completion_tokens, total_tokens, usage_source, \
             units, latency_ms) \
             SELECT gen_random_uuid(), now(), '{request}', a.id, gen_random_uuid(), a.tier, \
             'sim-model', 'chat', '{status}', {prompt}, {completion}, {units}, 'backend', {units}, 5 \
             FROM accounts a WHERE a.name = '{account}'",
            prompt = units.saturating_sub(completion),
        ));
    }
}

fn ledger_line(id: &str, account: &str, tier: &str, status: u16, end: &str, text: &str) -> String {
    serde_json::json!({
        "request_id": id, "kind": "chat", "account": account, "tier": tier,
        "sent_at_ms": 1_000, "elapsed_ms": 50, "status": status, "end": end,
        "bytes": 100, "texts": if text.is_empty() { vec![] } else { vec![text] },
    })
    .to_string()
}

fn soak_check(db: &UsageDb, name: &str, ledger: &[String], extra: &[&str]) -> (bool, String) {
    let path = temp_path(&format!("{name}.jsonl"));
    std::fs::write(&path, ledger.join("\n") + "\n").unwrap();
    let mut args = vec![
        "soak-check",
        "--ledger",
        path.to_str().unwrap(),
        "--database-url",
        &db.database.url,
        "--hard-cap",
        "free=100",
    ];
    args.extend(extra);
    let output = run_loadgen(&args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() || output.status.code() == Some(1),
        "soak-check exited with {}: {}\n{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), stdout)
}

fn line_of<'a>(stdout: &'a str, check: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.contains(check))
        .unwrap_or_else(|| panic!("no line for {check:?} in:\n{stdout}"))
}

#[test]
fn soak_check_passes_a_ledger_that_matches_the_usage_log() {
    let db = UsageDb::create();
    db.execute(
        "INSERT INTO accounts (id, name, tier) VALUES \
         (gen_random_uuid(), 'acme-free', 'free'), (gen_random_uuid(), 'acme-pro', 'pro')",
    );
    // "Hello there friend" is 3 tokens in cl100k_base; " the end" is 2.
    db.event("acme-free", "r-1", "ok", 3, 60);
    db.event("acme-pro", "r-2", "partial", 4, 500);
    db.event("acme-free", "r-3", "rejected", 0, 0);
    let ledger = [
        ledger_line(
            "r-1",
            "acme-free",
            "free",
            200,
            "complete",
            "Hello there friend",
        ),
        ledger_line(
            "r-2",
            "acme-pro",
            "pro",
            200,
            "client_disconnect",
            " the end",
        ),
        ledger_line("r-3", "acme-free", "free", 429, "refused", ""),
    ];
    let (passed, stdout) = soak_check(
        &db,
        "clean",
        &ledger,
        &["--rss-warm-kib", "1000", "--rss-end-kib", "1100"],
    );
    assert!(passed, "{stdout}");
    assert!(stdout.contains("usage_events: 3 rows"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("10 passed, 0 failed"),
        "{stdout}"
    );
    assert!(
        line_of(&stdout, "hard cap").contains("1 of 1 capped accounts"),
        "{stdout}"
    );
}

#[test]
fn soak_check_fails_on_a_lost_event_a_wrong_bill_and_an_overspend() {
    let db = UsageDb::create();
    db.execute(
        "INSERT INTO accounts (id, name, tier) VALUES (gen_random_uuid(), 'acme-free', 'free')",
    );
    // r-1's answer was billed 2 tokens more than the client received; r-2's event
    // was lost; r-3 took the account past its cap of 100.
    db.event("acme-free", "r-1", "ok", 5, 60);
    db.event("acme-free", "r-3", "ok", 3, 60);
    let ledger = [
        ledger_line(
            "r-1",
            "acme-free",
            "free",
            200,
            "complete",
            "Hello there friend",
        ),
        ledger_line(
            "r-2",
            "acme-free",
            "free",
            200,
            "complete",
            "Hello there friend",
        ),
        ledger_line(
            "r-3",
            "acme-free",
            "free",
            200,
            "complete",
            "Hello there friend",
        ),
    ];
    let (passed, stdout) = soak_check(&db, "broken", &ledger, &[]);
    assert!(!passed, "{stdout}");
    assert!(
        line_of(&stdout, "exactly one ok event").starts_with("FAIL"),
        "{stdout}"
    );
    assert!(
        line_of(&stdout, "exactly one ok event").contains("1 without an event"),
        "{stdout}"
    );
    assert!(
        line_of(&stdout, "billed completion tokens").contains("1 billed more than received"),
        "{stdout}"
    );
    assert!(line_of(&stdout, "hard cap").starts_with("FAIL"), "{stdout}");
    assert!(
        stdout.contains("acme-free (free) used 120 units of 100 (+20)"),
        "{stdout}"
    );
    assert!(line_of(&stdout, "RSS").starts_with("SKIP"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("6 passed, 3 failed"),
        "{stdout}"
    );
}
