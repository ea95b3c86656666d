-- Billing: which Stripe customer pays for an account, and the usage sent to
-- Stripe as meter events.

-- Set when a Checkout Session completes (the webhook, never the redirect).
CREATE TABLE billing_customers (
    account_id         uuid        PRIMARY KEY REFERENCES accounts (id),
    stripe_customer_id text        NOT NULL UNIQUE,
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- One row per account, meter, usage bucket (an hour by default) and
-- sequence: seq 0 is the bucket's units when it closed; 1, 2, ... are units
-- that arrived later (a spool replayed after an outage), each its own meter
-- event. A row is planned `pending` in the transaction that reads the usage,
-- so the usage it covers is never planned twice; it becomes `sent` when
-- Stripe accepted it or already had its identifier, and `expired` when a
-- resend would fall outside Stripe's identifier window (reconciliation
-- reports those).
CREATE TABLE billing_usage_exports (
    account_id         uuid        NOT NULL REFERENCES accounts (id),
    meter              text        NOT NULL,
    bucket_start       timestamptz NOT NULL,
    seq                integer     NOT NULL CHECK (seq >= 0),
    units              bigint      NOT NULL CHECK (units > 0),
    stripe_customer_id text        NOT NULL,
    -- `{account}:{meter}:{bucket unix seconds}[:{seq}]`: the meter event's
    -- identifier and Idempotency-Key, the same on every attempt.
    identifier         text        NOT NULL UNIQUE,
    state              text        NOT NULL DEFAULT 'pending'
                                   CHECK (state IN ('pending', 'sent', 'expired')),
    attempts           integer     NOT NULL DEFAULT 0,
    first_attempt_at   timestamptz,
    -- A sender holds the row until then; another may take it after.
    leased_until       timestamptz,
    last_error         text,
    planned_at         timestamptz NOT NULL DEFAULT now(),
    sent_at            timestamptz,
    PRIMARY KEY (account_id, meter, bucket_start, seq)
);

CREATE INDEX billing_usage_exports_pending
    ON billing_usage_exports (bucket_start, seq) WHERE state = 'pending';
