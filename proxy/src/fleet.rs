//! The gateway's side of the GPU fleet: providers built from the config, the
//! controller run as a background service, its transitions written to
//! Postgres (`instance_events`) off the request path, and the instances the
//! log says were rented adopted again at start-up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;
use tollgate_backends::fleet::controller::{
    Connections, EventSink, FleetController, InstanceEvent, Managed, ProbeReadiness,
};
use tollgate_backends::fleet::policy::Scaler;
use tollgate_backends::fleet::providers::process::ProcessProvider;
use tollgate_backends::fleet::providers::runpod::RunPod;
use tollgate_backends::fleet::providers::{HourlyCost, Instance, Provider};
use tollgate_backends::health::ProbeClient;
use tollgate_backends::routing::BackendPool;

use crate::admission::AdmissionQueues;
use crate::config::{Config, ProviderConfig};

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

/// The controller for `backends`, whose managed members are `managed`.
pub fn controller(
    config: &Config,
    backends: Arc<BackendPool>,
    managed: Vec<Managed>,
    queues: Arc<AdmissionQueues>,
    events: Arc<EventLog>,
) -> Arc<FleetController> {
    FleetController::new(
        backends,
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
    )
}

/// Transitions on their way to Postgres: `record` never blocks.
pub struct EventLog(mpsc::UnboundedSender<(SystemTime, InstanceEvent)>);

impl EventLog {
    pub fn new() -> (Arc<Self>, EventWriter) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (
            Arc::new(Self(sender)),
            EventWriter(tokio::sync::Mutex::new(Some(receiver))),
        )
    }
}

impl EventSink for EventLog {
    fn record(&self, event: InstanceEvent) {
        // Stamped here: the writer may be retrying a Postgres outage.
        if self.0.send((SystemTime::now(), event)).is_err() {
            tracing::error!("instance event writer has stopped; transition not recorded");
        }
    }
}

/// Writes transitions in order, holding them through a Postgres outage
/// (there are a handful an hour, so memory is no concern).
pub struct EventWriter(
    tokio::sync::Mutex<Option<mpsc::UnboundedReceiver<(SystemTime, InstanceEvent)>>>,
);

impl EventWriter {
    pub async fn run(&self, pool: &Pool) {
        let Some(mut receiver) = self.0.lock().await.take() else {
            return;
        };
        let mut pending: VecDeque<(SystemTime, InstanceEvent)> = VecDeque::new();
        loop {
            if pending.is_empty() {
                match receiver.recv().await {
                    Some(event) => pending.push_back(event),
                    None => return,
                }
            }
            while let Ok(event) = receiver.try_recv() {
                pending.push_back(event);
            }
            while let Some((at, event)) = pending.front() {
                if let Err(e) = insert(pool, *at, event).await {
                    tracing::warn!(error = %e, pending = pending.len(), "instance events not written yet; retrying");
                    tokio::time::sleep(POSTGRES_RETRY).await;
                    break;
                }
                pending.pop_front();
            }
        }
    }
}

async fn insert(pool: &Pool, at: SystemTime, event: &InstanceEvent) -> anyhow::Result<()> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO instance_events \
             (at, backend, instance_id, from_state, to_state, reason, hourly_cost) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &at,
                &event.backend,
                &event.instance_id,
                &event.from.as_str(),
                &event.to.as_str(),
                &event.reason,
                &event.hourly_cost,
            ],
        )
        .await?;
    Ok(())
}

/// The instance each backend held at its last recorded transition, if that
/// left one rented (anything but cold).
async fn last_instances(pool: &Pool) -> anyhow::Result<Vec<(String, Instance)>> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT DISTINCT ON (backend) backend, instance_id, to_state \
             FROM instance_events ORDER BY backend, at DESC, id DESC",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter(|row| row.get::<_, &str>(2) != "cold")
        .filter_map(|row| {
            let id: Option<String> = row.get(1);
            Some((
                row.get(0),
                Instance {
                    id: id?,
                    address: None,
                },
            ))
        })
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
    /// Adopts the instances the event log says are rented. Until the log
    /// has been read no decision is made (requests for scaled-to-zero pools
    /// wait meanwhile): deciding without it would rent again what is
    /// already rented and forget the rest.
    async fn adopt_rented(&self) {
        let instances = loop {
            match last_instances(&self.pool).await {
                Ok(instances) => break instances,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read instance_events yet; the fleet waits for it");
                    tokio::time::sleep(POSTGRES_RETRY).await;
                }
            }
        };
        for (name, instance) in instances {
            if let Some(id) = self.controller.backend_id(&name) {
                tracing::info!(
                    backend = name,
                    instance = instance.id,
                    "adopting the instance recorded as rented"
                );
                self.controller.adopt(id, instance);
            }
        }
    }
}
