//! The controller against a scripted GPU cloud, on tokio's paused clock:
//! failures of the provider's calls and of the instance itself.

#![allow(clippy::unwrap_used, clippy::panic)]

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

/// A cloud whose calls fail on demand; `alive` is what it bills for.
#[derive(Default)]
struct Cloud {
    terminates: AtomicU32,
    terminate_fails: AtomicBool,
    resume_no_capacity: AtomicBool,
    gone: AtomicBool,
    alive: Mutex<Vec<String>>,
    next: AtomicU32,
}

#[async_trait]
impl Provider for Cloud {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    async fn create(&self) -> Result<Instance, ProviderError> {
        let id = format!("i{}", self.next.fetch_add(1, Ordering::SeqCst));
        self.alive.lock().unwrap().push(id.clone());
        Ok(Instance {
            id,
            address: Some("127.0.0.1:9".into()),
        })
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
        self.alive.lock().unwrap().retain(|i| *i != instance.id);
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

struct Discard;

impl EventSink for Discard {
    fn record(&self, _: InstanceEvent) {}
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
            events: Arc::new(Discard),
            readiness: Arc::new(Ready(AtomicBool::new(ready))),
        },
    );
    tokio::spawn(Arc::clone(&controller).run(std::future::pending::<()>()));
    Fixture {
        pool,
        cloud,
        controller,
    }
}

impl Fixture {
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
    let (_, _, lease) = f.pool.select("m", &[], &RequestFacts::default()).unwrap();
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
    assert_eq!(*f.cloud.alive.lock().unwrap(), ["i0"], "no second rental");
    assert_eq!(
        f.controller.statuses()[0].instance_id.as_deref(),
        Some("i0")
    );

    // Once the cloud lets it go, the slot is released, then rented anew.
    f.cloud.terminate_fails.store(false, Ordering::SeqCst);
    f.reach(InstanceState::Cold).await;
    assert!(f.cloud.alive.lock().unwrap().is_empty());
    f.controller.command("gpu", Command::Wake).unwrap();
    f.reach(InstanceState::Hot).await;
    assert_eq!(*f.cloud.alive.lock().unwrap(), ["i1"]);
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
