//! When to wake and when to put instances to sleep: the scaling rules as a
//! pure function of the admission queue's signals and the instances' states,
//! so the same code runs in the live controller and in `tollgate-simulate`.
//!
//! Rules, per backend pool, every thresholds from `[fleet]`:
//!
//! - **Scale from zero**: requests wait and nothing is hot or waking → wake
//!   one (resume a warm instance, else rent a cold one).
//! - **Floor**: fewer than `min_hot` hot or waking → wake one.
//! - **Queue depth**: more than `resume_queue_depth` waiting and a warm
//!   standby exists → resume it; more than `create_queue_depth` and no
//!   standby → rent a cold slot.
//! - **Tier waits**: a tier's oldest request has waited longer than its
//!   `wake_standby_wait_secs` → resume a standby; longer than its
//!   `rent_overflow_wait_secs` → resume a standby, else rent.
//! - **Scale in**: fewer than `scale_in_queue_depth` waiting for
//!   `scale_in_after_secs` and more than `max(min_hot, 1)` hot → stop the newest
//!   non-primary; an instance with no request for `idle_stop_secs` while
//!   nobody waits and more than `min_hot` are hot → stop it (this is how the
//!   last one goes when `min_hot = 0`).
//! - **Release**: warm for `warm_release_secs` → terminate (→ cold).
//! - **Failed**: after `failed_retry_secs`, what is left is released.
//!
//! Hysteresis: scale-out needs a backlog (deeper than 10 or 30, or a long
//! wait); scale-in needs the queue nearly empty for half an hour, with no
//! wake in that window, and the window restarts after every stop, so
//! capacity leaves one instance at a time and never right after it came. While an instance is waking no other is woken for the same backlog,
//! except by the floor. At most `max_hot` instances are hot or waking.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::state::InstanceState;
use crate::routing::BackendId;

/// `[fleet]` thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetPolicy {
    pub min_hot: u32,
    pub max_hot: u32,
    /// Hot → warm after this long without a request (while nobody waits).
    pub idle_stop: Duration,
    /// Warm → cold (terminated) after this long stopped.
    pub warm_release: Duration,
    pub resume_queue_depth: usize,
    pub create_queue_depth: usize,
    pub scale_in_queue_depth: usize,
    pub scale_in_after: Duration,
    /// Per tier: resume a standby once its oldest request waited this long.
    pub wake_standby_wait: HashMap<String, Duration>,
    /// Per tier: resume a standby, or rent one, once its oldest request
    /// waited this long.
    pub rent_overflow_wait: HashMap<String, Duration>,
    /// A failed instance is released and its slot retried after this long.
    pub failed_retry: Duration,
    /// Starting for longer than this without passing its probe → failed.
    pub start_timeout: Duration,
}

impl Default for FleetPolicy {
    /// The design brief's rules.
    fn default() -> Self {
        let secs = Duration::from_secs;
        Self {
            min_hot: 1,
            max_hot: u32::MAX,
            idle_stop: secs(30 * 60),
            warm_release: secs(24 * 3600),
            resume_queue_depth: 10,
            create_queue_depth: 30,
            scale_in_queue_depth: 3,
            scale_in_after: secs(30 * 60),
            wake_standby_wait: HashMap::from([("premium".to_owned(), secs(120))]),
            rent_overflow_wait: HashMap::from([
                ("pro".to_owned(), secs(30)),
                ("enterprise".to_owned(), secs(30)),
            ]),
            failed_retry: secs(60),
            start_timeout: secs(15 * 60),
        }
    }
}

/// One instance as the policy sees it.
#[derive(Debug, Clone)]
pub struct InstanceView {
    pub id: BackendId,
    pub state: InstanceState,
    /// When it entered `state`.
    pub since: Instant,
    /// When a request last started or ended on it.
    pub last_active: Instant,
    pub in_flight: u32,
    /// Has a provider: the policy may wake and stop it. Static backends are
    /// counted as hot capacity but never touched.
    pub managed: bool,
    /// Pinned by an operator (`drain`): the policy leaves it alone.
    pub pinned: bool,
}

/// One tier's queue.
#[derive(Debug, Clone)]
pub struct TierWait {
    pub tier: String,
    pub depth: usize,
    pub oldest_wait: Duration,
}

/// A backend pool's demand and instances, in config order (the first
/// managed instance is the primary).
#[derive(Debug, Clone)]
pub struct PoolView {
    pub pool: String,
    pub tiers: Vec<TierWait>,
    pub instances: Vec<InstanceView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    /// Resume a warm instance or rent a cold one.
    Wake,
    /// Drain, then stop (→ warm).
    Sleep,
    /// Terminate (→ cold).
    Release,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub kind: ActionKind,
    pub id: BackendId,
    /// Why, for the event log: `scale_from_zero`, `queue_depth`, …
    pub reason: String,
}

/// The policy with the little memory hysteresis needs.
#[derive(Debug, Default)]
pub struct Scaler {
    policy: FleetPolicy,
    /// Per pool: since when the queue has been below `scale_in_queue_depth`.
    quiet_since: HashMap<String, Instant>,
}

impl Scaler {
    pub fn new(policy: FleetPolicy) -> Self {
        Self {
            policy,
            quiet_since: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &FleetPolicy {
        &self.policy
    }

    /// What to do about one pool now. At most one wake and one sleep per
    /// call; releases of long-warm and failed instances as they come due.
    pub fn decide(&mut self, now: Instant, view: &PoolView) -> Vec<Action> {
        let p = &self.policy;
        let mut actions = Vec::new();
        let depth: usize = view.tiers.iter().map(|t| t.depth).sum();
        let count = |f: &dyn Fn(&InstanceView) -> bool| {
            u32::try_from(view.instances.iter().filter(|i| f(i)).count()).unwrap_or(u32::MAX)
        };
        let hot = count(&|i| i.state == InstanceState::Hot);
        let waking = count(&|i| i.state.is_waking());
        let movable = |i: &&InstanceView| i.managed && !i.pinned;
        let standby = view
            .instances
            .iter()
            .filter(movable)
            .find(|i| i.state == InstanceState::Warm);
        let cold = view
            .instances
            .iter()
            .filter(movable)
            .find(|i| i.state == InstanceState::Cold);
        let waited_past = |limits: &HashMap<String, Duration>| {
            view.tiers.iter().find(|t| {
                t.depth > 0
                    && limits
                        .get(&t.tier)
                        .is_some_and(|limit| t.oldest_wait > *limit)
            })
        };

        let wake = if hot + waking >= p.max_hot {
            None
        } else if hot + waking < p.min_hot {
            standby.or(cold).map(|i| (i.id, "min_hot".to_owned()))
        } else if waking > 0 {
            None
        } else if depth > 0 && hot == 0 {
            standby
                .or(cold)
                .map(|i| (i.id, "scale_from_zero".to_owned()))
        } else if let Some(i) = standby.filter(|_| depth > p.resume_queue_depth) {
            Some((i.id, "queue_depth".to_owned()))
        } else if let Some(i) = cold.filter(|_| depth > p.create_queue_depth) {
            Some((i.id, "queue_depth".to_owned()))
        } else if let Some(t) = waited_past(&p.rent_overflow_wait) {
            standby
                .or(cold)
                .map(|i| (i.id, format!("tier_wait:{}", t.tier)))
        } else if let Some(t) = waited_past(&p.wake_standby_wait) {
            standby.map(|i| (i.id, format!("tier_wait:{}", t.tier)))
        } else {
            None
        };
        if let Some((id, reason)) = wake {
            actions.push(Action {
                kind: ActionKind::Wake,
                id,
                reason,
            });
        }

        // Scale in, never in the same call as a wake nor while one is under
        // way; a wake restarts the quiet window, so what was just woken is
        // not stopped on the strength of the quiet before it.
        let quiet_since = if depth < p.scale_in_queue_depth && actions.is_empty() && waking == 0 {
            *self.quiet_since.entry(view.pool.clone()).or_insert(now)
        } else {
            self.quiet_since.remove(&view.pool);
            now
        };
        if actions.is_empty() && waking == 0 {
            // Newest first, so the longest-running instances (and the
            // primary) stay.
            let mut stoppable: Vec<&InstanceView> = view
                .instances
                .iter()
                .filter(movable)
                .filter(|i| i.state == InstanceState::Hot)
                .collect();
            stoppable.sort_by_key(|i| std::cmp::Reverse(i.since));
            let primary = view.instances.iter().find(|i| i.managed).map(|i| i.id);
            let idle = stoppable.iter().find(|i| {
                depth == 0
                    && hot > p.min_hot
                    && i.in_flight == 0
                    && now.saturating_duration_since(i.last_active) >= p.idle_stop
            });
            let quiet = stoppable.iter().find(|i| {
                Some(i.id) != primary
                    && hot > p.min_hot.max(1)
                    && now.saturating_duration_since(quiet_since) >= p.scale_in_after
            });
            let sleep = idle
                .map(|i| (i.id, "idle"))
                .or(quiet.map(|i| (i.id, "queue_quiet")));
            if let Some((id, reason)) = sleep {
                if reason == "queue_quiet" {
                    // The next stop waits a whole window again.
                    self.quiet_since.insert(view.pool.clone(), now);
                }
                actions.push(Action {
                    kind: ActionKind::Sleep,
                    id,
                    reason: reason.to_owned(),
                });
            }
        }

        for i in view.instances.iter().filter(movable) {
            let held = now.saturating_duration_since(i.since);
            let reason = match i.state {
                InstanceState::Warm if held >= p.warm_release => "warm_release",
                InstanceState::Failed if held >= p.failed_retry => "failed",
                _ => continue,
            };
            actions.push(Action {
                kind: ActionKind::Release,
                id: i.id,
                reason: reason.to_owned(),
            });
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::{Cold, Failed, Hot, Starting, Warm};

    const MIN: Duration = Duration::from_secs(60);

    struct Fixture {
        start: Instant,
        scaler: Scaler,
        view: PoolView,
    }

    fn fixture(policy: FleetPolicy, states: &[InstanceState]) -> Fixture {
        let start = Instant::now();
        let instances = states
            .iter()
            .enumerate()
            .map(|(id, &state)| InstanceView {
                id,
                state,
                since: start,
                last_active: start,
                in_flight: 0,
                managed: true,
                pinned: false,
            })
            .collect();
        Fixture {
            start,
            scaler: Scaler::new(policy),
            view: PoolView {
                pool: "llama".into(),
                tiers: ["free", "premium", "pro"]
                    .map(|tier| TierWait {
                        tier: tier.into(),
                        depth: 0,
                        oldest_wait: Duration::ZERO,
                    })
                    .to_vec(),
                instances,
            },
        }
    }

    impl Fixture {
        fn queue(&mut self, tier: &str, depth: usize, oldest_wait: Duration) {
            let t = self.view.tiers.iter_mut().find(|t| t.tier == tier).unwrap();
            t.depth = depth;
            t.oldest_wait = oldest_wait;
        }

        fn at(&mut self, after: Duration) -> Vec<(ActionKind, BackendId, String)> {
            self.scaler
                .decide(self.start + after, &self.view)
                .into_iter()
                .map(|a| (a.kind, a.id, a.reason))
                .collect()
        }
    }

    fn zero_floor() -> FleetPolicy {
        FleetPolicy {
            min_hot: 0,
            ..FleetPolicy::default()
        }
    }

    #[test]
    fn a_held_request_wakes_the_standby_of_an_empty_fleet() {
        let mut f = fixture(zero_floor(), &[Cold, Warm]);
        assert!(f.at(MIN).is_empty(), "nobody waits: nothing to do");
        f.queue("free", 1, Duration::ZERO);
        assert_eq!(
            f.at(MIN),
            [(ActionKind::Wake, 1, "scale_from_zero".into())],
            "the warm standby is resumed before a cold slot is rented"
        );
        f.view.instances[1].state = Starting;
        assert!(f.at(MIN).is_empty(), "one wake at a time");
    }

    #[test]
    fn the_floor_keeps_min_hot_instances_up() {
        let mut f = fixture(FleetPolicy::default(), &[Cold, Cold]);
        assert_eq!(f.at(MIN), [(ActionKind::Wake, 0, "min_hot".into())]);
    }

    #[test]
    fn queue_depth_resumes_a_standby_past_ten_and_rents_past_thirty() {
        let mut f = fixture(FleetPolicy::default(), &[Hot, Warm, Cold]);
        f.queue("free", 10, Duration::ZERO);
        assert!(f.at(MIN).is_empty(), "10 is not more than 10");
        f.queue("free", 11, Duration::ZERO);
        assert_eq!(f.at(MIN), [(ActionKind::Wake, 1, "queue_depth".into())]);
        f.view.instances[1].state = Hot;
        f.queue("free", 30, Duration::ZERO);
        assert!(f.at(MIN).is_empty(), "no standby, and 30 is not past 30");
        f.queue("free", 31, Duration::ZERO);
        assert_eq!(f.at(MIN), [(ActionKind::Wake, 2, "queue_depth".into())]);
    }

    #[test]
    fn tier_waits_wake_capacity_before_the_queue_is_deep() {
        let mut f = fixture(FleetPolicy::default(), &[Hot, Cold]);
        f.queue("premium", 2, Duration::from_secs(200));
        assert!(
            f.at(MIN).is_empty(),
            "premium only wakes a standby, and none is warm"
        );
        f.queue("pro", 1, Duration::from_secs(31));
        assert_eq!(f.at(MIN), [(ActionKind::Wake, 1, "tier_wait:pro".into())]);
    }

    #[test]
    fn max_hot_caps_wakes() {
        let mut f = fixture(
            FleetPolicy {
                max_hot: 1,
                ..FleetPolicy::default()
            },
            &[Hot, Warm],
        );
        f.queue("free", 100, Duration::ZERO);
        assert!(f.at(MIN).is_empty());
    }

    #[test]
    fn a_quiet_queue_stops_the_newest_non_primary_one_window_at_a_time() {
        let mut f = fixture(FleetPolicy::default(), &[Hot, Hot, Hot]);
        f.view.instances[1].since = f.start + Duration::from_secs(5);
        f.view.instances[2].since = f.start + Duration::from_secs(1);
        for i in &mut f.view.instances {
            i.in_flight = 1;
        }
        f.queue("free", 2, Duration::ZERO);
        assert!(f.at(Duration::ZERO).is_empty(), "the quiet window starts");
        assert!(f.at(29 * MIN).is_empty());
        assert_eq!(
            f.at(30 * MIN),
            [(ActionKind::Sleep, 1, "queue_quiet".into())],
            "newest first"
        );
        f.view.instances[1].state = Warm;
        assert!(f.at(31 * MIN).is_empty(), "the window restarted");
        assert_eq!(
            f.at(60 * MIN),
            [(ActionKind::Sleep, 2, "queue_quiet".into())]
        );
        f.view.instances[2].state = Warm;
        assert!(f.at(120 * MIN).is_empty(), "the primary stays");
    }

    #[test]
    fn a_busy_moment_restarts_the_quiet_window() {
        let mut f = fixture(FleetPolicy::default(), &[Hot, Hot]);
        for i in &mut f.view.instances {
            i.in_flight = 1;
        }
        assert!(f.at(Duration::ZERO).is_empty());
        f.queue("free", 3, Duration::ZERO);
        assert!(f.at(20 * MIN).is_empty());
        f.queue("free", 0, Duration::ZERO);
        assert!(f.at(21 * MIN).is_empty());
        assert!(f.at(50 * MIN).is_empty(), "quiet only since minute 21");
        assert_eq!(
            f.at(51 * MIN),
            [(ActionKind::Sleep, 1, "queue_quiet".into())]
        );
    }

    #[test]
    fn a_wake_restarts_the_quiet_window() {
        let mut f = fixture(FleetPolicy::default(), &[Hot, Cold]);
        for i in &mut f.view.instances {
            i.in_flight = 1;
        }
        assert!(f.at(Duration::ZERO).is_empty(), "the quiet window starts");
        f.queue("pro", 1, Duration::from_secs(31));
        assert_eq!(
            f.at(40 * MIN),
            [(ActionKind::Wake, 1, "tier_wait:pro".into())]
        );
        f.view.instances[1].state = Starting;
        assert!(
            f.at(44 * MIN).is_empty(),
            "nothing stops while a wake is under way"
        );
        f.view.instances[1].state = Hot;
        f.view.instances[1].since = f.start + 45 * MIN;
        f.queue("pro", 0, Duration::ZERO);
        assert!(
            f.at(45 * MIN + Duration::from_secs(1)).is_empty(),
            "the instance just woken is not stopped for the quiet before it"
        );
        assert_eq!(
            f.at(76 * MIN),
            [(ActionKind::Sleep, 1, "queue_quiet".into())]
        );
    }

    #[test]
    fn an_idle_last_instance_sleeps_when_the_floor_is_zero() {
        let mut f = fixture(
            FleetPolicy {
                idle_stop: Duration::from_secs(10),
                ..zero_floor()
            },
            &[Hot],
        );
        f.view.instances[0].in_flight = 1;
        assert!(f.at(MIN).is_empty(), "busy");
        f.view.instances[0].in_flight = 0;
        f.view.instances[0].last_active = f.start + Duration::from_secs(55);
        assert!(f.at(MIN).is_empty(), "idle for 5 s only");
        assert_eq!(
            f.at(65 * Duration::from_secs(1)),
            [(ActionKind::Sleep, 0, "idle".into())]
        );
    }

    #[test]
    fn long_warm_and_failed_instances_are_released() {
        let mut f = fixture(FleetPolicy::default(), &[Hot, Warm, Failed]);
        assert!(
            f.at(MIN)
                .iter()
                .all(|a| a.0 != ActionKind::Release || a.1 != 1)
        );
        let released: Vec<_> = f
            .at(25 * 60 * MIN)
            .into_iter()
            .filter(|a| a.0 == ActionKind::Release)
            .map(|a| (a.1, a.2))
            .collect();
        assert_eq!(released, [(1, "warm_release".into()), (2, "failed".into())]);
    }

    #[test]
    fn static_and_pinned_instances_are_never_touched() {
        let mut f = fixture(zero_floor(), &[Hot, Warm]);
        f.view.instances[0].managed = false;
        f.view.instances[1].pinned = true;
        f.queue("free", 50, Duration::ZERO);
        assert!(f.at(MIN).is_empty(), "the only standby is pinned");
        f.queue("free", 0, Duration::ZERO);
        assert!(f.at(1000 * MIN).is_empty(), "a static backend never sleeps");
    }
}
