//! Outages degrade, they do not stop the business: keys keep working while
//! Postgres is down, reconciliation goes past an account Redis fails for,
//! and a spool directory has one owner.

use super::metering::PostgresLink;
use super::*;

/// One series of a metric, by a label it carries (0 when absent).
async fn series(url: &str, name: &str, label: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Before: every key lookup that missed the five-second cache while
/// Postgres was unreachable got 503, so an outage stopped every customer.
#[tokio::test]
async fn keys_verified_lately_keep_authenticating_while_postgres_is_down() {
    let sim = Sim::fast();
    let link = PostgresLink::start().await;
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            postgres_port: Some(link.port),
            redis: Some(redis_url()),
            // Cached answers lapse at once: only the outage copy can answer.
            keys: "cache_ttl = \"50ms\"",
            ..Options::default()
        },
    )
    .await;
    eventually("the revocation listener subscribes", || async {
        gateway.readiness().await["revocation_fanout"] == "subscribed"
    })
    .await;
    let known = gateway.create_key("acme", &[]);
    let revoked = gateway.create_key("acme", &[]);
    let never_seen = gateway.create_key("acme", &[]);
    let status = |key: String| {
        let gateway = &gateway;
        async move {
            gateway
                .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
                .await
        }
    };
    for key in [&known, &revoked] {
        assert_eq!(status(key.clone()).await.0, 200);
    }

    link.cut().await;
    eventually("a key is answered from the outage copy", || async {
        status(known.clone()).await.0 == 200
            && series(
                &gateway.metrics_url,
                "tollgate_key_cache_lookups_total",
                "stale",
            )
            .await
                > 0.0
    })
    .await;
    let (code, body) = status(never_seen.clone()).await;
    assert_eq!(code, 503, "a key Postgres never verified: {body}");
    assert_eq!(error_code(&body), "auth_unavailable");

    // Revoked elsewhere (the CLI reaches Postgres directly, and publishes):
    // the tombstone applies though this instance cannot read Postgres.
    let revoke = gateway
        .cli(&["keys", "revoke", &revoked])
        .env("REDIS_URL", redis_url())
        .output()
        .unwrap();
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    eventually("the revocation applies during the outage", || async {
        status(revoked.clone()).await.0 == 401
    })
    .await;
    assert_eq!(status(known.clone()).await.0, 200);

    link.restore();
    eventually("a new key works once Postgres is back", || async {
        status(never_seen.clone()).await.0 == 200
    })
    .await;
}

/// Before: the first account whose Redis counters failed ended the whole
/// reconciliation, so every account after it kept free usage after a Redis
/// flush.
#[tokio::test]
async fn reconciliation_goes_on_past_an_account_redis_fails_for() {
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "0",
        "--output-tokens",
        "4",
    ]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            redis: Some(redis_url()),
            tiers: Some(
                "[[tiers]]\nname = \"free\"\npriority = 0\nincluded_units = 30\nhard_cap = true\n"
                    .to_owned(),
            ),
            admission: "reconcile_interval = \"200ms\"",
            ..Options::default()
        },
    )
    .await;
    // The broken account is created first, so it is reconciled first when
    // the usage log is read in account order.
    let names = ["broken", "a1", "a2", "a3", "a4", "a5"];
    let mut accounts = Vec::new();
    for name in names {
        let key = gateway.create_key_on(name, "free", &[]);
        let (status, body) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("hi", 4))
            .await;
        assert_eq!(status, 200, "{body}");
        accounts.push(gateway.account_id(name).await);
    }
    eventually("the usage log holds every request", || async {
        gateway.usage_events().await.len() == names.len()
    })
    .await;
    // The broken account's month counter is a string: reconciling it fails
    // with WRONGTYPE.
    let month: String = gateway
        .db_client()
        .await
        .query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')", &[])
        .await
        .unwrap()
        .get(0);
    let broken_key = format!("{}:{{{}}}:q:m:{month}", gateway.redis_prefix, accounts[0]);
    let set = Command::new("redis-cli")
        .args(["-u", &redis_url(), "SET", &broken_key, "not a set"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(set.success());
    // Then the others lose their counters: every pass from here on meets the
    // broken account first, so restoring the others proves reconciliation
    // went on past it.
    for &account in &accounts[1..] {
        delete_redis_keys(
            &redis_url(),
            &format!("{}:{{{account}}}", gateway.redis_prefix),
        );
    }
    for &account in &accounts[1..] {
        eventually("every other account's counters are restored", || async {
            gateway.quota_state(account).await.month_used > 0
        })
        .await;
    }
    assert!(
        series(
            &gateway.metrics_url,
            "tollgate_redis_errors_total",
            "quota_reconcile"
        )
        .await
            > 0.0
    );
}

/// Before: a Redis restart (its counters gone) gave a capped account its
/// whole cap again until the next reconciliation, and while Redis could not
/// be reached the local fallback knew nothing of what had been spent through
/// Redis: both let an account past its hard cap.
#[tokio::test]
async fn caps_hold_through_a_redis_restart_and_a_redis_outage() {
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "0",
        "--output-tokens",
        "4",
    ]);
    let link = PostgresLink::to(&redis_url()).await;
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            redis: Some(format!("redis://127.0.0.1:{}", link.port)),
            tiers: Some(
                "[[tiers]]\nname = \"free\"\npriority = 0\nincluded_units = 30\nhard_cap = true\n\
                 on_redis_down = \"local\"\n"
                    .to_owned(),
            ),
            // Only the start-up reconciliation: nothing else restores counters.
            admission: "reconcile_interval = \"1h\"",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let request = chat("hi", 4);
    let ask = || gateway.post_json(&key, "/v1/chat/completions", &request);
    // 12 units each: two fit in 30, the third does not.
    for expected in [200, 200, 429] {
        assert_eq!(ask().await.0, expected);
    }

    // Redis restarts empty.
    delete_redis_keys(&redis_url(), &gateway.redis_prefix);
    let (status, body) = ask().await;
    assert_eq!(status, 429, "after the restart: {body}");
    assert_eq!(error_code(&body), "insufficient_quota");

    // Redis unreachable: the tier falls back to this instance's limits.
    link.cut().await;
    let (status, body) = ask().await;
    assert_eq!(status, 429, "during the outage: {body}");
    assert_eq!(error_code(&body), "insufficient_quota");

    link.restore();
    let (status, _) = ask().await;
    assert_eq!(status, 429, "after the outage");
    assert_eq!(gateway.units_logged().await, 24);
}

/// Before: two processes could share a spool directory, interleaving
/// records in one file and each replaying the other's events.
#[tokio::test]
async fn a_second_process_on_the_same_spool_dir_refuses_to_start() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let config = std::fs::read_to_string(&gateway.config).unwrap();
    let mut second = config.clone();
    for listener in ["listen", "admin_listen", "metrics_listen"] {
        let line = config
            .lines()
            .find(|l| l.starts_with(&format!("{listener} = ")))
            .unwrap();
        // Its own ports, so what stops it is the spool, not a taken port.
        second = second.replace(line, &format!("{listener} = \"127.0.0.1:{}\"", free_port()));
    }
    let path = std::env::temp_dir().join(format!("{}.toml", unique("tollgate_second")));
    std::fs::write(&path, &second).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .env("DATABASE_URL", &gateway.db.url)
        .env("LOG_LEVEL", "warn")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // It must exit; one that started would still be serving at the deadline
    // (and is killed when dropped).
    let exited = tokio::time::timeout(POLL_DEADLINE, child.wait_with_output()).await;
    let _ = std::fs::remove_file(&path);
    let output = exited
        .expect("a second process started on the same spool directory")
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let pid = gateway.proc.as_ref().unwrap().pid().to_string();
    assert!(
        stderr.contains("in use by another process") && stderr.contains(&pid),
        "{stderr}"
    );
    // The first is unharmed.
    assert_eq!(gateway.readiness().await["backends"], true);
}
