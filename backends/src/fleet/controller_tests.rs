//! The controller against a scripted GPU cloud, on tokio's paused clock:
//! failures of the provider's calls and of the instance itself, and creates
//! whose answers are lost.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::balance::RequestFacts;
use crate::balance::breaker::BreakerConfig;
use crate::balance::round_robin::RoundRobin;
use crate::fleet::policy::{FleetPolicy, Scaler, TierWait};
use crate::health::Probe;
use crate::protocol::Protocol;
use crate::routing::BackendPool;

/// A cloud whose calls fail on demand; `alive` is what it bills for, by id
/// and the name it was created under.
#[derive(Default)]
struct Cloud {
    terminates: AtomicU32,
    terminate_fails: AtomicBool,
    resume_no_capacity: AtomicBool,
    gone: AtomicBool,
    /// Creates are carried out but answer an error, as when the answer is lost.
    lose_create_answers: AtomicBool,
    /// Creates answer an error and rent nothing.
    create_fails: AtomicBool,
    finds: AtomicU32,
    find_fails: AtomicBool,
    /// Creates wait for `release_creates` before they answer.
    hold_creates: AtomicBool,
    release_creates: tokio::sync::Notify,
    alive: Mutex<Vec<(String, String)>>,
    next: AtomicU32,
    journal: Arc<Journal>,
}

/// Events recorded, flushes and creates, in the order they happened.
#[derive(Default)]
struct Journal(Mutex<Vec<String>>);

impl Journal {
    fn write(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The names creates were called with, in order.
    fn creates(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|line| line.strip_prefix("create "))
            .map(str::to_owned)
            .collect()
    }
}

impl Cloud {
    fn alive_ids(&self) -> Vec<String> {
        self.alive
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Rents one more instance under `name` behind the controller's back,
    /// as a create still being carried out when it was retried would.
    fn rent_behind(&self, name: &str) -> String {
        let id = format!("i{}", self.next.fetch_add(1, Ordering::SeqCst));
        self.alive
            .lock()
            .unwrap()
            .push((id.clone(), name.to_owned()));
        id
    }
}

#[async_trait]
impl Provider for Cloud {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    async fn create(&self, name: &str) -> Result<Instance, ProviderError> {
        self.journal.write(format!("create {name}"));
        if self.hold_creates.load(Ordering::SeqCst) {
            self.release_creates.notified().await;
        }
        if self.create_fails.load(Ordering::SeqCst) {
            return Err(ProviderError::Other(anyhow::anyhow!("HTTP 502")));
        }
        let id = self.rent_behind(name);
        if self.lose_create_answers.load(Ordering::SeqCst) {
            return Err(ProviderError::Other(anyhow::anyhow!("connection reset")));
        }
        Ok(Instance {
            id,
            address: Some("127.0.0.1:9".into()),
        })
    }

    async fn find(&self, name: &str) -> Result<Vec<Instance>, ProviderError> {
        self.finds.fetch_add(1, Ordering::SeqCst);
        if self.find_fails.load(Ordering::SeqCst) {
            return Err(ProviderError::Other(anyhow::anyhow!("HTTP 503")));
        }
        Ok(self
            .alive
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, n)| n == name)
            .map(|(id, _)| Instance {
                id: id.clone(),
                address: Some("127.0.0.1:9".into()),
            })
            .collect())
    }

    async fn start(&self, instance: &Instance) -> Result<Instance, ProviderError> {
        if self.resume_no_capacity.load(Ordering::SeqCst) {
            return Err(ProviderError::NoCapacity("host full".into()));
        }
        Ok(instance.clone())
    }

    async fn stop(&self, _: &Instance) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn terminate(&self, instance: &Instance) -> Result<(), ProviderError> {
        self.terminates.fetch_add(1, Ordering::SeqCst);
        if self.terminate_fails.load(Ordering::SeqCst) {
            return Err(ProviderError::Other(anyhow::anyhow!("HTTP 500")));
        }
        self.alive
            .lock()
            .unwrap()
            .retain(|(id, _)| *id != instance.id);
        Ok(())
    }

    async fn status(
        &self,
        instance: &Instance,
    ) -> Result<(InstanceStatus, Instance), ProviderError> {
        let status = if self.gone.load(Ordering::SeqCst) {
            InstanceStatus::Terminated
        } else {
            InstanceStatus::Running
        };
        Ok((status, instance.clone()))
    }

    fn cost(&self) -> HourlyCost {
        HourlyCost {
            running: 1.0,
            stopped: 0.1,
        }
    }
}

struct Idle;

impl Demand for Idle {
    fn demand(&self) -> Vec<(String, Vec<TierWait>)> {
        vec![("pool".into(), vec![])]
    }

    fn set_capacity(&self, _: &str, _: u32) {}
}

/// Writes each event as `from->to:reason id name` to the journal.
struct Recorder(Arc<Journal>);

#[async_trait]
impl EventSink for Recorder {
    fn record(&self, event: InstanceEvent) {
        self.0.write(format!(
            "{}->{}:{} {} {}",
            event.from,
            event.to,
            event.reason,
            event.instance_id.as_deref().unwrap_or("-"),
            event.instance_name.as_deref().unwrap_or("-"),
        ));
    }

    async fn flushed(&self) -> Result<(), EventLogClosed> {
        self.0.write("flushed".into());
        Ok(())
    }
}

struct Ready(AtomicBool);

#[async_trait]
impl Readiness for Ready {
    async fn ready(&self, _: &Backend) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

struct Fixture {
    pool: Arc<BackendPool>,
    cloud: Arc<Cloud>,
    controller: Arc<FleetController>,
}

fn start(policy: FleetPolicy, ready: bool) -> Fixture {
    let f = build(policy, ready);
    f.run();
    f
}

/// The fixture with its controller not running yet.
fn build(policy: FleetPolicy, ready: bool) -> Fixture {
    let pool = Arc::new(BackendPool::new(
        vec![Backend {
            name: "gpu".into(),
            address: String::new(),
            host: "gpu".into(),
            tls: false,
            models: vec!["m".into()],
            max_concurrency: 4,
            credential: None,
            probe: Probe::openai(),
            protocol: Protocol::OpenAi,
        }],
        Box::new(RoundRobin::default()),
        BreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
        },
    ));
    let cloud = Arc::new(Cloud::default());
    let journal = Arc::clone(&cloud.journal);
    let controller = FleetController::new(
        Arc::clone(&pool),
        vec!["pool".into()],
        vec![Managed {
            id: 0,
            provider: Arc::clone(&cloud) as Arc<dyn Provider>,
        }],
        Scaler::new(policy),
        ControllerTiming {
            interval: Duration::from_millis(100),
            poll: Duration::from_millis(50),
            drain_timeout: Duration::from_secs(30),
        },
        Connections {
            demand: Arc::new(Idle),
            events: Arc::new(Recorder(journal)),
            readiness: Arc::new(Ready(AtomicBool::new(ready))),
        },
    );
    Fixture {
        pool,
        cloud,
        controller,
    }
}

impl Fixture {
    fn run(&self) {
        tokio::spawn(Arc::clone(&self.controller).run(std::future::pending::<()>()));
    }

    fn state(&self) -> InstanceState {
        self.controller.statuses()[0].state
    }

    /// Waits (in paused time) until the instance is in `state`.
    async fn reach(&self, state: InstanceState) {
        for _ in 0..2000 {
            if self.state() == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never {state}; is {}", self.state());
    }
}

/// Before: provider actions ran in detached tasks, so the loop stopped
/// while a create was still under way and nobody waited for its outcome.
#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_an_action_under_way() {
    let f = build(FleetPolicy::default(), true);
    f.cloud.hold_creates.store(true, Ordering::SeqCst);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut run = tokio::spawn(Arc::clone(&f.controller).run(async {
        let _ = stopped.await;
    }));
    // The floor's instance is being rented; its create does not answer.
    f.reach(InstanceState::Provisioning).await;
    stop.send(()).unwrap();
    // An hour of paused time: the loop has long seen the shutdown.
    assert!(
        tokio::time::timeout(Duration::from_secs(3600), &mut run)
            .await
            .is_err(),
        "run returned with a create under way"
    );
    f.cloud.release_creates.notify_one();
    run.await.unwrap();
    assert_eq!(
        f.state(),
        InstanceState::Hot,
        "the wake ran to its end before run returned"
    );
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_dies_while_starting_fails_within_seconds() {
    let f = start(FleetPolicy::default(), false);
    f.reach(InstanceState::Starting).await;
    f.cloud.gone.store(true, Ordering::SeqCst);
    let gone_at = Instant::now();
    f.reach(InstanceState::Failed).await;
    assert!(
        gone_at.elapsed() <= STATUS_EVERY + Duration::from_secs(1),
        "noticed after {:?}, not at the 15-minute start timeout",
        gone_at.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_release_is_retried_once_per_failed_retry() {
    let f = start(
        FleetPolicy {
            start_timeout: Duration::ZERO,
            failed_retry: Duration::from_secs(1),
            ..FleetPolicy::default()
        },
        false,
    );
    f.cloud.terminate_fails.store(true, Ordering::SeqCst);
    f.reach(InstanceState::Failed).await;
    let before = f.cloud.terminates.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = f.cloud.terminates.load(Ordering::SeqCst) - before;
    assert!((9..=11).contains(&calls), "{calls} terminate calls in 10 s");
    assert!(
        f.controller.statuses()[0].cost_so_far > 0.0,
        "a failed instance still rented is billed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_wake_interrupts_a_sleep_still_draining() {
    let f = start(FleetPolicy::default(), true);
    f.reach(InstanceState::Hot).await;
    let (_, _, lease) = f
        .pool
        .select(&f.pool.serving("m"), &[], &RequestFacts::default())
        .unwrap();
    f.controller.command("gpu", Command::Sleep).unwrap();
    f.reach(InstanceState::Draining).await;
    assert_eq!(
        f.controller.command("gpu", Command::Wake),
        Ok(InstanceState::Hot)
    );
    drop(lease);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(f.state(), InstanceState::Hot, "the sleep gave up");
}

#[tokio::test(start_paused = true)]
async fn a_stopped_instance_that_cannot_be_released_is_never_rented_twice() {
    let f = start(
        FleetPolicy {
            min_hot: 0,
            failed_retry: Duration::from_secs(60),
            ..FleetPolicy::default()
        },
        true,
    );
    f.controller.command("gpu", Command::Wake).unwrap();
    f.reach(InstanceState::Hot).await;
    f.controller.command("gpu", Command::Sleep).unwrap();
    f.reach(InstanceState::Warm).await;
    f.cloud.resume_no_capacity.store(true, Ordering::SeqCst);
    f.cloud.terminate_fails.store(true, Ordering::SeqCst);
    f.controller.command("gpu", Command::Wake).unwrap();
    f.reach(InstanceState::Failed).await;
    assert_eq!(f.cloud.alive_ids(), ["i0"], "no second rental");
    assert_eq!(
        f.controller.statuses()[0].instance_id.as_deref(),
        Some("i0")
    );

    // Once the cloud lets it go, the slot is released, then rented anew.
    f.cloud.terminate_fails.store(false, Ordering::SeqCst);
    f.reach(InstanceState::Cold).await;
    assert!(f.cloud.alive_ids().is_empty());
    f.controller.command("gpu", Command::Wake).unwrap();
    f.reach(InstanceState::Hot).await;
    assert_eq!(f.cloud.alive_ids(), ["i1"]);
}

#[tokio::test(start_paused = true)]
async fn time_and_cost_accrue_to_the_state_they_were_spent_in() {
    // Nothing but the commands moves it: no instance kept hot, none idle long enough.
    let f = start(
        FleetPolicy {
            min_hot: 0,
            idle_stop: Duration::from_secs(7200),
            ..FleetPolicy::default()
        },
        true,
    );
    let started = Instant::now();
    f.controller.command("gpu", Command::Wake).unwrap();
    f.reach(InstanceState::Hot).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    f.controller.command("gpu", Command::Sleep).unwrap();
    f.reach(InstanceState::Warm).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;

    let status = &f.controller.statuses()[0];
    let spent = |state: InstanceState| status.accrued[state.index()];
    let hot = spent(InstanceState::Hot);
    let warm = spent(InstanceState::Warm);
    // The scripted cloud: $1/h running, $0.10/h stopped; polls add seconds.
    assert!((3600.0..3610.0).contains(&hot.seconds), "{hot:?}");
    assert!((hot.dollars - hot.seconds / 3600.0).abs() < 1e-9, "{hot:?}");
    assert!((3600.0..3610.0).contains(&warm.seconds), "{warm:?}");
    assert!(
        (warm.dollars - 0.1 * warm.seconds / 3600.0).abs() < 1e-9,
        "{warm:?}"
    );
    let seconds: f64 = status.accrued.iter().map(|a| a.seconds).sum();
    let dollars: f64 = status.accrued.iter().map(|a| a.dollars).sum();
    assert!((seconds - started.elapsed().as_secs_f64()).abs() < 1e-6);
    assert!((dollars - status.cost_so_far).abs() < 1e-9);
}

#[tokio::test(start_paused = true)]
async fn a_failed_instance_still_rented_is_billed_until_it_is_let_go() {
    let f = start(
        FleetPolicy {
            start_timeout: Duration::ZERO,
            failed_retry: Duration::from_secs(36_000),
            ..FleetPolicy::default()
        },
        false,
    );
    f.cloud.terminate_fails.store(true, Ordering::SeqCst);
    f.reach(InstanceState::Failed).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    // A wake lets the leftover instance go before renting anew.
    f.cloud.terminate_fails.store(false, Ordering::SeqCst);
    f.controller.command("gpu", Command::Wake).unwrap();
    while f.controller.statuses()[0].instance_id.as_deref() == Some("i0") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let failed = f.controller.statuses()[0].accrued[InstanceState::Failed.index()];
    assert!(failed.seconds >= 3600.0, "{failed:?}");
    assert!(
        (failed.dollars - failed.seconds / 3600.0).abs() < 1e-9,
        "held the whole time, so billed at the running $1/h: {failed:?}"
    );
}

/// Issue 17, item 7: a create whose answer was lost (the cloud rented the
/// instance, the answer never came) made the controller rent again, and the
/// first instance ran, billed, forever.
#[tokio::test(start_paused = true)]
async fn a_create_whose_answer_is_lost_is_found_by_its_name_not_rented_again() {
    let f = build(FleetPolicy::default(), true);
    f.cloud.lose_create_answers.store(true, Ordering::SeqCst);
    f.run();
    f.reach(InstanceState::Hot).await;
    // Several failed_retry periods: nothing more is rented.
    tokio::time::sleep(Duration::from_secs(600)).await;

    assert_eq!(f.cloud.alive_ids(), ["i0"], "one instance, the first");
    assert_eq!(f.state(), InstanceState::Hot);
    assert_eq!(
        f.controller.statuses()[0].instance_id.as_deref(),
        Some("i0")
    );
    let creates = f.cloud.journal.creates();
    assert_eq!(creates.len(), 1, "{creates:?}");
    let name = &creates[0];
    assert!(name.starts_with("tollgate-gpu-"), "{name}");
    // The name is recorded and flushed before the create is sent.
    assert_eq!(
        f.cloud.journal.lines()[..5],
        [
            format!("cold->provisioning:min_hot - {name}"),
            "flushed".to_owned(),
            format!("create {name}"),
            format!("provisioning->starting:found_by_name i0 {name}"),
            format!("starting->hot:ready i0 {name}"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_rented_again_until_a_create_without_an_answer_is_looked_up() {
    let f = build(
        FleetPolicy {
            failed_retry: Duration::from_secs(1),
            ..FleetPolicy::default()
        },
        true,
    );
    f.cloud.lose_create_answers.store(true, Ordering::SeqCst);
    f.cloud.find_fails.store(true, Ordering::SeqCst);
    f.run();
    f.reach(InstanceState::Failed).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(f.state(), InstanceState::Failed);
    assert_eq!(f.cloud.journal.creates().len(), 1, "never a second create");
    assert!(
        f.cloud.finds.load(Ordering::SeqCst) >= 5,
        "looked up again at each release"
    );
    assert_eq!(f.cloud.alive_ids(), ["i0"]);

    // Once the lookup answers, what the create rented is released, and
    // only then is a new one rented, under a new name.
    f.cloud.find_fails.store(false, Ordering::SeqCst);
    f.cloud.lose_create_answers.store(false, Ordering::SeqCst);
    f.reach(InstanceState::Hot).await;
    assert_eq!(f.cloud.alive_ids(), ["i1"]);
    let creates = f.cloud.journal.creates();
    assert_eq!(creates.len(), 2);
    assert_ne!(creates[0], creates[1]);
    let released = format!("failed->cold:failed i0 {}", creates[0]);
    assert!(
        f.cloud.journal.lines().contains(&released),
        "{:?}",
        f.cloud.journal.lines()
    );
}

#[tokio::test(start_paused = true)]
async fn a_create_that_rented_nothing_is_retried_under_the_same_name() {
    let f = build(
        FleetPolicy {
            min_hot: 0,
            failed_retry: Duration::from_secs(3600),
            ..FleetPolicy::default()
        },
        true,
    );
    f.cloud.create_fails.store(true, Ordering::SeqCst);
    f.run();
    f.controller.command("gpu", Command::Wake).unwrap();
    f.reach(InstanceState::Failed).await;
    assert!(f.cloud.alive_ids().is_empty());

    f.cloud.create_fails.store(false, Ordering::SeqCst);
    f.controller.command("gpu", Command::Wake).unwrap();
    f.reach(InstanceState::Hot).await;
    let creates = f.cloud.journal.creates();
    assert_eq!(creates.len(), 2);
    assert_eq!(creates[0], creates[1], "looked up, not found, asked again");
    assert_eq!(f.cloud.alive_ids(), ["i0"]);
}

/// A retried create can race one still being carried out: both rent under
/// the same name, and the lookup keeps one.
#[tokio::test(start_paused = true)]
async fn a_second_instance_under_one_name_is_terminated() {
    let f = build(
        FleetPolicy {
            min_hot: 0,
            failed_retry: Duration::from_secs(3600),
            ..FleetPolicy::default()
        },
        true,
    );
    f.cloud.create_fails.store(true, Ordering::SeqCst);
    f.run();
    f.controller.command("gpu", Command::Wake).unwrap();
    f.reach(InstanceState::Failed).await;
    let name = f.cloud.journal.creates()[0].clone();
    let first = f.cloud.rent_behind(&name);
    f.cloud.rent_behind(&name);

    f.controller.command("gpu", Command::Wake).unwrap();
    f.reach(InstanceState::Hot).await;
    assert_eq!(f.cloud.alive_ids(), std::slice::from_ref(&first));
    assert_eq!(
        f.controller.statuses()[0].instance_id.as_deref(),
        Some(first.as_str())
    );
    assert_eq!(f.cloud.journal.creates().len(), 1, "found, not created");
}

/// Tollgate stopped after the log had a create's name and before its
/// answer: the restarted controller looks the name up.
#[tokio::test(start_paused = true)]
async fn a_restart_during_a_create_adopts_what_it_rented() {
    let f = build(FleetPolicy::default(), true);
    let rented = f.cloud.rent_behind("tollgate-gpu-before-the-restart");
    f.controller
        .adopt(0, None, Some("tollgate-gpu-before-the-restart".into()));
    assert_eq!(f.state(), InstanceState::Provisioning);
    f.run();
    f.reach(InstanceState::Hot).await;

    assert_eq!(f.cloud.alive_ids(), std::slice::from_ref(&rented));
    assert!(f.cloud.journal.creates().is_empty(), "nothing rented again");
    assert_eq!(
        f.cloud.journal.lines()[0],
        format!("provisioning->starting:found_by_name {rented} tollgate-gpu-before-the-restart")
    );
}

#[tokio::test(start_paused = true)]
async fn a_restart_during_a_create_that_rented_nothing_gives_it_up() {
    let f = build(FleetPolicy::default(), true);
    f.controller
        .adopt(0, None, Some("tollgate-gpu-never-rented".into()));
    f.run();
    f.reach(InstanceState::Hot).await;

    let lines = f.cloud.journal.lines();
    assert_eq!(
        lines[0],
        "provisioning->cold:create_not_found - tollgate-gpu-never-rented"
    );
    // Then min_hot rents anew, under a name of its own.
    let creates = f.cloud.journal.creates();
    assert_eq!(creates.len(), 1);
    assert_ne!(creates[0], "tollgate-gpu-never-rented");
    assert_eq!(f.cloud.alive_ids(), ["i0"]);
}
