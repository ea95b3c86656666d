//! `tollgate serve`: assembles the Pingora server from the validated config
//! and runs it until SIGTERM (drain, then exit) or SIGINT (exit now).

use std::process;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::proxy::http_proxy_service;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;
use secrecy::ExposeSecret;
use tollgate_backends::balance::breaker::BreakerConfig;
use tollgate_backends::fleet::controller::{FleetController, Managed};
use tollgate_backends::health::{Probe, ProbeClient, ProbeConfig};
use tollgate_backends::routing::{Backend, BackendPool, UpstreamSelector};
use tollgate_metering::journal::{JOURNAL_DIR, Journal};
use tollgate_metering::spool::{Spool, SpoolDirLock};
use tollgate_metering::writer::{self, UsageSink, WriterStats};

use crate::admin::{AdminApi, MetricsApp};
use crate::admission::Admission;
use crate::admission::limits::redis::RedisLimits;
use crate::admission::reconcile::PeriodReconciler;
use crate::billing::export::ExportMetrics;
use crate::billing::{BillingSessions, PastDueSweep, StripeWebhooks, UsageExporter};
use crate::config::{Config, RoutingConfig};
use crate::db::{self, PoolJanitor};
use crate::fleet::{self, EventLog, FleetService};
use crate::gateway::Gateway;
use crate::gateway::comfyui::ComfyBridge;
use crate::gateway::context::InFlight;
use crate::gateway::metrics::RequestMetrics;
use crate::gateway::models::ModelRoutes;
use crate::jobs::Jobs;
use crate::jobs::callbacks::CallbackSender;
use crate::jobs::results::ResultStore;
use crate::jobs::runner::JobRunner;
use crate::jobs::upkeep::{JobMetrics, JobUpkeep};
use crate::keys::KeyAdmin;
use crate::keys::cache::KeyCache;
use crate::keys::revocation::RevocationListener;
use crate::keys::store::KeyStore;
use crate::metering::request::{Metering, UnitSizes};
use crate::metering::services::{UsageUpkeep, UsageWriterService};
use crate::readiness::{PostgresReadiness, ReadinessProbe};
use crate::store_errors;
use crate::summary::Summary;

/// After the drain ends, Pingora gets this long to stop its runtimes.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);
/// After the drain, how long the usage writer may take to store what is left
/// (Postgres if it answers within its shutdown timeout, else the spool).
const USAGE_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

pub fn serve(config: Config) -> anyhow::Result<()> {
    let conf = ServerConf {
        threads: config.server.workers,
        // The drain's upper bound; `Drainer` exits sooner once idle.
        // Whole seconds here: round up, so Pingora never cuts a drain short.
        grace_period_seconds: Some(config.server.drain_timeout.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(RUNTIME_SHUTDOWN.as_secs()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let pool = db::pool(&config.database)?;
    let spool_dir = &config.metering.spool_dir;
    let spool_error = |e| anyhow::anyhow!("metering.spool_dir {}: {e}", spool_dir.display());
    // Held until the process exits: one process per spool directory.
    let _spool_lock = SpoolDirLock::acquire(spool_dir).map_err(spool_error)?;
    let spool = Spool::open(spool_dir).map_err(spool_error)?;
    let (journal, replayed) =
        Journal::open(&spool_dir.join(JOURNAL_DIR), &spool).map_err(spool_error)?;
    if replayed > 0 {
        tracing::info!(
            events = replayed,
            "usage events journaled by a previous run moved to the spool for replay"
        );
    }
    let usage_stats = WriterStats::new()?;
    usage_stats.register(prometheus::default_registry())?;
    let (sink, usage_writer) = writer::channel(
        pool.clone(),
        Arc::new(spool),
        Arc::new(journal),
        config.metering.writer.clone(),
        usage_stats,
    );
    let store = KeyStore::new(pool.clone());
    let cache = KeyCache::new(store.clone(), config.keys, prometheus::default_registry())?;
    store_errors::register(prometheus::default_registry())?;
    let mut backends: Vec<Backend> = Vec::new();
    let mut managed: Vec<Managed> = Vec::new();
    for (id, b) in config.backends.iter().enumerate() {
        if let Some(provider) = fleet::provider(&b.name, &b.provider, b.cost)? {
            managed.push(Managed { id, provider });
        }
        backends.push(Backend {
            name: b.name.clone(),
            address: b.address.clone(),
            host: b.host.clone(),
            tls: b.tls,
            models: b.models.clone(),
            max_concurrency: b.max_concurrency,
            credential: b.credential.clone(),
            probe: Probe::for_protocol(b.protocol, &b.models, &b.health_path),
            protocol: b.protocol,
        });
    }
    let redis = match &config.redis_url {
        Some(url) => Some(redis_client(url.expose_secret())?),
        None => None,
    };
    let admission = Arc::new(Admission::new(
        &config,
        redis.clone().map(|client| {
            RedisLimits::new(
                client,
                config.redis.key_prefix.clone(),
                config.redis.timeout,
            )
        }),
        prometheus::default_registry(),
    )?);
    let pool_of_backends = Arc::new(backend_pool(backends, &config.routing));
    let selector: Arc<dyn UpstreamSelector> = pool_of_backends.clone();
    let (event_log, event_writer) = EventLog::new();
    let fleet_controller = fleet::controller(
        &config,
        Arc::clone(&pool_of_backends),
        managed,
        admission.queues(),
        event_log,
    );
    let in_flight = Arc::new(InFlight::default());
    let revocation_fanout = config
        .redis_url
        .as_ref()
        .map(|_| Arc::new(AtomicBool::new(false)));

    let billing_sessions = BillingSessions::from_config(&config, pool.clone())?.map(Arc::new);
    let stripe_webhooks = StripeWebhooks::from_config(&config, prometheus::default_registry())?;
    let export_metrics = ExportMetrics::new(prometheus::default_registry())?;
    // Subscriptions come from webhooks: where they are received, their grace
    // is enforced.
    let past_due_sweep = stripe_webhooks.as_ref().map(|webhooks| PastDueSweep {
        pool: pool.clone(),
        plans: webhooks.plans.clone(),
        keys: cache.clone(),
        redis_url: webhooks.redis_url.clone(),
    });
    let models: Vec<String> = config.models().into_iter().map(str::to_owned).collect();
    let metrics = RequestMetrics::new(
        prometheus::default_registry(),
        models.clone(),
        config.tiers.iter().map(|t| t.name.clone()).collect(),
    )?;
    let figures = metrics.figures();
    let metering = Metering::new(
        &config.metering,
        &models,
        UnitSizes::from_config(&config),
        sink.clone(),
        prometheus::default_registry(),
    )?;
    let models = ModelRoutes::new(&config, &admission.queues(), &metering, &metrics);
    let readiness = Arc::new(PostgresReadiness::default());
    let tier_names: Vec<String> = config.tiers.iter().map(|t| t.name.clone()).collect();
    let results = match &config.jobs.results_url {
        Some(url) => {
            ResultStore::s3(url).map_err(|e| anyhow::anyhow!("jobs.results_url {url}: {e}"))?
        }
        None => {
            let dir = &config.jobs.results_dir;
            ResultStore::local(dir)
                .map_err(|e| anyhow::anyhow!("jobs.results_dir {}: {e}", dir.display()))?
        }
    };
    let jobs = Arc::new(Jobs::new(
        pool.clone(),
        results,
        config.jobs.clone(),
        JobMetrics::new(prometheus::default_registry(), &tier_names)?,
        &config.tiers,
    ));
    let workflows: Vec<_> = config.backends.iter().map(|b| b.workflow.clone()).collect();
    let comfyui_bridge = match workflows.iter().any(Option::is_some) {
        true => Some(ComfyBridge::bind(Arc::clone(&selector), workflows)?),
        false => None,
    };
    let gateway = Gateway {
        keys: cache.clone(),
        selector: Arc::clone(&selector),
        session_header: config.routing.session_header.clone(),
        pool: pool.clone(),
        readiness: Arc::clone(&readiness),
        in_flight: Arc::clone(&in_flight),
        max_body_bytes: config.server.max_body_bytes,
        max_upload_bytes: config.server.max_upload_bytes,
        audio_prober: Default::default(),
        timeouts: config.server.timeouts,
        models,
        revocation_fanout: revocation_fanout.clone(),
        metering,
        metrics,
        admission: Arc::clone(&admission),
        stripe_webhooks,
        billing_sessions: billing_sessions.clone(),
        custom_routes: config.routes.clone(),
        jobs: Arc::clone(&jobs),
        comfyui_bridge: comfyui_bridge.as_ref().map(|bridge| bridge.address),
    };
    let mut proxy = http_proxy_service(&server.configuration, gateway);
    proxy.add_tcp(&config.server.listen.to_string());

    let summary = Summary::new(
        &config,
        pool.clone(),
        admission.queues(),
        Arc::clone(&selector),
        Arc::clone(&fleet_controller),
        figures,
    );
    let admin_api = AdminApi {
        token: config.admin_token.clone(),
        keys: Arc::new(KeyAdmin::new(store, &config, Some(cache.clone()))),
        pool: pool.clone(),
        queues: admission.queues(),
        selector,
        fleet: Arc::clone(&fleet_controller),
        billing: billing_sessions,
        summary,
    };
    let mut admin = Service::new("admin API".to_owned(), HttpServer::new_app(admin_api));
    admin.add_tcp(&config.server.admin_listen.to_string());
    let mut metrics = Service::new("metrics".to_owned(), HttpServer::new_app(MetricsApp));
    metrics.add_tcp(&config.server.metrics_listen.to_string());

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(metrics);
    server.add_service(background_service(
        "readiness probe",
        ReadinessProbe {
            pool: pool.clone(),
            readiness,
        },
    ));
    server.add_service(background_service(
        "postgres pool janitor",
        PoolJanitor {
            pool: pool.clone(),
            max_idle_conns: config.database.max_idle_conns,
            max_idle_time: config.database.max_idle_time,
            max_lifetime: config.database.max_lifetime,
        },
    ));
    if let (Some(url), Some(subscribed)) = (&config.redis_url, revocation_fanout) {
        server.add_service(background_service(
            "key revocation listener",
            RevocationListener {
                redis_url: url.expose_secret().to_owned(),
                cache,
                subscribed,
            },
        ));
    }
    if let Some(client) = redis {
        server.add_service(background_service(
            "redis limiter connection",
            RedisConnection(client),
        ));
    }
    server.add_service(background_service(
        "backend health probes",
        HealthProber {
            backends: pool_of_backends,
            config: config.health,
        },
    ));
    server.add_service(background_service(
        "fleet controller",
        FleetService {
            controller: Arc::clone(&fleet_controller),
            events: event_writer,
            pool: pool.clone(),
        },
    ));
    server.add_service(background_service(
        "period counter reconciler",
        PeriodReconciler {
            pool: pool.clone(),
            admission,
            interval: config.admission.reconcile_interval,
        },
    ));
    if let Some(stripe) = &config.billing.stripe {
        server.add_service(background_service(
            "stripe usage exporter",
            UsageExporter {
                pool: pool.clone(),
                billing: config.billing.clone(),
                stripe: stripe.clone(),
                metrics: export_metrics,
            },
        ));
    }
    if let Some(sweep) = past_due_sweep {
        server.add_service(background_service("past-due sweep", sweep));
    }
    server.add_service(background_service(
        "usage writer",
        UsageWriterService(Mutex::new(Some(usage_writer))),
    ));
    server.add_service(background_service(
        "usage upkeep",
        UsageUpkeep {
            pool: pool.clone(),
            minute_rollup_retention: config.metering.minute_rollup_retention,
            rollup_retention: config.metering.rollup_retention,
        },
    ));
    if let Some(bridge) = comfyui_bridge {
        server.add_service(background_service("comfyui bridge", bridge));
    }
    server.add_service(background_service(
        "job runner",
        JobRunner::new(
            Arc::clone(&jobs),
            config.server.listen,
            Arc::clone(&in_flight),
            config.routes.clone(),
        ),
    ));
    server.add_service(background_service(
        "job callbacks",
        CallbackSender {
            jobs: Arc::clone(&jobs),
        },
    ));
    server.add_service(background_service("job upkeep", JobUpkeep { jobs }));
    server.add_service(background_service(
        "drainer",
        Drainer {
            in_flight,
            timeout: config.server.drain_timeout,
            usage: sink,
            fleet: fleet_controller,
        },
    ));
    tracing::info!(
        listen = %config.server.listen,
        admin = %config.server.admin_listen,
        metrics = %config.server.metrics_listen,
        "tollgate starting"
    );
    server.run_forever()
}

/// The backends behind the configured policy and breakers.
fn backend_pool(backends: Vec<Backend>, routing: &RoutingConfig) -> BackendPool {
    let policy = routing.policy.build(None);
    let breaker = BreakerConfig {
        failure_threshold: routing.breaker_failures,
        open_for: routing.breaker_open,
    };
    BackendPool::new(backends, policy, breaker)
}

/// Probes every backend each `interval` and logs verdicts that flip; the
/// pool passes unhealthy backends over.
struct HealthProber {
    backends: Arc<BackendPool>,
    config: ProbeConfig,
}

#[async_trait]
impl BackgroundService for HealthProber {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let client = ProbeClient::new();
        // Backends start presumed healthy: the first probe is one interval in.
        let first = tokio::time::Instant::now() + self.config.interval;
        let mut ticks = tokio::time::interval_at(first, self.config.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            for (backend, healthy) in self.backends.probe_all(&client, &self.config).await {
                if healthy {
                    tracing::warn!(backend = %backend.name, "backend healthy again: routable");
                } else {
                    tracing::error!(backend = %backend.name, "backend failed its health checks: passed over");
                }
            }
        }
    }
}

/// The Redis client the limiter shares; it reconnects on its own (the
/// limiter's calls set their own timeouts and fail at once while it is down).
fn redis_client(url: &str) -> anyhow::Result<fred::prelude::Client> {
    use fred::prelude::{Builder, Config as RedisConfig, ReconnectPolicy};
    let config = RedisConfig::from_url(url)
        .map_err(|e| anyhow::anyhow!("redis.url (env REDIS_URL) is not valid: {e}"))?;
    Ok(Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()?)
}

/// Runs the limiter's Redis connection on a runtime of its own (Pingora's
/// services each have one) for the process's lifetime. It is not closed at
/// shutdown: requests finishing during the drain still settle through it.
struct RedisConnection(fred::prelude::Client);

#[async_trait]
impl BackgroundService for RedisConnection {
    async fn start(&self, _shutdown: ShutdownWatch) {
        use fred::prelude::ClientLike;
        let _connection = self.0.connect();
    }
}

/// Ends the process once a graceful shutdown has drained.
///
/// On SIGTERM Pingora stops accepting and then waits out its whole grace
/// period, busy or not. This service waits only for the requests in flight
/// (streams included), up to `timeout`, then flushes their usage events and
/// exits: an idle gateway stops at once, a busy one when its last answer is done.
struct Drainer {
    in_flight: Arc<InFlight>,
    timeout: Duration,
    usage: UsageSink,
    /// Local instances (child processes) end with the gateway.
    fleet: Arc<FleetController>,
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() {
            return;
        }
        let pending = self.in_flight.count();
        tracing::info!(pending, "shutting down: draining requests in flight");
        match tokio::time::timeout(self.timeout, self.in_flight.wait_idle()).await {
            Ok(()) => tracing::info!("drained; exiting"),
            Err(_) => tracing::warn!(
                remaining = self.in_flight.count(),
                "drain timeout reached; exiting with requests in flight"
            ),
        }
        match tokio::time::timeout(USAGE_FLUSH_TIMEOUT, self.usage.flush_for_exit()).await {
            Ok(()) => tracing::info!("usage events flushed"),
            Err(_) => tracing::error!("usage flush timed out; unwritten events are lost"),
        }
        self.fleet.terminate_local().await;
        process::exit(0);
    }
}
