-- The usage log: one row per admitted request, written in batches by the
-- metering writer, partitioned by month so retention drops whole tables.
--
-- Uniqueness: a unique index on a partitioned table must contain the
-- partition key, so the key is (event_id, created_at), not event_id alone.
-- That is still exactly-once: created_at is the event's admission time,
-- minted once with the UUIDv7 event id and carried with the event through
-- the channel, the spool and any replay, so a replayed event lands in the
-- same partition and conflicts with itself.
--
-- Partitions are created by Tollgate (current month and the next ones, and
-- on demand for a replayed batch); there is no default partition, because
-- attaching a partition would then have to scan it.

CREATE TABLE usage_events (
    event_id                  uuid        NOT NULL,
    created_at                timestamptz NOT NULL,
    request_id                text        NOT NULL,
    account_id                uuid        NOT NULL,
    key_id                    uuid        NOT NULL,
    tier                      text        NOT NULL,
    model                     text        NOT NULL,
    backend                   text,
    kind                      text        NOT NULL CHECK (kind IN ('chat', 'completion', 'embedding', 'image', 'audio')),
    status                    text        NOT NULL CHECK (status IN ('ok', 'partial', 'client_error', 'upstream_error', 'rejected')),
    -- Billed figures: the backend's own usage report when it sent one,
    -- otherwise Tollgate's count.
    prompt_tokens             bigint      NOT NULL,
    completion_tokens         bigint      NOT NULL,
    total_tokens              bigint      NOT NULL,
    -- Tollgate's own counts (NULL when counting is off).
    counted_prompt_tokens     bigint,
    counted_completion_tokens bigint,
    usage_source              text        NOT NULL CHECK (usage_source IN ('backend', 'counted', 'none')),
    units                     bigint      NOT NULL,
    latency_ms                integer     NOT NULL,
    ttft_ms                   integer,
    PRIMARY KEY (event_id, created_at)
) PARTITION BY RANGE (created_at);

-- Per-account history (period usage, invoices, disputes).
CREATE INDEX usage_events_account_created_idx ON usage_events (account_id, created_at);
-- Statistics by kind over a time window.
CREATE INDEX usage_events_kind_created_idx ON usage_events (kind, created_at);
-- Time-range scans across accounts; tiny, and ideal for append-ordered time.
CREATE INDEX usage_events_created_brin ON usage_events USING brin (created_at);

-- Per minute × account × key × model totals, maintained in the same
-- statement that inserts a batch, from the rows actually inserted (so a
-- replayed event adds nothing). Dashboards, statistics and period usage read
-- these, not the raw log.
CREATE TABLE usage_rollup_minute (
    bucket            timestamptz NOT NULL,
    account_id        uuid        NOT NULL,
    key_id            uuid        NOT NULL,
    model             text        NOT NULL,
    tier              text        NOT NULL,
    requests          bigint      NOT NULL,
    failed_requests   bigint      NOT NULL,
    prompt_tokens     bigint      NOT NULL,
    completion_tokens bigint      NOT NULL,
    total_tokens      bigint      NOT NULL,
    units             bigint      NOT NULL,
    PRIMARY KEY (account_id, bucket, key_id, model, tier)
);

CREATE INDEX usage_rollup_minute_bucket_idx ON usage_rollup_minute (bucket);

-- The same totals per UTC day: an account's month is ~30 rows per key and
-- model however often it calls, where its minute rows can number as many as
-- its requests. Period totals read whole days here and only the partial days
-- at a period's edges from the minute rollups.
CREATE TABLE usage_rollup_day (LIKE usage_rollup_minute INCLUDING ALL);

-- All accounts together per UTC day: what "units this month" sums, in a
-- handful of rows instead of one per account, key and model.
CREATE TABLE usage_rollup_total_day (
    bucket            timestamptz PRIMARY KEY,
    requests          bigint      NOT NULL,
    failed_requests   bigint      NOT NULL,
    prompt_tokens     bigint      NOT NULL,
    completion_tokens bigint      NOT NULL,
    total_tokens      bigint      NOT NULL,
    units             bigint      NOT NULL
);

-- The month partitions of usage_events and their bounds, so retention can
-- find whole partitions to drop without parsing catalog expressions.
CREATE TABLE usage_partitions (
    name       text        PRIMARY KEY,
    starts_at  timestamptz NOT NULL,
    ends_at    timestamptz NOT NULL
);

-- Creates the partition of the UTC month containing `at`, if missing; safe
-- when several Tollgate instances call it at once. Returns its name.
CREATE FUNCTION usage_ensure_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp   := date_trunc('month', at AT TIME ZONE 'UTC');
    part_name   text        := 'usage_events_' || to_char(month_start, 'YYYY_MM');
    starts_at   timestamptz := month_start AT TIME ZONE 'UTC';
    ends_at     timestamptz := (month_start + interval '1 month') AT TIME ZONE 'UTC';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM usage_partitions p WHERE p.name = part_name) THEN
        BEGIN
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
                part_name, starts_at, ends_at);
        EXCEPTION WHEN duplicate_table OR unique_violation THEN
            -- Another instance created it a moment ago.
            NULL;
        END;
        INSERT INTO usage_partitions (name, starts_at, ends_at)
        VALUES (part_name, starts_at, ends_at)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN part_name;
END
$$;

-- This month and the next two exist from the first migration on.
SELECT usage_ensure_partition(now() + make_interval(months => m)) FROM generate_series(0, 2) AS m;
