//! The fleet controller: a background loop that reads the admission queues'
//! demand, asks the [`Scaler`] what to do, and carries it out through each
//! backend's [`Provider`], one transition at a time.
//!
//! Every transition is logged, handed to the [`EventSink`] (Postgres's
//! `instance_events` in the gateway) and reflected at once in the
//! [`BackendPool`] (only hot instances are routable) and in the admission
//! queues' capacity (the slots of routable backends). A pool whose capacity
//! is zero holds its requests rather than failing them, which is what makes
//! scale from zero work: the queue holds, the controller wakes an instance,
//! and its slots release the held requests the moment its probe passes.
//!
//! Provider calls are slow (minutes for a real cloud), so each runs in its
//! own task; the instance is marked busy meanwhile and the scaler leaves it
//! alone. Those tasks are held in a [`JoinSet`], and [`FleetController::run`]
//! waits for the ones under way when it stops, so no half-done action
//! outlives the loop that started it. Static backends have no provider: they count as hot capacity while
//! routable and are never touched, except by an operator's drain.
//!
//! A create is made idempotent by its name. An answer can be lost after the
//! cloud rented the instance (a timeout, a reset connection, a crash of
//! Tollgate), and renting again would leave the first instance running,
//! billed and known to nobody. So each create gets a name of its own
//! (`{prefix}-{backend}-{uuid v7}`), recorded durably ([`EventSink::flushed`])
//! before the call; a create without an answer is looked up by that name
//! ([`Provider::find`]) and adopted if it was carried out, and until a
//! lookup has settled it nothing else is rented for the slot. A restart
//! resolves a create the log shows pending the same way.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};
use uuid::Uuid;

use super::policy::{ActionKind, InstanceView, PoolView, Scaler, TierWait};
use super::providers::{HourlyCost, Instance, InstanceStatus, Provider, ProviderError};
use super::state::InstanceState;
use crate::health::{ProbeClient, probe};
use crate::routing::{Backend, BackendId, BackendPool, UpstreamSelector};

/// How often a starting instance that fails its probe is checked with its
/// provider: often enough that one that died is noticed in seconds, rarely
/// enough for a cloud API's rate limits.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Longest prefix and backend name in an instance's name: with the 36
/// characters of the uuid, 64 + 1 + 64 + 1 + 36 fits RunPod's limit of 191.
const NAME_PART_MAX_CHARS: usize = 64;

/// One lifecycle transition, as recorded in `instance_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceEvent {
    pub backend: String,
    /// The provider's id of the instance concerned, when there is one.
    pub instance_id: Option<String>,
    /// The name the instance was created under; set from before the create
    /// call, when its id is not known yet.
    pub instance_name: Option<String>,
    pub from: InstanceState,
    pub to: InstanceState,
    pub reason: String,
    /// What the instance costs per hour in `to`.
    pub hourly_cost: f64,
}

/// Where transitions go. `record` must not block: the gateway queues them
/// for a background writer.
#[async_trait]
pub trait EventSink: Send + Sync {
    fn record(&self, event: InstanceEvent);

    /// Resolves once every event recorded so far is stored for good: the
    /// controller waits for it before a create, so that no instance is
    /// rented whose name a restart could not find in the log. A sink held
    /// in memory is stored as soon as it records.
    async fn flushed(&self) -> Result<(), EventLogClosed> {
        Ok(())
    }
}

/// The event log takes no more events (the gateway is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the instance event log has stopped")]
pub struct EventLogClosed;

/// The admission side: what waits, and how many slots each pool has.
pub trait Demand: Send + Sync {
    /// Per backend pool: its tiers' queues.
    fn demand(&self) -> Vec<(String, Vec<TierWait>)>;
    fn set_capacity(&self, pool: &str, slots: u32);
}

/// Whether a started instance serves yet.
#[async_trait]
pub trait Readiness: Send + Sync {
    async fn ready(&self, backend: &Backend) -> bool;
}

/// Readiness by the backend's own health probe over plain http.
pub struct ProbeReadiness {
    pub client: ProbeClient,
    pub timeout: Duration,
}

#[async_trait]
impl Readiness for ProbeReadiness {
    async fn ready(&self, backend: &Backend) -> bool {
        probe(&self.client, &backend.address, &backend.probe, self.timeout).await
    }
}

/// A backend with a provider.
pub struct Managed {
    pub id: BackendId,
    pub provider: Arc<dyn Provider>,
}

/// An operator's command (`POST /admin/backends/{name}/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Take no new requests; stays rented and pinned until `wake`.
    Drain,
    /// Drain, then stop (→ warm). The scaler may wake it again on demand.
    Sleep,
    /// Back to hot: undrain, resume or rent.
    Wake,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("no backend named {0}")]
    UnknownBackend(String),
    #[error("backend {0} is static: it can be drained and woken, not put to sleep")]
    Static(String),
    #[error("backend {0} is busy with a transition; try again when it is done")]
    Busy(String),
}

/// One backend's lifecycle, for `GET /admin/backends`.
#[derive(Debug, Clone)]
pub struct LifecycleStatus {
    pub id: BackendId,
    /// `static`, `process`, `runpod`.
    pub provider: &'static str,
    pub instance_id: Option<String>,
    pub state: InstanceState,
    pub in_state_for: Duration,
    pub pinned: bool,
    /// Accrued since this Tollgate started (or recovered the instance).
    pub cost_so_far: f64,
    /// The same span, split by state: indexed like [`InstanceState::ALL`].
    pub accrued: [Accrued; InstanceState::ALL.len()],
}

/// Instance time and cost spent in one lifecycle state.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accrued {
    pub seconds: f64,
    pub dollars: f64,
}

/// What the controller reads from and reports to.
pub struct Connections {
    pub demand: Arc<dyn Demand>,
    pub events: Arc<dyn EventSink>,
    pub readiness: Arc<dyn Readiness>,
}

/// Timing of the loop.
#[derive(Debug, Clone, Copy)]
pub struct ControllerTiming {
    /// How often demand is read and capacity synchronised.
    pub interval: Duration,
    /// How often a waking instance is probed, and a draining one checked.
    pub poll: Duration,
    /// Longest a sleep waits for requests in flight before stopping anyway.
    pub drain_timeout: Duration,
}

pub struct FleetController {
    backends: Arc<BackendPool>,
    /// Admission pool of each backend, by id.
    pool_of: Vec<String>,
    /// By id; `None` for static backends.
    slots: Vec<Option<Slot>>,
    scaler: Mutex<Scaler>,
    demand: Arc<dyn Demand>,
    events: Arc<dyn EventSink>,
    readiness: Arc<dyn Readiness>,
    timing: ControllerTiming,
    /// One capacity sync at a time, so an older reading never lands last.
    syncing: Mutex<()>,
    /// Provider actions under way, one task each. std Mutex: held only to
    /// add a task or take the set, never across an await.
    actions: Mutex<JoinSet<()>>,
}

struct Slot {
    provider: Arc<dyn Provider>,
    record: Mutex<Record>,
}

struct Record {
    state: InstanceState,
    since: Instant,
    instance: Option<Instance>,
    /// The name `instance` was created under, or, while `instance` is
    /// `None`, of a create whose outcome is not known yet: it is looked up
    /// before anything else is rented for this slot.
    name: Option<String>,
    /// Recovered at start-up, not yet checked with the provider.
    unverified: bool,
    pinned: bool,
    /// A provider call is under way.
    busy: bool,
    /// Hot but failing its probes since then.
    unhealthy_since: Option<Instant>,
    /// Time and cost of earlier spells, by state (indexed like `ALL`).
    accrued: [Accrued; InstanceState::ALL.len()],
}

impl Record {
    /// What was accrued, the current spell included up to `now`.
    fn accrued(&self, now: Instant, prices: HourlyCost) -> [Accrued; InstanceState::ALL.len()] {
        let mut accrued = self.accrued;
        let seconds = now.duration_since(self.since).as_secs_f64();
        let current = &mut accrued[self.state.index()];
        current.seconds += seconds;
        current.dollars += self.hourly(prices) * seconds / 3600.0;
        accrued
    }

    fn cost_so_far(&self, now: Instant, prices: HourlyCost) -> f64 {
        self.accrued(now, prices).iter().map(|a| a.dollars).sum()
    }

    /// Closes the current spell at `now` (before a transition or a restart
    /// of the same state).
    fn close_spell(&mut self, now: Instant, prices: HourlyCost) {
        self.accrued = self.accrued(now, prices);
        self.since = now;
    }

    /// The price per hour now. A failed instance still rented is billed as
    /// running until it is released.
    fn hourly(&self, prices: HourlyCost) -> f64 {
        let state = self.state;
        if state.bills_running() || (state == InstanceState::Failed && self.instance.is_some()) {
            prices.running
        } else if state.bills_stopped() {
            prices.stopped
        } else {
            0.0
        }
    }
}

impl FleetController {
    /// `pool_of[id]` is each backend's admission pool. Managed backends start
    /// cold (or as recovered); the rest are static.
    pub fn new(
        backends: Arc<BackendPool>,
        pool_of: Vec<String>,
        managed: Vec<Managed>,
        scaler: Scaler,
        timing: ControllerTiming,
        connections: Connections,
    ) -> Arc<Self> {
        let now = Instant::now();
        let mut slots: Vec<Option<Slot>> = (0..backends.len()).map(|_| None).collect();
        for m in managed {
            backends.set_lifecycle(m.id, InstanceState::Cold);
            if let Some(slot) = slots.get_mut(m.id) {
                *slot = Some(Slot {
                    provider: m.provider,
                    record: Mutex::new(Record {
                        state: InstanceState::Cold,
                        since: now,
                        instance: None,
                        name: None,
                        unverified: false,
                        pinned: false,
                        busy: false,
                        unhealthy_since: None,
                        accrued: Default::default(),
                    }),
                });
            }
        }
        let controller = Arc::new(Self {
            backends,
            pool_of,
            slots,
            scaler: Mutex::new(scaler),
            demand: connections.demand,
            events: connections.events,
            readiness: connections.readiness,
            timing,
            syncing: Mutex::new(()),
            actions: Mutex::new(JoinSet::new()),
        });
        controller.sync_capacity();
        controller
    }

    /// Takes back what the event log says this backend held when Tollgate
    /// last stopped: an `instance` (created under `name`), or, with no
    /// instance, a create under `name` whose answer was never recorded.
    /// Until its provider confirms what it is, an instance counts as
    /// starting and a pending create as provisioning: not routable, and not
    /// woken a second time. Instances that end with Tollgate are not adopted.
    pub fn adopt(&self, id: BackendId, instance: Option<Instance>, name: Option<String>) {
        let Some(Some(slot)) = self.slots.get(id) else {
            return;
        };
        if slot.provider.ends_with_gateway() || (instance.is_none() && name.is_none()) {
            return;
        }
        let state = if instance.is_some() {
            InstanceState::Starting
        } else {
            InstanceState::Provisioning
        };
        let mut record = lock(&slot.record);
        // The time until now was spent cold, at no cost.
        record.close_spell(Instant::now(), slot.provider.cost());
        record.state = state;
        record.instance = instance;
        record.name = name;
        record.unverified = true;
        drop(record);
        self.backends.set_lifecycle(id, state);
    }

    /// Runs until `shutdown` resolves, then waits for the provider actions
    /// under way to finish: an instance is never left between two states by
    /// a task nobody waits for. The gateway keeps it running through its
    /// drain (requests held for a wake still need capacity) and calls
    /// [`Self::terminate_local`] last.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        self.recover();
        let mut tick = tokio::time::interval(self.timing.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => self.tick(),
                () = &mut shutdown => break,
            }
        }
        self.finish_actions().await;
    }

    /// Waits until no provider action is under way, those an operator
    /// begins meanwhile included.
    async fn finish_actions(&self) {
        loop {
            let mut actions = std::mem::take(&mut *lock(&self.actions));
            if actions.is_empty() {
                return;
            }
            while let Some(done) = actions.join_next().await {
                report_action(done);
            }
        }
    }

    /// Runs a provider action in a task of its own, held in `actions`.
    fn spawn_action(&self, action: impl Future<Output = ()> + Send + 'static) {
        let mut actions = lock(&self.actions);
        // Finished ones are collected here, so the set holds only the
        // actions under way however long the controller runs.
        while let Some(done) = actions.try_join_next() {
            report_action(done);
        }
        actions.spawn(action);
    }

    /// Whether any backend's instances outlive Tollgate (rented ones), so
    /// the event log must be read before the first decision.
    pub fn adopts_instances(&self) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|slot| !slot.provider.ends_with_gateway())
    }

    /// One round: capacity, then the scaler's actions per pool.
    pub fn tick(self: &Arc<Self>) {
        let now = Instant::now();
        self.fail_unhealthy(now);
        self.sync_capacity();
        for (pool, tiers) in self.demand.demand() {
            let instances = (0..self.slots.len())
                .filter(|&id| self.pool_of.get(id) == Some(&pool))
                .map(|id| self.view(id, now))
                .collect();
            let view = PoolView {
                pool,
                tiers,
                instances,
            };
            let actions = self.scaler().decide(now, &view);
            for action in actions {
                self.begin(action.id, action.kind, action.reason);
            }
        }
    }

    /// An operator's command; the transition runs in the background.
    pub fn command(
        self: &Arc<Self>,
        name: &str,
        command: Command,
    ) -> Result<InstanceState, CommandError> {
        let id = self
            .backend_id(name)
            .ok_or_else(|| CommandError::UnknownBackend(name.to_owned()))?;
        let state = self.state(id);
        let Some(slot) = &self.slots[id] else {
            match command {
                Command::Drain if state == InstanceState::Hot => {
                    self.transition(id, InstanceState::Draining, "operator_drain")
                }
                Command::Wake if state == InstanceState::Draining => {
                    self.transition(id, InstanceState::Hot, "operator_wake")
                }
                Command::Sleep => return Err(CommandError::Static(name.to_owned())),
                _ => {}
            }
            return Ok(self.state(id));
        };
        {
            let mut record = lock(&slot.record);
            // A wake interrupts a sleep still draining: its task sees the
            // state change and stops short of stopping the instance.
            let cancels_drain = command == Command::Wake && state == InstanceState::Draining;
            if record.busy && !cancels_drain {
                return Err(CommandError::Busy(name.to_owned()));
            }
            // Only a drain that happens pins; a sleep or wake hands the
            // instance back to the scaler.
            record.pinned = command == Command::Drain && state == InstanceState::Hot;
            if cancels_drain && record.busy {
                drop(record);
                self.transition(id, InstanceState::Hot, "operator_wake");
                return Ok(self.state(id));
            }
        }
        match command {
            Command::Drain if state == InstanceState::Hot => {
                self.transition(id, InstanceState::Draining, "operator_drain");
            }
            Command::Sleep if matches!(state, InstanceState::Hot | InstanceState::Draining) => {
                self.begin(id, ActionKind::Sleep, "operator_sleep".into());
            }
            Command::Wake => self.begin(id, ActionKind::Wake, "operator_wake".into()),
            _ => {}
        }
        Ok(self.state(id))
    }

    pub fn backend_id(&self, name: &str) -> Option<BackendId> {
        (0..self.backends.len())
            .find(|&id| self.backends.backend(id).is_some_and(|b| b.name == name))
    }

    /// Every backend's lifecycle, in config order.
    pub fn statuses(&self) -> Vec<LifecycleStatus> {
        let now = Instant::now();
        (0..self.slots.len())
            .map(|id| match &self.slots[id] {
                None => LifecycleStatus {
                    id,
                    provider: "static",
                    instance_id: None,
                    state: self.state(id),
                    in_state_for: Duration::ZERO,
                    pinned: false,
                    cost_so_far: 0.0,
                    accrued: Default::default(),
                },
                Some(slot) => {
                    let record = lock(&slot.record);
                    let prices = slot.provider.cost();
                    LifecycleStatus {
                        id,
                        provider: slot.provider.kind(),
                        instance_id: record.instance.as_ref().map(|i| i.id.clone()),
                        state: record.state,
                        in_state_for: now.duration_since(record.since),
                        pinned: record.pinned,
                        cost_so_far: record.cost_so_far(now, prices),
                        accrued: record.accrued(now, prices),
                    }
                }
            })
            .collect()
    }

    /// Sets each admission pool's slots to those of its routable backends.
    pub fn sync_capacity(&self) {
        let _one_at_a_time = lock(&self.syncing);
        let mut pools: Vec<(&str, u32)> = Vec::new();
        for (id, pool) in self.pool_of.iter().enumerate() {
            let slots = if self.backends.routable(id) {
                self.backends.backend(id).map_or(0, |b| b.max_concurrency)
            } else {
                0
            };
            match pools.iter_mut().find(|(name, _)| name == pool) {
                Some((_, total)) => *total = total.saturating_add(slots),
                None => pools.push((pool, slots)),
            }
        }
        for (pool, slots) in pools {
            self.demand.set_capacity(pool, slots);
        }
    }

    fn scaler(&self) -> MutexGuard<'_, Scaler> {
        lock(&self.scaler)
    }

    fn state(&self, id: BackendId) -> InstanceState {
        match &self.slots[id] {
            Some(slot) => lock(&slot.record).state,
            None => self.backends.lifecycle(id).unwrap_or(InstanceState::Failed),
        }
    }

    fn view(&self, id: BackendId, now: Instant) -> InstanceView {
        let last_active = self.backends.last_active(id).unwrap_or(now);
        let in_flight = self.backends.in_flight(id);
        match &self.slots[id] {
            Some(slot) => {
                let record = lock(&slot.record);
                InstanceView {
                    id,
                    state: record.state,
                    since: record.since,
                    last_active,
                    in_flight,
                    managed: true,
                    pinned: record.pinned || record.busy || record.unverified,
                }
            }
            None => InstanceView {
                id,
                // A static backend counts as hot capacity only while it serves.
                state: if self.backends.routable(id) {
                    InstanceState::Hot
                } else {
                    InstanceState::Failed
                },
                since: now,
                last_active,
                in_flight,
                managed: false,
                pinned: true,
            },
        }
    }

    /// A hot instance whose probes have failed for `failed_retry` (it
    /// crashed, or its host went away) is failed: the scaler releases it and
    /// wakes another if needed. Shorter blips only take it out of rotation
    /// until its probes pass again.
    fn fail_unhealthy(&self, now: Instant) {
        let tolerance = self.scaler().policy().failed_retry;
        for id in 0..self.slots.len() {
            let Some(slot) = &self.slots[id] else {
                continue;
            };
            let down_too_long = {
                let mut record = lock(&slot.record);
                if record.state != InstanceState::Hot || record.busy || self.backends.healthy(id) {
                    record.unhealthy_since = None;
                    false
                } else {
                    let since = *record.unhealthy_since.get_or_insert(now);
                    now.duration_since(since) >= tolerance
                }
            };
            if down_too_long {
                self.transition(id, InstanceState::Failed, "unhealthy");
            }
        }
    }

    /// Marks the slot busy and runs the action in its own task.
    fn begin(self: &Arc<Self>, id: BackendId, kind: ActionKind, reason: String) {
        let Some(slot) = &self.slots[id] else {
            return;
        };
        {
            let mut record = lock(&slot.record);
            if record.busy {
                return;
            }
            record.busy = true;
        }
        let this = Arc::clone(self);
        self.spawn_action(async move {
            match kind {
                ActionKind::Wake => this.wake(id, &reason).await,
                ActionKind::Sleep => this.sleep(id, &reason).await,
                ActionKind::Release => this.release(id, &reason).await,
            }
            if let Some(slot) = &this.slots[id] {
                lock(&slot.record).busy = false;
            }
        });
    }

    fn recover(self: &Arc<Self>) {
        for id in 0..self.slots.len() {
            let Some(slot) = &self.slots[id] else {
                continue;
            };
            let unverified = {
                let mut record = lock(&slot.record);
                let unverified = record.unverified && !record.busy;
                record.busy |= unverified;
                unverified
            };
            if !unverified {
                continue;
            }
            let this = Arc::clone(self);
            self.spawn_action(async move {
                this.verify(id).await;
                if let Some(slot) = &this.slots[id] {
                    let mut record = lock(&slot.record);
                    record.busy = false;
                    record.unverified = false;
                }
            });
        }
    }

    /// Asks the provider about an instance recovered from the event log;
    /// a create recovered without its answer is looked up by its name first.
    async fn verify(&self, id: BackendId) {
        let Some((provider, instance)) = self.provider_and_instance(id) else {
            return;
        };
        let instance = match instance {
            Some(instance) => instance,
            None => match self.find_created(id, &provider).await {
                Ok(Some(found)) => {
                    self.set_instance(id, Some(found.clone()));
                    self.transition(id, InstanceState::Starting, "found_by_name");
                    found
                }
                // Never carried out: nothing is rented.
                Ok(None) => {
                    self.transition(id, InstanceState::Cold, "create_not_found");
                    self.set_instance(id, None);
                    return;
                }
                Err(e) => return self.fail(id, "recover", &e),
            },
        };
        match provider.status(&instance).await {
            Ok((InstanceStatus::Running | InstanceStatus::Pending, current)) => {
                self.set_instance(id, Some(current));
                self.await_ready(id, &provider, "recovered").await;
            }
            Ok((InstanceStatus::Stopped, current)) => {
                self.set_instance(id, Some(current));
                self.transition(id, InstanceState::Warm, "recovered");
            }
            Ok((InstanceStatus::Terminated, _)) | Err(ProviderError::NotFound(_)) => {
                self.set_instance(id, None);
                self.transition(id, InstanceState::Cold, "recovered");
            }
            Err(e) => self.fail(id, "recover", &e),
        }
    }

    async fn wake(&self, id: BackendId, reason: &str) {
        let Some((provider, instance)) = self.provider_and_instance(id) else {
            return;
        };
        let (instance, started) = match (self.state(id), instance) {
            (InstanceState::Draining, Some(_)) => {
                return self.transition(id, InstanceState::Hot, reason);
            }
            (InstanceState::Warm, Some(stopped)) => {
                self.transition(id, InstanceState::Starting, reason);
                match provider.start(&stopped).await {
                    Ok(started) => (started, "started"),
                    Err(ProviderError::NoCapacity(why)) => {
                        // The host's GPUs were rented meanwhile: give up the
                        // stopped instance and rent a new one.
                        tracing::warn!(backend = self.name(id), %why, "resume failed for lack of capacity; renting a new instance");
                        // Never rent a second one while the first may still
                        // bill: failed, it is released before the slot is
                        // tried again.
                        match provider.terminate(&stopped).await {
                            Ok(()) | Err(ProviderError::NotFound(_)) => {}
                            Err(e) => return self.fail(id, "release_stopped", &e),
                        }
                        self.set_instance(id, None);
                        match self.rent(id, &provider, "resume_no_capacity").await {
                            Some(rented) => rented,
                            None => return,
                        }
                    }
                    Err(e) => return self.fail(id, "resume", &e),
                }
            }
            (InstanceState::Cold | InstanceState::Failed, leftover) => {
                if let Some(leftover) = leftover {
                    match provider.terminate(&leftover).await {
                        Ok(()) | Err(ProviderError::NotFound(_)) => {}
                        Err(e) => return self.fail(id, "release_leftover", &e),
                    }
                    self.set_instance(id, None);
                }
                match self.rent(id, &provider, reason).await {
                    Some(rented) => rented,
                    None => return,
                }
            }
            _ => return,
        };
        self.set_instance(id, Some(instance));
        self.await_ready(id, &provider, started).await;
    }

    /// Rents an instance for the slot under a name recorded before the call.
    /// A create still pending (its answer never came) is looked up first and
    /// taken if it was carried out; if not, its name is used again. A create
    /// that fails other than for lack of capacity may have been carried out
    /// all the same (only its answer lost), so it is looked up as well.
    /// Answers the instance and the reason its start is recorded with;
    /// `None` once the slot has failed.
    async fn rent(
        &self,
        id: BackendId,
        provider: &Arc<dyn Provider>,
        reason: &str,
    ) -> Option<(Instance, &'static str)> {
        match self.find_created(id, provider).await {
            Ok(Some(found)) => return Some((found, "found_by_name")),
            Ok(None) => {}
            Err(e) => {
                self.fail(id, "find_created", &e);
                return None;
            }
        }
        let name = match self.pending_name(id) {
            Some(name) => name,
            None => self.mint_name(id, provider),
        };
        self.transition(id, InstanceState::Provisioning, reason);
        // The name must be in the log before the cloud can rent under it: a
        // restart finds what was rented only by what the log says.
        if let Err(closed) = self.events.flushed().await {
            self.fail(id, "create", &ProviderError::Other(closed.into()));
            return None;
        }
        let error = match provider.create(&name).await {
            Ok(created) => return Some((created, "started")),
            Err(e @ ProviderError::NoCapacity(_)) => e,
            Err(e) => {
                tracing::warn!(backend = self.name(id), name, error = %e, "create failed; looking its instance up by name in case only the answer was lost");
                // Not found or not known: the name stays, to be looked up
                // again before the next create.
                match self.find_created(id, provider).await {
                    Ok(Some(found)) => return Some((found, "found_by_name")),
                    Ok(None) => e,
                    Err(lookup) => {
                        tracing::warn!(backend = self.name(id), name, error = %lookup, "looking the instance up failed too");
                        e
                    }
                }
            }
        };
        self.fail(id, "create", &error);
        None
    }

    /// The instance the slot's pending create rented, looked up by its name:
    /// `None` when there is no pending create or it was never carried out.
    /// More than one (a create retried while an earlier one was still being
    /// carried out) are cut down to the first; the others are terminated.
    async fn find_created(
        &self,
        id: BackendId,
        provider: &Arc<dyn Provider>,
    ) -> Result<Option<Instance>, ProviderError> {
        let Some(name) = self.pending_name(id) else {
            return Ok(None);
        };
        let mut found = provider.find(&name).await?.into_iter();
        let Some(kept) = found.next() else {
            return Ok(None);
        };
        for extra in found {
            tracing::warn!(
                backend = self.name(id),
                name,
                instance = extra.id,
                "a second instance under one name; terminating it"
            );
            match provider.terminate(&extra).await {
                Ok(()) | Err(ProviderError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        tracing::info!(
            backend = self.name(id),
            name,
            instance = kept.id,
            "found the instance of a create without an answer"
        );
        Ok(Some(kept))
    }

    /// The name of a create whose outcome is not known: one under way, or
    /// one that failed or was cut short without telling what it rented.
    fn pending_name(&self, id: BackendId) -> Option<String> {
        let slot = self.slots.get(id)?.as_ref()?;
        let record = lock(&slot.record);
        if record.instance.is_some() {
            return None;
        }
        record.name.clone()
    }

    /// A name new to this create, `{prefix}-{backend}-{uuid v7}` (time
    /// ordered, so names sort by when they were minted), kept in the record
    /// so that the events from here on carry it.
    fn mint_name(&self, id: BackendId, provider: &Arc<dyn Provider>) -> String {
        let part = |text: &str| text.chars().take(NAME_PART_MAX_CHARS).collect::<String>();
        let name = format!(
            "{}-{}-{}",
            part(provider.name_prefix()),
            part(&self.name(id)),
            Uuid::now_v7()
        );
        if let Some(Some(slot)) = self.slots.get(id) {
            lock(&slot.record).name = Some(name.clone());
        }
        name
    }

    /// Starting until the instance has an address and passes its probe,
    /// then hot. Failed after `start_timeout`, or as soon as the provider
    /// reports it stopped or gone (asked every [`STATUS_EVERY`] while the
    /// probe fails, and on every poll until the address is known).
    async fn await_ready(&self, id: BackendId, provider: &Arc<dyn Provider>, reason: &str) {
        self.transition(id, InstanceState::Starting, reason);
        let deadline = Instant::now() + self.scaler().policy().start_timeout;
        let mut next_status = Instant::now();
        loop {
            let Some((_, Some(instance))) = self.provider_and_instance(id) else {
                return;
            };
            if let Some(address) = &instance.address {
                self.backends.set_address(id, address);
                if let Some(backend) = self.backends.backend(id)
                    && self.readiness.ready(&backend).await
                {
                    return self.transition(id, InstanceState::Hot, "ready");
                }
            }
            if instance.address.is_none() || Instant::now() >= next_status {
                next_status = Instant::now() + STATUS_EVERY;
                match provider.status(&instance).await {
                    Ok((InstanceStatus::Running | InstanceStatus::Pending, current)) => {
                        self.set_instance(id, Some(current));
                    }
                    Ok((InstanceStatus::Stopped | InstanceStatus::Terminated, _))
                    | Err(ProviderError::NotFound(_)) => {
                        let error = ProviderError::Other(anyhow::anyhow!(
                            "the instance stopped or went away while starting"
                        ));
                        return self.fail(id, "start", &error);
                    }
                    // The provider's API may be having a moment: the deadline bounds it.
                    Err(_) => {}
                }
            }
            if self.state(id) != InstanceState::Starting {
                return;
            }
            if Instant::now() >= deadline {
                let error = ProviderError::Other(anyhow::anyhow!("not ready within start_timeout"));
                return self.fail(id, "start", &error);
            }
            sleep(self.timing.poll).await;
        }
    }

    async fn sleep(&self, id: BackendId, reason: &str) {
        let Some((provider, instance)) = self.provider_and_instance(id) else {
            return;
        };
        if !matches!(self.state(id), InstanceState::Hot | InstanceState::Draining) {
            return;
        }
        self.transition(id, InstanceState::Draining, reason);
        let deadline = Instant::now() + self.timing.drain_timeout;
        while self.backends.in_flight(id) > 0 && Instant::now() < deadline {
            sleep(self.timing.poll).await;
            if self.state(id) != InstanceState::Draining {
                return; // woken meanwhile
            }
        }
        if self.state(id) != InstanceState::Draining {
            return;
        }
        let Some(instance) = instance else {
            return self.transition(id, InstanceState::Cold, reason);
        };
        match provider.stop(&instance).await {
            Ok(()) => self.transition(id, InstanceState::Warm, "stopped"),
            Err(e) => self.fail(id, "stop", &e),
        }
    }

    async fn release(&self, id: BackendId, reason: &str) {
        let Some((provider, instance)) = self.provider_and_instance(id) else {
            return;
        };
        // What a create without an answer rented is let go too.
        let instance = match instance {
            Some(instance) => Some(instance),
            None => match self.find_created(id, &provider).await {
                Ok(found) => {
                    if found.is_some() {
                        self.set_instance(id, found.clone());
                    }
                    found
                }
                Err(e) => return self.fail(id, "find_created", &e),
            },
        };
        if let Some(instance) = instance {
            match provider.terminate(&instance).await {
                Ok(()) | Err(ProviderError::NotFound(_)) => {}
                Err(e) => return self.fail(id, "terminate", &e),
            }
        }
        self.transition(id, InstanceState::Cold, reason);
        self.set_instance(id, None);
    }

    fn fail(&self, id: BackendId, operation: &str, error: &ProviderError) {
        tracing::warn!(backend = self.name(id), operation, %error, "instance failed");
        if let Some(Some(slot)) = self.slots.get(id) {
            let mut record = lock(&slot.record);
            if record.state == InstanceState::Failed {
                // A retry failed again: the next waits a whole `failed_retry`.
                record.close_spell(Instant::now(), slot.provider.cost());
                return;
            }
        }
        self.transition(id, InstanceState::Failed, &format!("{operation}_failed"));
    }

    /// Terminates the instances that cannot outlive Tollgate (local
    /// processes), before the process exits.
    pub async fn terminate_local(&self) {
        for id in 0..self.slots.len() {
            if let Some((provider, Some(instance))) = self.provider_and_instance(id)
                && provider.ends_with_gateway()
            {
                let _ = provider.terminate(&instance).await;
                self.transition(id, InstanceState::Cold, "shutdown");
            }
        }
    }

    fn provider_and_instance(
        &self,
        id: BackendId,
    ) -> Option<(Arc<dyn Provider>, Option<Instance>)> {
        let slot = self.slots.get(id)?.as_ref()?;
        let instance = lock(&slot.record).instance.clone();
        Some((Arc::clone(&slot.provider), instance))
    }

    /// `None` lets go of the name too: nothing is held or pending.
    fn set_instance(&self, id: BackendId, instance: Option<Instance>) {
        if let Some(Some(slot)) = self.slots.get(id) {
            let mut record = lock(&slot.record);
            // A failed state's price depends on whether an instance is held:
            // the spell so far is priced as it was.
            record.close_spell(Instant::now(), slot.provider.cost());
            if instance.is_none() {
                record.name = None;
            }
            record.instance = instance;
        }
    }

    fn name(&self, id: BackendId) -> String {
        self.backends
            .backend(id)
            .map(|b| b.name.clone())
            .unwrap_or_default()
    }

    /// Records a transition everywhere it matters: the record, the pool
    /// (routing), the event sink, the log, and the admission capacity.
    fn transition(&self, id: BackendId, to: InstanceState, reason: &str) {
        let now = Instant::now();
        let (from, instance_id, instance_name, hourly_cost) = match &self.slots[id] {
            Some(slot) => {
                let prices = slot.provider.cost();
                let mut record = lock(&slot.record);
                let from = record.state;
                if from == to {
                    return;
                }
                record.close_spell(now, prices);
                record.state = to;
                let instance_id = record.instance.as_ref().map(|i| i.id.clone());
                (
                    from,
                    instance_id,
                    record.name.clone(),
                    record.hourly(prices),
                )
            }
            None => (self.state(id), None, None, 0.0),
        };
        if from == to {
            return;
        }
        self.backends.set_lifecycle(id, to);
        let backend = self.name(id);
        tracing::info!(backend, %from, %to, reason, "instance");
        self.events.record(InstanceEvent {
            backend,
            instance_id,
            instance_name,
            from,
            to,
            reason: reason.to_owned(),
            hourly_cost,
        });
        self.sync_capacity();
    }
}

/// An action's task ended: only a panic is worth a word (the action logs
/// its own failures); the slot it held stays busy, so the scaler leaves it.
fn report_action(done: Result<(), tokio::task::JoinError>) {
    if let Err(error) = done
        && error.is_panic()
    {
        tracing::error!(%error, "a fleet action panicked");
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Records are plain values updated in single steps: a panic while holding
    // the lock cannot leave them half-written.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
