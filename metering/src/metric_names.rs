//! The name of every Prometheus metric Tollgate exports, in one place.
//!
//! Each metric is registered where its concern lives (the request metrics in
//! the gateway, the queue's in admission, the writer's here in
//! [`crate::writer`], …) with its help text and labels; only the name comes
//! from here, so the dashboards, the alert rules and their tests have one list
//! to hold against ([`ALL`]). The module sits in this crate because every
//! crate that registers a metric depends on it.
//!
//! Names follow `tollgate_<area>_<noun>`, with `_total` for counters and the
//! unit (`_seconds`, `_dollars`) where there is one. A name is an interface:
//! Grafana's dashboards (`grafana/dashboards/`) and the alert rules
//! (`deploy/prometheus/alerts.yml`) query it, so renaming one means changing
//! them in the same commit.
//!
//! Not here: `gpu-sim`'s metrics (`tollgate_backends::sim`), which carry
//! vLLM's and Triton's names on purpose.

// ---------------------------------------------------------------- requests

/// Inference requests, by tier, model, endpoint and status class.
pub const REQUESTS_TOTAL: &str = "tollgate_requests_total";
/// Inference requests from arrival to the last byte sent (histogram).
pub const REQUEST_DURATION_SECONDS: &str = "tollgate_request_duration_seconds";
/// Time Tollgate itself added to a request (histogram).
pub const OVERHEAD_SECONDS: &str = "tollgate_overhead_seconds";
/// Streamed answers: arrival to the first byte of the stream (histogram).
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "tollgate_time_to_first_token_seconds";
/// Tokens of metered requests, by direction (prompt, completion).
pub const TOKENS_TOTAL: &str = "tollgate_tokens_total";
/// Requests whose backend-reported prompt tokens differ from Tollgate's count.
pub const USAGE_COUNT_MISMATCH_TOTAL: &str = "tollgate_usage_count_mismatch_total";

// ---------------------------------------------------------------- admission

/// Requests refused at admission, by tier and reason.
pub const ADMISSION_REJECTED_TOTAL: &str = "tollgate_admission_rejected_total";
/// Admissions decided without Redis, by tier and `on_redis_down` policy.
pub const ADMISSION_REDIS_FALLBACK_TOTAL: &str = "tollgate_admission_redis_fallback_total";
/// Time admitted requests waited for a GPU slot (histogram).
pub const QUEUE_WAIT_SECONDS: &str = "tollgate_queue_wait_seconds";
/// Requests waiting for a GPU slot now.
pub const QUEUE_DEPTH: &str = "tollgate_queue_depth";
/// How long a tier's longest-waiting request has waited.
pub const QUEUE_OLDEST_WAIT_SECONDS: &str = "tollgate_queue_oldest_wait_seconds";
/// Expected wait of a request arriving now (-1: unknown).
pub const QUEUE_EXPECTED_WAIT_SECONDS: &str = "tollgate_queue_expected_wait_seconds";
/// Requests refused as server busy (expected wait too long, or waited out).
pub const QUEUE_SHED_TOTAL: &str = "tollgate_queue_shed_total";
/// GPU slots of a pool (its capacity).
pub const POOL_SLOTS: &str = "tollgate_pool_slots";
/// GPU slots of a pool held by requests.
pub const POOL_SLOTS_IN_USE: &str = "tollgate_pool_slots_in_use";

// ---------------------------------------------------------------- backends and the fleet

/// A backend's lifecycle state: 1 for the current one, 0 for the others.
pub const BACKEND_STATE: &str = "tollgate_backend_state";
/// Whether a backend passes its health probes (1) or not (0).
pub const BACKEND_UP: &str = "tollgate_backend_up";
/// A backend's circuit breaker: 1 for its current state, 0 for the others.
pub const BACKEND_BREAKER_STATE: &str = "tollgate_backend_breaker_state";
/// Requests Tollgate has outstanding on a backend.
pub const BACKEND_IN_FLIGHT: &str = "tollgate_backend_in_flight";
/// A backend's own load signals from its metrics endpoint.
pub const BACKEND_LOAD: &str = "tollgate_backend_load";
/// GPU utilisation (0-1) a backend reports.
pub const BACKEND_GPU_UTILIZATION: &str = "tollgate_backend_gpu_utilization";
/// Time a managed instance has spent in each lifecycle state.
pub const GPU_INSTANCE_SECONDS_TOTAL: &str = "tollgate_gpu_instance_seconds_total";
/// What a managed instance has cost in each lifecycle state (USD).
pub const GPU_COST_DOLLARS_TOTAL: &str = "tollgate_gpu_cost_dollars_total";

// ---------------------------------------------------------------- the usage writer

/// Usage events inserted into Postgres.
pub const USAGE_EVENTS_WRITTEN_TOTAL: &str = "tollgate_usage_events_written_total";
/// Usage events written again and ignored as already stored.
pub const USAGE_EVENTS_DUPLICATE_TOTAL: &str = "tollgate_usage_events_duplicate_total";
/// Batches of usage events written to Postgres.
pub const USAGE_WRITER_BATCHES_TOTAL: &str = "tollgate_usage_writer_batches_total";
/// Usage events appended to the local spool.
pub const USAGE_EVENTS_SPOOLED_TOTAL: &str = "tollgate_usage_events_spooled_total";
/// Spooled usage events replayed into Postgres.
pub const USAGE_EVENTS_REPLAYED_TOTAL: &str = "tollgate_usage_events_replayed_total";
/// Usage events neither written to Postgres nor spooled.
pub const USAGE_EVENTS_LOST_TOTAL: &str = "tollgate_usage_events_lost_total";
/// Failed or timed-out usage writes to Postgres.
pub const USAGE_WRITE_ERRORS_TOTAL: &str = "tollgate_usage_write_errors_total";
/// Failed appends to or syncs of the usage write-ahead journal.
pub const USAGE_JOURNAL_ERRORS_TOTAL: &str = "tollgate_usage_journal_errors_total";
/// Usage events in the spool awaiting replay.
pub const USAGE_SPOOL_EVENTS: &str = "tollgate_usage_spool_events";

// ---------------------------------------------------------------- Stripe

/// Usage meter events the exporter handled, by outcome.
pub const STRIPE_EXPORT_EVENTS_TOTAL: &str = "tollgate_stripe_export_events_total";
/// Usage export passes that failed before sending.
pub const STRIPE_EXPORT_PASS_ERRORS_TOTAL: &str = "tollgate_stripe_export_pass_errors_total";
/// Meter events planned and not yet sent, after the last pass.
pub const STRIPE_EXPORT_PENDING_EVENTS: &str = "tollgate_stripe_export_pending_events";
/// Age of the oldest meter event still waiting to be sent.
pub const STRIPE_EXPORT_OLDEST_PENDING_SECONDS: &str =
    "tollgate_stripe_export_oldest_pending_seconds";
/// Stripe webhook deliveries, by event type and outcome.
pub const STRIPE_WEBHOOKS_TOTAL: &str = "tollgate_stripe_webhooks_total";

// ---------------------------------------------------------------- jobs

/// Jobs in Postgres by state (every gateway's), as of the last sweep.
pub const JOBS: &str = "tollgate_jobs";
/// Jobs from submission to their GPU slot, by tier (histogram).
pub const JOB_WAIT_SECONDS: &str = "tollgate_job_wait_seconds";
/// Age of the oldest job still queued, as of the last sweep.
pub const JOB_OLDEST_QUEUED_SECONDS: &str = "tollgate_job_oldest_queued_seconds";
/// Bytes of results kept in the result store, as of the last sweep.
pub const JOB_RESULT_BYTES: &str = "tollgate_job_result_bytes";
/// Bytes of expired results this gateway deleted.
pub const JOB_RESULTS_FREED_BYTES_TOTAL: &str = "tollgate_job_results_freed_bytes_total";

// ---------------------------------------------------------------- keys and stores

/// API key lookups, by result (hit, miss, stale).
pub const KEY_CACHE_LOOKUPS_TOTAL: &str = "tollgate_key_cache_lookups_total";
/// Postgres calls that failed or timed out, by operation.
pub const POSTGRES_ERRORS_TOTAL: &str = "tollgate_postgres_errors_total";
/// Redis calls that failed or timed out, by operation.
pub const REDIS_ERRORS_TOTAL: &str = "tollgate_redis_errors_total";

/// Every name above. The gateway's tests hold a live scrape against it both
/// ways (each name exported, each exported `tollgate_*` family listed), so a
/// metric added without its constant here fails them.
pub const ALL: &[&str] = &[
    JOBS,
    JOB_WAIT_SECONDS,
    JOB_OLDEST_QUEUED_SECONDS,
    JOB_RESULT_BYTES,
    JOB_RESULTS_FREED_BYTES_TOTAL,
    REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
    OVERHEAD_SECONDS,
    TIME_TO_FIRST_TOKEN_SECONDS,
    TOKENS_TOTAL,
    USAGE_COUNT_MISMATCH_TOTAL,
    ADMISSION_REJECTED_TOTAL,
    ADMISSION_REDIS_FALLBACK_TOTAL,
    QUEUE_WAIT_SECONDS,
    QUEUE_DEPTH,
    QUEUE_OLDEST_WAIT_SECONDS,
    QUEUE_EXPECTED_WAIT_SECONDS,
    QUEUE_SHED_TOTAL,
    POOL_SLOTS,
    POOL_SLOTS_IN_USE,
    BACKEND_STATE,
    BACKEND_UP,
    BACKEND_BREAKER_STATE,
    BACKEND_IN_FLIGHT,
    BACKEND_LOAD,
    BACKEND_GPU_UTILIZATION,
    GPU_INSTANCE_SECONDS_TOTAL,
    GPU_COST_DOLLARS_TOTAL,
    USAGE_EVENTS_WRITTEN_TOTAL,
    USAGE_EVENTS_DUPLICATE_TOTAL,
    USAGE_WRITER_BATCHES_TOTAL,
    USAGE_EVENTS_SPOOLED_TOTAL,
    USAGE_EVENTS_REPLAYED_TOTAL,
    USAGE_EVENTS_LOST_TOTAL,
    USAGE_WRITE_ERRORS_TOTAL,
    USAGE_JOURNAL_ERRORS_TOTAL,
    USAGE_SPOOL_EVENTS,
    STRIPE_EXPORT_EVENTS_TOTAL,
    STRIPE_EXPORT_PASS_ERRORS_TOTAL,
    STRIPE_EXPORT_PENDING_EVENTS,
    STRIPE_EXPORT_OLDEST_PENDING_SECONDS,
    STRIPE_WEBHOOKS_TOTAL,
    KEY_CACHE_LOOKUPS_TOTAL,
    POSTGRES_ERRORS_TOTAL,
    REDIS_ERRORS_TOTAL,
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::ALL;

    #[test]
    fn names_are_distinct_valid_and_tollgates() {
        let distinct: BTreeSet<&str> = ALL.iter().copied().collect();
        assert_eq!(distinct.len(), ALL.len(), "a name is listed twice");
        for name in ALL {
            assert!(
                name.strip_prefix("tollgate_")
                    .is_some_and(|rest| !rest.is_empty()
                        && rest.chars().all(|c| c.is_ascii_lowercase() || c == '_')),
                "{name}: not tollgate_<lowercase words>"
            );
        }
    }
}
