-- Durable async jobs (issue 20): a request accepted at once (202) and run
-- when a GPU slot is free, by whichever gateway claims it.
--
-- A claim is a lease: `lease_owner` (the gateway's node id) and
-- `lease_until`, renewed by the runner. A job whose lease lapsed (its
-- gateway died) can be claimed again; each claim raises `attempt`, and a
-- runner's writes name the attempt they belong to, so a late finish by an
-- old owner changes nothing (fencing). `sent` records that the request
-- reached a backend: a job reclaimed after that is retried only when its
-- route is idempotent.

CREATE TABLE jobs (
    id              uuid        PRIMARY KEY,
    account_id      uuid        NOT NULL REFERENCES accounts (id),
    key_id          uuid        NOT NULL REFERENCES api_keys (id),
    tier            text        NOT NULL,
    -- The tier's priority at submit: runnable jobs are claimed highest first.
    priority        integer     NOT NULL,
    state           text        NOT NULL DEFAULT 'queued',
    -- The request as submitted, run as it would have been live.
    method          text        NOT NULL,
    path            text        NOT NULL,
    content_type    text,
    body            bytea       NOT NULL,
    body_sha256     bytea       NOT NULL,
    idempotency_key text,
    attempt         integer     NOT NULL DEFAULT 0,
    -- Not claimed before this: a job refused for now (429, 503 with
    -- Retry-After) waits its turn again instead of failing.
    run_after       timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_until     timestamptz,
    sent            boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    -- The answer: its HTTP status and type, where the result store keeps
    -- its bytes, and how many.
    result_status   integer,
    result_type     text,
    result_key      text,
    result_bytes    bigint,
    -- Why a job failed, OpenAI-shaped (`{"message", "type", "code"}`).
    error           jsonb,
    CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired'))
);

-- An account's jobs, newest first (`GET /v1/jobs`; ids are UUIDv7, in
-- creation order).
CREATE INDEX jobs_by_account ON jobs (account_id, id DESC);
-- What runners claim: queued jobs, and running ones whose lease may lapse.
CREATE INDEX jobs_runnable ON jobs (priority DESC, created_at)
    WHERE state IN ('queued', 'running');
-- One job per account and idempotency key.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (account_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
