//! The job store (`tollgate::jobs::store`) against a real Postgres: what
//! submit, read and cancel promise an account, and what claims promise the
//! gateways that run jobs: no job run by two at once, a lapsed lease taken
//! over, and a runner that lost its claim unable to write.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use std::collections::HashSet;
use std::time::Duration;

use futures_util::TryStreamExt;
use serde_json::json;
use tollgate::jobs::results::ResultStore;
use tollgate::jobs::store::{self, Finish, JobState, NewJob, Submitted};
use tollgate::keys::store::StoreError;
use tollgate_testkit::TestDb;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(60);

/// An account with one key; returns both ids.
async fn account(db: &TestDb, name: &str) -> (Uuid, Uuid) {
    let (account, key) = (Uuid::now_v7(), Uuid::now_v7());
    db.execute(
        "INSERT INTO accounts (id, name, tier) VALUES ($1, $2, 'pro')",
        &[&account, &name],
    )
    .await;
    let hash = key.as_bytes().repeat(2);
    db.execute(
        "INSERT INTO api_keys (id, account_id, hash, display_prefix) VALUES ($1, $2, $3, 'tg_')",
        &[&key, &account, &hash],
    )
    .await;
    (account, key)
}

fn job(account: (Uuid, Uuid), body: &str, priority: i32) -> NewJob {
    NewJob {
        account_id: account.0,
        key_id: account.1,
        tier: "pro".into(),
        priority,
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        content_type: Some("application/json".into()),
        body: body.as_bytes().to_vec(),
        idempotency_key: None,
        callback_url: None,
    }
}

fn created(submitted: Submitted) -> store::JobRecord {
    match submitted {
        Submitted::Created(job) => job,
        Submitted::Existing(job) => panic!("expected a new job, got {}", job.id),
    }
}

#[tokio::test]
async fn a_job_is_its_accounts_alone_and_an_idempotency_key_gives_the_same_job() {
    let db = TestDb::migrated().await;
    let (acme, other) = (account(&db, "acme").await, account(&db, "other").await);
    let first = created(store::submit(&db.pool, &job(acme, "{}", 10)).await.unwrap());
    assert_eq!(first.state, JobState::Queued);
    assert_eq!(
        store::get(&db.pool, acme.0, first.id)
            .await
            .unwrap()
            .unwrap()
            .id,
        first.id
    );
    // Another account's job does not exist for it.
    assert!(
        store::get(&db.pool, other.0, first.id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store::cancel(&db.pool, other.0, first.id)
            .await
            .unwrap()
            .is_none()
    );

    let mut keyed = job(acme, r#"{"a":1}"#, 10);
    keyed.idempotency_key = Some("order-7".into());
    let original = created(store::submit(&db.pool, &keyed).await.unwrap());
    match store::submit(&db.pool, &keyed).await.unwrap() {
        Submitted::Existing(again) => assert_eq!(again.id, original.id),
        Submitted::Created(again) => panic!("a second job {} for the same key", again.id),
    }
    keyed.body = br#"{"a":2}"#.to_vec();
    assert!(matches!(
        store::submit(&db.pool, &keyed).await,
        Err(StoreError::Conflict(_))
    ));
    // The same key is another account's own.
    let mut theirs = job(other, r#"{"a":2}"#, 10);
    theirs.idempotency_key = Some("order-7".into());
    created(store::submit(&db.pool, &theirs).await.unwrap());

    // Newest first, paged by the last id seen.
    let page = store::list(&db.pool, acme.0, None, 1).await.unwrap();
    assert_eq!(page.iter().map(|j| j.id).collect::<Vec<_>>(), [original.id]);
    let next = store::list(&db.pool, acme.0, Some(original.id), 10)
        .await
        .unwrap();
    assert_eq!(next.iter().map(|j| j.id).collect::<Vec<_>>(), [first.id]);
}

/// Two runners claiming at once take every job exactly once, the highest
/// priority first.
#[tokio::test]
async fn concurrent_claims_take_every_job_once_by_priority() {
    let db = TestDb::migrated().await;
    let acme = account(&db, "acme").await;
    for i in 0..60 {
        store::submit(&db.pool, &job(acme, &format!("{{\"i\":{i}}}"), i % 3))
            .await
            .unwrap();
    }
    let first = store::claim(&db.pool, "probe", LEASE, 5).await.unwrap();
    assert!(first.iter().all(|c| c.tier == "pro" && c.attempt == 1));
    assert_eq!(
        first.len(),
        5,
        "the five claimed first are of the highest priority"
    );
    let runner = |owner: &'static str| {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let mut taken = Vec::new();
            loop {
                let claims = store::claim(&pool, owner, LEASE, 7).await.unwrap();
                if claims.is_empty() {
                    return taken;
                }
                taken.extend(claims.into_iter().map(|c| c.id));
            }
        })
    };
    let (a, b) = (runner("a"), runner("b"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let all: Vec<Uuid> = first.iter().map(|c| c.id).chain(a).chain(b).collect();
    let distinct: HashSet<Uuid> = all.iter().copied().collect();
    assert_eq!((all.len(), distinct.len()), (60, 60));
    let priorities = db
        .query_one(
            "SELECT count(*) FILTER (WHERE priority = 2 AND id = ANY($1)) FROM jobs",
            &[&first.iter().map(|c| c.id).collect::<Vec<_>>()],
        )
        .await;
    assert_eq!(priorities.get::<_, i64>(0), 5);
}

/// A runner whose lease lapsed loses its job to the next claim, and then
/// can neither mark it sent nor finish it; the next one sees it was sent.
#[tokio::test]
async fn a_lapsed_lease_is_taken_over_and_the_old_claim_is_fenced_off() {
    let db = TestDb::migrated().await;
    let acme = account(&db, "acme").await;
    let submitted = created(store::submit(&db.pool, &job(acme, "{}", 0)).await.unwrap());
    // A lease of nothing lapses at once: the runner "died".
    let old = store::claim(&db.pool, "a", Duration::ZERO, 1)
        .await
        .unwrap();
    assert_eq!(old.len(), 1);
    assert!(
        store::mark_sent(&db.pool, old[0].id, old[0].attempt)
            .await
            .unwrap()
    );
    let new = store::claim(&db.pool, "b", LEASE, 1).await.unwrap();
    assert_eq!(
        (new[0].id, new[0].attempt, new[0].sent_before),
        (submitted.id, 2, true)
    );
    // Held now: nobody else claims it.
    assert!(
        store::claim(&db.pool, "c", LEASE, 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store::renew(&db.pool, "b", LEASE).await.unwrap(),
        vec![submitted.id]
    );
    assert!(store::renew(&db.pool, "a", LEASE).await.unwrap().is_empty());

    let failed = Finish::Failed(json!({"message": "late", "type": "server_error"}));
    assert!(
        !store::finish(&db.pool, old[0].id, old[0].attempt, &failed)
            .await
            .unwrap()
    );
    assert!(
        !store::mark_sent(&db.pool, old[0].id, old[0].attempt)
            .await
            .unwrap()
    );
    let answered = Finish::Answered {
        status: 200,
        content_type: Some("application/json".into()),
        result_key: "results/x".into(),
        bytes: 42,
    };
    assert!(
        store::finish(&db.pool, new[0].id, new[0].attempt, &answered)
            .await
            .unwrap()
    );
    let done = store::get(&db.pool, acme.0, submitted.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            done.state,
            done.result_status,
            done.result_bytes,
            done.attempt
        ),
        (JobState::Succeeded, Some(200), Some(42), 2)
    );
    assert!(done.finished_at.is_some() && done.error.is_none());
    // Finished once: a second finish (even by the holder) changes nothing.
    assert!(
        !store::finish(&db.pool, new[0].id, new[0].attempt, &failed)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_cancelled_job_is_never_claimed_and_its_runner_cannot_finish_it() {
    let db = TestDb::migrated().await;
    let acme = account(&db, "acme").await;
    let queued = created(store::submit(&db.pool, &job(acme, "{}", 0)).await.unwrap());
    let cancelled = store::cancel(&db.pool, acme.0, queued.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(
        store::claim(&db.pool, "a", LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let running = created(store::submit(&db.pool, &job(acme, "{}", 0)).await.unwrap());
    let claim = store::claim(&db.pool, "a", LEASE, 10).await.unwrap();
    assert_eq!(claim[0].id, running.id);
    store::cancel(&db.pool, acme.0, running.id).await.unwrap();
    assert!(
        !store::mark_sent(&db.pool, claim[0].id, claim[0].attempt)
            .await
            .unwrap()
    );
    let failed = Finish::Failed(json!({"message": "x"}));
    assert!(
        !store::finish(&db.pool, claim[0].id, claim[0].attempt, &failed)
            .await
            .unwrap()
    );
    // An ended job is cancelled no further: it comes back as it was.
    let again = store::cancel(&db.pool, acme.0, running.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.state, JobState::Cancelled);
}

/// A job that ends (here: is cancelled) with a callback URL, its own or its
/// account's, leaves exactly one delivery to send, to that URL.
#[tokio::test]
async fn an_ended_job_queues_one_callback_to_its_url() {
    let db = TestDb::migrated().await;
    let acme = account(&db, "acme").await;
    let delivery = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            let client = pool.get().await.unwrap();
            client
                .query("SELECT url FROM job_callbacks WHERE job_id = $1", &[&id])
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    // No URL anywhere: nothing queued.
    let silent = created(store::submit(&db.pool, &job(acme, "{}", 0)).await.unwrap());
    store::cancel(&db.pool, acme.0, silent.id).await.unwrap();
    assert!(delivery(silent.id).await.is_empty());
    // The account's URL, then the job's own over it.
    db.execute(
        "UPDATE accounts SET callback_url = 'https://acme.example/hooks' WHERE id = $1",
        &[&acme.0],
    )
    .await;
    let by_account = created(
        store::submit(&db.pool, &job(acme, "{\"a\":1}", 0))
            .await
            .unwrap(),
    );
    let own = NewJob {
        callback_url: Some("https://acme.example/this-job".into()),
        ..job(acme, "{\"a\":2}", 0)
    };
    let by_job = created(store::submit(&db.pool, &own).await.unwrap());
    for id in [by_account.id, by_job.id] {
        store::cancel(&db.pool, acme.0, id).await.unwrap();
        // Cancelling again ends nothing more, and queues nothing more.
        store::cancel(&db.pool, acme.0, id).await.unwrap();
    }
    assert_eq!(
        delivery(by_account.id).await,
        ["https://acme.example/hooks"]
    );
    assert_eq!(delivery(by_job.id).await, ["https://acme.example/this-job"]);
}

/// A result is written as it streams, read back whole, and once its tier's
/// retention has passed its job is marked expired and its file deleted.
#[tokio::test]
async fn a_result_is_stored_as_it_streams_and_deleted_when_its_time_is_up() {
    let db = TestDb::migrated().await;
    let acme = account(&db, "acme").await;
    let dir = std::env::temp_dir().join(tollgate_testkit::db::unique("tollgate_results"));
    let results = ResultStore::local(&dir).unwrap();
    let job = created(store::submit(&db.pool, &job(acme, "{}", 0)).await.unwrap());
    let claim = store::claim(&db.pool, "a", LEASE, 1)
        .await
        .unwrap()
        .remove(0);
    let key = ResultStore::key(acme.0, job.id);
    // 3 MiB in 64 KiB pieces, as an answer arrives.
    let pieces: Vec<std::io::Result<bytes::Bytes>> = (0..48u8)
        .map(|i| Ok(bytes::Bytes::from(vec![i; 64 * 1024])))
        .collect();
    let written = results
        .write(&key, futures_util::stream::iter(pieces))
        .await
        .unwrap();
    assert_eq!(written, 3 << 20);
    let answered = Finish::Answered {
        status: 200,
        content_type: Some("application/octet-stream".into()),
        result_key: key.clone(),
        bytes: written as i64,
    };
    assert!(
        store::finish(&db.pool, claim.id, claim.attempt, &answered)
            .await
            .unwrap()
    );
    let read: Vec<bytes::Bytes> = results
        .read(&key)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let read: Vec<u8> = read.concat();
    assert_eq!(read.len(), 3 << 20);
    assert!(
        read.chunks(64 * 1024)
            .enumerate()
            .all(|(i, c)| c.iter().all(|b| *b as usize == i))
    );

    // Another tier's retention, or one not yet passed, leaves it be.
    assert!(
        store::expire(&db.pool, "free", Duration::ZERO, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store::expire(&db.pool, "pro", LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let expired = store::expire(&db.pool, "pro", Duration::ZERO, 10)
        .await
        .unwrap();
    assert_eq!(
        expired,
        [store::Expired {
            id: job.id,
            result_key: key.clone(),
            bytes: 3 << 20
        }]
    );
    for gone in &expired {
        results.delete(&gone.result_key).await.unwrap();
    }
    assert!(results.read(&key).await.is_err());
    // Deleting twice is no error; the job says expired.
    results.delete(&key).await.unwrap();
    let job = store::get(&db.pool, acme.0, job.id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Expired);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A job refused for now goes back to the queue and waits out its delay;
/// only the claim that holds it can put it back.
#[tokio::test]
async fn a_requeued_job_waits_its_delay_before_it_is_claimed_again() {
    let db = TestDb::migrated().await;
    let acme = account(&db, "acme").await;
    let job = created(store::submit(&db.pool, &job(acme, "{}", 0)).await.unwrap());
    let first = store::claim(&db.pool, "a", LEASE, 1)
        .await
        .unwrap()
        .remove(0);
    assert!(
        store::mark_sent(&db.pool, first.id, first.attempt)
            .await
            .unwrap()
    );
    assert!(
        store::requeue(&db.pool, first.id, first.attempt, LEASE)
            .await
            .unwrap()
    );
    // Waiting out its minute: not claimable.
    assert!(
        store::claim(&db.pool, "b", LEASE, 1)
            .await
            .unwrap()
            .is_empty()
    );
    db.execute(
        "UPDATE jobs SET run_after = now() WHERE id = $1",
        &[&job.id],
    )
    .await;
    let second = store::claim(&db.pool, "b", LEASE, 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (second.id, second.attempt, second.sent_before),
        (job.id, 2, false)
    );
    // The first claim cannot requeue it again.
    assert!(
        !store::requeue(&db.pool, first.id, first.attempt, Duration::ZERO)
            .await
            .unwrap()
    );
    let state = store::get(&db.pool, acme.0, job.id)
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(state, JobState::Running);
}
