//! The gateway's side of the GPU fleet: providers built from the config, the
//! controller run as a background service, its transitions written to
//! Postgres (`instance_events`) off the request path (a create waits until
//! the name it rents under is written), the instances the log says were
//! rented, and the creates it shows without an answer, adopted again at
//! start-up, and the fleet's Prometheus metrics (state, health, breaker,
//! load, GPU utilisation, instance time and cost per backend).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, CounterVec, GaugeVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{mpsc, oneshot};
use tollgate_backends::fleet::controller::{
    Connections, EventLogClosed, EventSink, FleetController, InstanceEvent, Managed, ProbeReadiness,
};
use tollgate_backends::fleet::policy::Scaler;
use tollgate_backends::fleet::providers::process::ProcessProvider;
use tollgate_backends::fleet::providers::runpod::RunPod;
use tollgate_backends::fleet::providers::{HourlyCost, Instance, Provider};
use tollgate_backends::fleet::state::InstanceState;
use tollgate_backends::health::ProbeClient;
use tollgate_backends::routing::{BackendPool, UpstreamSelector};
use tollgate_metering::metric_names;

use crate::admission::AdmissionQueues;
use crate::config::{Config, ProviderConfig};
use crate::store_errors::{self, PostgresOperation};

/// How long the fleet waits before asking Postgres again after it failed.
const POSTGRES_RETRY: Duration = Duration::from_secs(1);

/// The provider of a backend, `None` for a static one. A managed backend's
/// address is learnt when its instance starts.
pub fn provider(
    name: &str,
    config: &ProviderConfig,
    cost: HourlyCost,
) -> anyhow::Result<Option<Arc<dyn Provider>>> {
    Ok(match config {
        ProviderConfig::Static => None,
        ProviderConfig::Process { command } => {
            Some(Arc::new(ProcessProvider::new(name, command, cost)?))
        }
        ProviderConfig::RunPod(runpod) => {
            Some(Arc::new(RunPod::new(runpod.as_ref().clone(), cost)?))
        }
    })
}

/// The controller for `backends`, whose managed members are `managed`. Its
/// metrics ([`FleetCollector`]) are registered on the default registry.
pub fn controller(
    config: &Config,
    backends: Arc<BackendPool>,
    managed: Vec<Managed>,
    queues: Arc<AdmissionQueues>,
    events: Arc<EventLog>,
) -> Arc<FleetController> {
    let controller = FleetController::new(
        Arc::clone(&backends),
        config.backends.iter().map(|b| b.pool.clone()).collect(),
        managed,
        Scaler::new(config.fleet.policy.clone()),
        config.fleet.timing,
        Connections {
            demand: queues,
            events,
            readiness: Arc::new(ProbeReadiness {
                client: ProbeClient::new(),
                timeout: config.health.timeout,
            }),
        },
    );
    if let Err(e) = register_metrics(
        backends,
        Arc::clone(&controller),
        prometheus::default_registry(),
    ) {
        // Only a second registration can fail; the fleet runs without metrics.
        tracing::error!(error = %e, "fleet metrics not registered");
    }
    controller
}

/// Publishes each backend's lifecycle state, probe verdict, breaker, load,
/// GPU utilisation, instance time and cost at scrape time, as the admission
/// queues' collector does: the controller and the prober update nothing for
/// metrics.
pub struct FleetCollector {
    backends: Arc<BackendPool>,
    controller: Arc<FleetController>,
    /// One scrape at a time: the time and cost counters catch up by difference.
    scraping: Mutex<()>,
    state: IntGaugeVec,
    up: IntGaugeVec,
    breaker: IntGaugeVec,
    in_flight: IntGaugeVec,
    load: GaugeVec,
    gpu_utilization: GaugeVec,
    instance_seconds: CounterVec,
    cost: CounterVec,
}

/// The breaker's states, as `BackendStatus::breaker` names them.
const BREAKER_STATES: [&str; 3] = ["closed", "open", "half_open"];

impl FleetCollector {
    pub fn new(
        backends: Arc<BackendPool>,
        controller: Arc<FleetController>,
    ) -> prometheus::Result<Self> {
        let backend_state = &["backend", "state"];
        Ok(Self {
            backends,
            controller,
            scraping: Mutex::new(()),
            state: IntGaugeVec::new(
                Opts::new(
                    metric_names::BACKEND_STATE,
                    "Lifecycle state of the backend's instance: 1 for the current state, 0 for the others.",
                ),
                backend_state,
            )?,
            up: IntGaugeVec::new(
                Opts::new(
                    metric_names::BACKEND_UP,
                    "Whether the backend passes its active health probes (1) or not (0).",
                ),
                &["backend"],
            )?,
            breaker: IntGaugeVec::new(
                Opts::new(
                    metric_names::BACKEND_BREAKER_STATE,
                    "The backend's circuit breaker: 1 for its current state (closed, open, half_open), 0 for the others.",
                ),
                backend_state,
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new(
                    metric_names::BACKEND_IN_FLIGHT,
                    "Requests Tollgate has outstanding on the backend.",
                ),
                &["backend"],
            )?,
            load: GaugeVec::new(
                Opts::new(
                    metric_names::BACKEND_LOAD,
                    "The backend's own load signals from its metrics endpoint: waiting and running \
                     requests, kv_cache_usage (0-1), pending (Triton); only those it reports.",
                ),
                &["backend", "signal"],
            )?,
            gpu_utilization: GaugeVec::new(
                Opts::new(
                    metric_names::BACKEND_GPU_UTILIZATION,
                    "GPU utilisation (0-1) the backend reports (`nv_gpu_utilization`, averaged over its GPUs); \
                     absent for backends that do not export it.",
                ),
                &["backend"],
            )?,
            instance_seconds: CounterVec::new(
                Opts::new(
                    metric_names::GPU_INSTANCE_SECONDS_TOTAL,
                    "Time the backend's managed instance has spent in each lifecycle state since this Tollgate started.",
                ),
                backend_state,
            )?,
            cost: CounterVec::new(
                Opts::new(
                    metric_names::GPU_COST_DOLLARS_TOTAL,
                    "What the backend's managed instance has cost in each lifecycle state (USD at its configured \
                     hourly prices) since this Tollgate started.",
                ),
                backend_state,
            )?,
        })
    }

    fn parts(&self) -> [&dyn Collector; 8] {
        [
            &self.state,
            &self.up,
            &self.breaker,
            &self.in_flight,
            &self.load,
            &self.gpu_utilization,
            &self.instance_seconds,
            &self.cost,
        ]
    }
}

/// Sets `gauge` to `reading`, or removes its series when there is none: no
/// reading (yet, or any more) is no series, not a stale one.
fn set_or_remove(gauge: &GaugeVec, labels: &[&str], reading: Option<f64>) {
    match reading {
        Some(value) => gauge.with_label_values(labels).set(value),
        None => {
            let _ = gauge.remove_label_values(labels);
        }
    }
}

/// Brings a counter up to `total`, a figure that only grows.
fn catch_up(counter: &Counter, total: f64) {
    let behind = total - counter.get();
    if behind > 0.0 {
        counter.inc_by(behind);
    }
}

impl Collector for FleetCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.parts().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.scraping.lock().unwrap_or_else(PoisonError::into_inner);
        // Both lists are in config order, one entry per backend.
        for (backend, life) in self
            .backends
            .statuses()
            .into_iter()
            .zip(self.controller.statuses())
        {
            let name = backend.name.as_str();
            for state in InstanceState::ALL {
                let labels = [name, state.as_str()];
                self.state
                    .with_label_values(&labels)
                    .set(i64::from(state == life.state));
                // A static backend is not rented: it has no instance time
                // or cost to count (an always-on baseline would count it twice).
                if life.provider == "static" {
                    continue;
                }
                // Created at 0 so that `increase` sees the first second and dollar.
                let accrued = life.accrued[state.index()];
                catch_up(
                    &self.instance_seconds.with_label_values(&labels),
                    accrued.seconds,
                );
                catch_up(&self.cost.with_label_values(&labels), accrued.dollars);
            }
            self.up
                .with_label_values(&[name])
                .set(i64::from(backend.healthy));
            for state in BREAKER_STATES {
                self.breaker
                    .with_label_values(&[name, state])
                    .set(i64::from(state == backend.breaker));
            }
            self.in_flight
                .with_label_values(&[name])
                .set(i64::from(backend.in_flight));
            let signals = backend.signals.unwrap_or_default();
            for (signal, reading) in [
                ("waiting", signals.waiting),
                ("running", signals.running),
                ("kv_cache_usage", signals.kv_cache_usage),
                ("pending", signals.pending),
            ] {
                set_or_remove(&self.load, &[name, signal], reading);
            }
            set_or_remove(&self.gpu_utilization, &[name], signals.gpu_utilization);
        }
        self.parts().into_iter().flat_map(|c| c.collect()).collect()
    }
}

/// Registers a [`FleetCollector`] on `registry`.
pub fn register_metrics(
    backends: Arc<BackendPool>,
    controller: Arc<FleetController>,
    registry: &Registry,
) -> prometheus::Result<()> {
    registry.register(Box::new(FleetCollector::new(backends, controller)?))
}

/// What goes to the writer, in order.
enum Entry {
    /// A transition, stamped when it was recorded.
    Event(SystemTime, InstanceEvent),
    /// Answered once every entry before it is written.
    Flush(oneshot::Sender<()>),
}

/// Transitions on their way to Postgres: `record` never blocks.
pub struct EventLog(mpsc::UnboundedSender<Entry>);

impl EventLog {
    pub fn new() -> (Arc<Self>, EventWriter) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (
            Arc::new(Self(sender)),
            EventWriter(tokio::sync::Mutex::new(Some(receiver))),
        )
    }
}

#[async_trait]
impl EventSink for EventLog {
    fn record(&self, event: InstanceEvent) {
        // Stamped here: the writer may be retrying a Postgres outage.
        if self.0.send(Entry::Event(SystemTime::now(), event)).is_err() {
            tracing::error!("instance event writer has stopped; transition not recorded");
        }
    }

    /// Waits as long as Postgres is out: a create must not go ahead
    /// before its name is written.
    async fn flushed(&self) -> Result<(), EventLogClosed> {
        let (written, done) = oneshot::channel();
        self.0
            .send(Entry::Flush(written))
            .map_err(|_| EventLogClosed)?;
        done.await.map_err(|_| EventLogClosed)
    }
}

/// Writes transitions in order, holding them through a Postgres outage
/// (there are a handful an hour, so memory is no concern).
pub struct EventWriter(tokio::sync::Mutex<Option<mpsc::UnboundedReceiver<Entry>>>);

impl EventWriter {
    pub async fn run(&self, pool: &Pool) {
        let Some(mut receiver) = self.0.lock().await.take() else {
            return;
        };
        let mut pending: VecDeque<Entry> = VecDeque::new();
        loop {
            if pending.is_empty() {
                match receiver.recv().await {
                    Some(entry) => pending.push_back(entry),
                    None => return,
                }
            }
            while let Ok(entry) = receiver.try_recv() {
                pending.push_back(entry);
            }
            while let Some(entry) = pending.front() {
                if let Entry::Event(at, event) = entry
                    && let Err(e) = insert(pool, *at, event).await
                {
                    store_errors::postgres(PostgresOperation::InstanceEvents);
                    tracing::warn!(error = %e, pending = pending.len(), "instance events not written yet; retrying");
                    tokio::time::sleep(POSTGRES_RETRY).await;
                    break;
                }
                if let Some(Entry::Flush(written)) = pending.pop_front() {
                    // The waiter may have given up; nothing to tell then.
                    let _ = written.send(());
                }
            }
        }
    }
}

async fn insert(pool: &Pool, at: SystemTime, event: &InstanceEvent) -> anyhow::Result<()> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO instance_events \
             (at, backend, instance_id, instance_name, from_state, to_state, reason, hourly_cost) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &at,
                &event.backend,
                &event.instance_id,
                &event.instance_name,
                &event.from.as_str(),
                &event.to.as_str(),
                &event.reason,
                &event.hourly_cost,
            ],
        )
        .await?;
    Ok(())
}

/// What a backend's last recorded transition says it held.
struct Held {
    backend: String,
    /// The instance rented, when its id is known.
    instance: Option<Instance>,
    /// The name it was created under; with no instance, that of a create
    /// whose answer was never recorded.
    name: Option<String>,
}

/// What each backend held at its last recorded transition, if that left
/// something rented, or maybe rented (anything but cold, with an instance
/// id or a name).
async fn last_held(pool: &Pool) -> anyhow::Result<Vec<Held>> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT DISTINCT ON (backend) backend, instance_id, instance_name, to_state \
             FROM instance_events ORDER BY backend, at DESC, id DESC",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter(|row| row.get::<_, &str>(3) != "cold")
        .map(|row| Held {
            backend: row.get(0),
            instance: row
                .get::<_, Option<String>>(1)
                .map(|id| Instance { id, address: None }),
            name: row.get(2),
        })
        .filter(|held| held.instance.is_some() || held.name.is_some())
        .collect())
}

/// Runs the controller and the event writer; on start-up adopts the
/// instances the log says are rented.
pub struct FleetService {
    pub controller: Arc<FleetController>,
    pub events: EventWriter,
    pub pool: Pool,
}

#[async_trait]
impl BackgroundService for FleetService {
    /// Runs for the life of the process, through the SIGTERM drain: requests
    /// held for a wake still need capacity then. The drainer terminates local
    /// instances last, just before exit.
    async fn start(&self, _shutdown: ShutdownWatch) {
        if self.controller.adopts_instances() {
            self.adopt_rented().await;
        }
        let controller = Arc::clone(&self.controller);
        tokio::join!(
            controller.run(std::future::pending()),
            self.events.run(&self.pool)
        );
    }
}

impl FleetService {
    /// Adopts the instances the event log says are rented, and the creates
    /// it shows without an answer (the controller looks them up by name).
    /// Until the log has been read no decision is made (requests for
    /// scaled-to-zero pools wait meanwhile): deciding without it would rent
    /// again what is already rented and forget the rest.
    async fn adopt_rented(&self) {
        let held = loop {
            match last_held(&self.pool).await {
                Ok(held) => break held,
                Err(e) => {
                    store_errors::postgres(PostgresOperation::FleetRecovery);
                    tracing::warn!(error = %e, "cannot read instance_events yet; the fleet waits for it");
                    tokio::time::sleep(POSTGRES_RETRY).await;
                }
            }
        };
        for held in held {
            if let Some(id) = self.controller.backend_id(&held.backend) {
                tracing::info!(
                    backend = held.backend,
                    instance = held.instance.as_ref().map(|i| i.id.as_str()),
                    name = held.name,
                    "adopting the instance recorded as rented (or its create)"
                );
                self.controller.adopt(id, held.instance, held.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::proto::MetricType;
    use tollgate_backends::balance::breaker::BreakerConfig;
    use tollgate_backends::balance::round_robin::RoundRobin;
    use tollgate_backends::fleet::controller::{
        ControllerTiming, Demand, InstanceEvent, Readiness,
    };
    use tollgate_backends::fleet::policy::{FleetPolicy, TierWait};
    use tollgate_backends::fleet::providers::{InstanceStatus, ProviderError};
    use tollgate_backends::health::Probe;
    use tollgate_backends::protocol::Protocol;
    use tollgate_backends::routing::Backend;

    use super::*;

    /// A cloud at $3.60 an hour running, 36 cents stopped; never called here.
    struct Priced;

    #[async_trait]
    impl Provider for Priced {
        fn kind(&self) -> &'static str {
            "priced"
        }
        async fn create(&self, _: &str) -> Result<Instance, ProviderError> {
            Err(ProviderError::NoCapacity("test".into()))
        }
        async fn find(&self, _: &str) -> Result<Vec<Instance>, ProviderError> {
            Ok(Vec::new())
        }
        async fn start(&self, _: &Instance) -> Result<Instance, ProviderError> {
            Err(ProviderError::NoCapacity("test".into()))
        }
        async fn stop(&self, _: &Instance) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn terminate(&self, _: &Instance) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn status(
            &self,
            instance: &Instance,
        ) -> Result<(InstanceStatus, Instance), ProviderError> {
            Ok((InstanceStatus::Running, instance.clone()))
        }
        fn cost(&self) -> HourlyCost {
            HourlyCost {
                running: 3.6,
                stopped: 0.36,
            }
        }
    }

    struct NoDemand;

    impl Demand for NoDemand {
        fn demand(&self) -> Vec<(String, Vec<TierWait>)> {
            Vec::new()
        }
        fn set_capacity(&self, _: &str, _: u32) {}
    }

    struct Discard;

    impl EventSink for Discard {
        fn record(&self, _: InstanceEvent) {}
    }

    struct NeverReady;

    #[async_trait]
    impl Readiness for NeverReady {
        async fn ready(&self, _: &Backend) -> bool {
            false
        }
    }

    fn backend(name: &str) -> Backend {
        Backend {
            name: name.into(),
            address: "127.0.0.1:9".into(),
            host: name.into(),
            tls: false,
            models: vec!["m".into()],
            max_concurrency: 4,
            credential: None,
            probe: Probe::openai(),
            protocol: Protocol::OpenAi,
        }
    }

    /// The value of `name`'s series whose labels include all of `labels`.
    fn value(families: &[MetricFamily], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = families.iter().find(|f| f.name() == name)?;
        let metric = family.get_metric().iter().find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })?;
        Some(match family.get_field_type() {
            MetricType::COUNTER => metric.get_counter().get_value(),
            _ => metric.get_gauge().get_value(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_state_health_and_cost_per_backend() {
        let backends = Arc::new(BackendPool::new(
            vec![backend("static-1"), backend("gpu-1")],
            Box::new(RoundRobin::default()),
            BreakerConfig {
                failure_threshold: 5,
                open_for: Duration::from_secs(5),
            },
        ));
        let controller = FleetController::new(
            Arc::clone(&backends),
            vec!["p".into(), "p".into()],
            vec![Managed {
                id: 1,
                provider: Arc::new(Priced),
            }],
            Scaler::new(FleetPolicy::default()),
            ControllerTiming {
                interval: Duration::from_secs(1),
                poll: Duration::from_secs(1),
                drain_timeout: Duration::from_secs(1),
            },
            Connections {
                demand: Arc::new(NoDemand),
                events: Arc::new(Discard),
                readiness: Arc::new(NeverReady),
            },
        );
        let registry = Registry::new();
        register_metrics(backends, Arc::clone(&controller), &registry).unwrap();

        // Cold: every series exists, the cost counter at 0.
        let families = registry.gather();
        let state = |families: &[MetricFamily], backend: &str, state: &str| {
            value(
                families,
                metric_names::BACKEND_STATE,
                &[("backend", backend), ("state", state)],
            )
        };
        assert_eq!(state(&families, "static-1", "hot"), Some(1.0));
        assert_eq!(state(&families, "static-1", "cold"), Some(0.0));
        assert_eq!(state(&families, "gpu-1", "cold"), Some(1.0));
        assert_eq!(state(&families, "gpu-1", "hot"), Some(0.0));
        let cost = |families: &[MetricFamily]| {
            value(
                families,
                metric_names::GPU_COST_DOLLARS_TOTAL,
                &[("backend", "gpu-1"), ("state", "starting")],
            )
        };
        assert_eq!(cost(&families), Some(0.0));
        assert_eq!(
            value(
                &families,
                metric_names::GPU_COST_DOLLARS_TOTAL,
                &[("backend", "static-1"), ("state", "hot")]
            ),
            None,
            "a static backend is not rented"
        );
        assert_eq!(
            value(
                &families,
                metric_names::BACKEND_UP,
                &[("backend", "static-1")]
            ),
            Some(1.0)
        );
        // No load signals scraped: no utilisation series rather than a 0.
        assert_eq!(
            value(
                &families,
                metric_names::BACKEND_GPU_UTILIZATION,
                &[("backend", "static-1")]
            ),
            None
        );

        // Ten minutes cold, scraped: that time stays cold after the adoption.
        tokio::time::advance(Duration::from_secs(600)).await;
        registry.gather();
        // An adopted instance bills at the running price while it starts.
        controller.adopt(
            1,
            Some(Instance {
                id: "i-1".into(),
                address: None,
            }),
            None,
        );
        tokio::time::advance(Duration::from_secs(3600)).await;
        let families = registry.gather();
        assert_eq!(state(&families, "gpu-1", "starting"), Some(1.0));
        assert_eq!(state(&families, "gpu-1", "cold"), Some(0.0));
        let dollars = cost(&families).unwrap();
        assert!((dollars - 3.6).abs() < 1e-6, "{dollars}");
        // Scraped again, the counter does not count the same hour twice.
        let again = cost(&registry.gather()).unwrap();
        assert!((again - 3.6).abs() < 1e-6, "{again}");
        let seconds = value(
            &families,
            metric_names::GPU_INSTANCE_SECONDS_TOTAL,
            &[("backend", "gpu-1"), ("state", "starting")],
        )
        .unwrap();
        assert!((seconds - 3600.0).abs() < 1e-3, "{seconds}");
        let cold = value(
            &families,
            metric_names::GPU_INSTANCE_SECONDS_TOTAL,
            &[("backend", "gpu-1"), ("state", "cold")],
        )
        .unwrap();
        assert!((cold - 600.0).abs() < 1e-3, "{cold}");
        assert_eq!(
            value(
                &families,
                metric_names::GPU_COST_DOLLARS_TOTAL,
                &[("backend", "gpu-1"), ("state", "cold")]
            ),
            Some(0.0),
            "a cold slot costs nothing"
        );
        let breaker = |state| {
            value(
                &families,
                metric_names::BACKEND_BREAKER_STATE,
                &[("backend", "static-1"), ("state", state)],
            )
        };
        assert_eq!((breaker("closed"), breaker("open")), (Some(1.0), Some(0.0)));
        assert_eq!(
            value(
                &families,
                metric_names::BACKEND_IN_FLIGHT,
                &[("backend", "static-1")]
            ),
            Some(0.0)
        );
    }
}
