//! GPU-hours and cost by lifecycle state, from the controller's transitions
//! on tokio's clock: the simulation's counterpart of the cost query over
//! `instance_events` in docs/fleet.md.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use tokio::time::Instant;
use tollgate_backends::fleet::controller::{EventSink, InstanceEvent};
use tollgate_backends::fleet::state::InstanceState;

/// Hours or money per lifecycle state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ByState {
    pub provisioning: f64,
    pub starting: f64,
    pub hot: f64,
    pub draining: f64,
    pub warm: f64,
    pub failed: f64,
}

impl ByState {
    fn add(&mut self, state: InstanceState, value: f64) {
        match state {
            InstanceState::Provisioning => self.provisioning += value,
            InstanceState::Starting => self.starting += value,
            InstanceState::Hot => self.hot += value,
            InstanceState::Draining => self.draining += value,
            InstanceState::Warm => self.warm += value,
            InstanceState::Failed => self.failed += value,
            InstanceState::Cold => {}
        }
    }

    pub fn total(&self) -> f64 {
        self.provisioning + self.starting + self.hot + self.draining + self.warm + self.failed
    }

    /// The states billed at the running price (a failed instance's price
    /// is whatever its transition said).
    pub fn running(&self) -> f64 {
        self.provisioning + self.starting + self.hot + self.draining
    }
}

/// Instances per state at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    pub hot: u32,
    /// Provisioning or starting.
    pub waking: u32,
    pub warm: u32,
    pub draining: u32,
}

/// What the ledger adds up to at the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub hours: f64,
    pub gpu_hours: ByState,
    pub cost: ByState,
    /// Most instances hot at the same time (static backends included).
    pub max_hot: u32,
    pub transitions: u64,
}

impl Totals {
    pub fn total_cost(&self) -> f64 {
        self.cost.total()
    }
}

/// Accumulates each instance's time in its states. An instance it has not
/// heard of is cold (free) since the start.
pub struct Ledger {
    // std Mutex: updated in a few arithmetic steps, never across an await.
    book: Mutex<Book>,
}

struct Book {
    start: Instant,
    instances: HashMap<String, Entry>,
    gpu_hours: ByState,
    cost: ByState,
    census: Census,
    max_hot: u32,
    transitions: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    state: InstanceState,
    since: Instant,
    /// In `state`.
    hourly_cost: f64,
}

impl Ledger {
    /// `always_hot`: static backends with their running price; hot for the
    /// whole run, they never transition.
    pub fn new(always_hot: &[(String, f64)]) -> Self {
        let start = Instant::now();
        let mut book = Book {
            start,
            instances: HashMap::new(),
            gpu_hours: ByState::default(),
            cost: ByState::default(),
            census: Census::default(),
            max_hot: 0,
            transitions: 0,
        };
        for (name, hourly_cost) in always_hot {
            book.instances.insert(
                name.clone(),
                Entry {
                    state: InstanceState::Hot,
                    since: start,
                    hourly_cost: *hourly_cost,
                },
            );
            book.count(InstanceState::Hot, 1);
        }
        Self {
            book: Mutex::new(book),
        }
    }

    pub fn census(&self) -> Census {
        self.book().census
    }

    /// Starts counting afresh at `now` from the instances' current states:
    /// what the fleet spent getting to its floor before the workload began
    /// is not the workload's.
    pub fn restart(&self, now: Instant) {
        let mut book = self.book();
        book.start = now;
        for entry in book.instances.values_mut() {
            entry.since = now;
        }
        book.gpu_hours = ByState::default();
        book.cost = ByState::default();
        book.max_hot = book.census.hot;
        book.transitions = 0;
    }

    /// Closes every instance's current state at `now`.
    pub fn totals(&self, now: Instant) -> Totals {
        let book = self.book();
        let mut gpu_hours = book.gpu_hours;
        let mut cost = book.cost;
        for entry in book.instances.values() {
            let hours = hours_between(entry.since, now);
            gpu_hours.add(entry.state, hours);
            cost.add(entry.state, hours * entry.hourly_cost);
        }
        Totals {
            hours: hours_between(book.start, now),
            gpu_hours,
            cost,
            max_hot: book.max_hot,
            transitions: book.transitions,
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // Each update is a few additions: a panic cannot leave it half done
        // in a way that matters more than losing the run.
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Book {
    fn count(&mut self, state: InstanceState, delta: i32) {
        let slot = match state {
            InstanceState::Hot => &mut self.census.hot,
            InstanceState::Provisioning | InstanceState::Starting => &mut self.census.waking,
            InstanceState::Warm => &mut self.census.warm,
            InstanceState::Draining => &mut self.census.draining,
            InstanceState::Cold | InstanceState::Failed => return,
        };
        *slot = slot.saturating_add_signed(delta);
        self.max_hot = self.max_hot.max(self.census.hot);
    }
}

fn hours_between(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() / 3600.0
}

impl EventSink for Ledger {
    fn record(&self, event: InstanceEvent) {
        let now = Instant::now();
        let mut book = self.book();
        let start = book.start;
        let entry = book.instances.entry(event.backend).or_insert(Entry {
            state: InstanceState::Cold,
            since: start,
            hourly_cost: 0.0,
        });
        let before = *entry;
        *entry = Entry {
            state: event.to,
            since: now,
            hourly_cost: event.hourly_cost,
        };
        let hours = hours_between(before.since, now);
        book.gpu_hours.add(before.state, hours);
        book.cost.add(before.state, hours * before.hourly_cost);
        book.count(before.state, -1);
        book.count(event.to, 1);
        book.transitions += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::{Cold, Draining, Hot, Provisioning, Starting, Warm};
    use std::time::Duration;

    fn event(backend: &str, from: InstanceState, to: InstanceState, cost: f64) -> InstanceEvent {
        InstanceEvent {
            backend: backend.into(),
            instance_id: None,
            instance_name: None,
            from,
            to,
            reason: "test".into(),
            hourly_cost: cost,
        }
    }

    async fn hours(h: f64) {
        tokio::time::advance(Duration::from_secs_f64(h * 3600.0)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn hours_and_cost_add_up_per_state() {
        let ledger = Ledger::new(&[("static".into(), 1.0)]);
        hours(1.0).await; // gpu-a cold: free
        ledger.record(event("gpu-a", Cold, Provisioning, 2.0));
        hours(0.5).await;
        ledger.record(event("gpu-a", Provisioning, Starting, 2.0));
        hours(0.25).await;
        ledger.record(event("gpu-a", Starting, Hot, 2.0));
        assert_eq!(ledger.census().hot, 2);
        hours(4.0).await;
        ledger.record(event("gpu-a", Hot, Draining, 2.0));
        hours(0.25).await;
        ledger.record(event("gpu-a", Draining, Warm, 0.1));
        assert_eq!(
            ledger.census(),
            Census {
                hot: 1,
                waking: 0,
                warm: 1,
                draining: 0
            }
        );
        hours(10.0).await;
        let t = ledger.totals(tokio::time::Instant::now());
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(t.hours, 16.0));
        assert!(close(t.gpu_hours.provisioning, 0.5));
        assert!(close(t.gpu_hours.starting, 0.25));
        assert!(
            close(t.gpu_hours.hot, 4.0 + 16.0),
            "gpu-a and the static one"
        );
        assert!(close(t.gpu_hours.draining, 0.25));
        assert!(close(t.gpu_hours.warm, 10.0));
        assert!(close(t.gpu_hours.running(), 21.0));
        // gpu-a: 5 running hours at 2.0, 10 warm at 0.1; the static one 16 at 1.0.
        assert!(
            close(t.total_cost(), 10.0 + 1.0 + 16.0),
            "{}",
            t.total_cost()
        );
        assert_eq!(t.max_hot, 2);
        assert_eq!(t.transitions, 5);

        ledger.restart(tokio::time::Instant::now());
        hours(2.0).await;
        let t = ledger.totals(tokio::time::Instant::now());
        assert!(close(t.hours, 2.0) && close(t.gpu_hours.warm, 2.0));
        assert!(close(t.total_cost(), 2.0 * 0.1 + 2.0 * 1.0));
        assert_eq!((t.max_hot, t.transitions), (1, 0));
    }
}
