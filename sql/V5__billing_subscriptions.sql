-- Stripe webhook events applied to accounts (billing/src/webhook/apply.rs).
-- Stripe delivers each event at least once, in no set order and often
-- several at a time; these two tables make applying them idempotent and
-- order-independent.

-- Every event handled, including types Tollgate ignores, inserted in the
-- same transaction as the event's effects: a redelivery finds its id here
-- and changes nothing, and one racing the first waits on the primary key.
CREATE TABLE billing_webhook_events (
    id          text        PRIMARY KEY,        -- evt_...
    type        text        NOT NULL,
    created     timestamptz NOT NULL,           -- the event's `created` at Stripe
    livemode    boolean     NOT NULL,
    received_at timestamptz NOT NULL
);

-- Stripe stops redelivering after three days, so old rows can be pruned by
-- time.
CREATE INDEX billing_webhook_events_received_at_idx ON billing_webhook_events (received_at);

-- The last known state of each Stripe subscription. An account's tier is
-- computed from all of its rows: the newest subscription that is active,
-- trialing, or unpaid for less than the grace period.
CREATE TABLE billing_subscriptions (
    subscription_id       text        PRIMARY KEY,     -- sub_...
    -- The account it was first applied to; never changed afterwards.
    account_id            uuid        NOT NULL REFERENCES accounts (id),
    stripe_customer_id    text        NOT NULL,
    -- From the last customer.subscription.* event applied; NULL while only
    -- invoice events have arrived (they can come first). No CHECK: a status
    -- Stripe adds later is stored and grants no tier.
    status                text,
    price_lookup_key      text,
    -- The tier price_lookup_key mapped to when stored; NULL if none did.
    tier                  text,
    -- The subscription's own `created`: the newest subscription decides.
    subscription_created  timestamptz,
    current_period_start  timestamptz,
    current_period_end    timestamptz,
    cancel_at_period_end  boolean     NOT NULL DEFAULT false,
    -- Order of the stored state: the `created` of the event it came from and
    -- its type (0 created, 1 updated, 2 deleted) to break ties in a second.
    state_created         timestamptz,
    state_rank            smallint,
    -- Since when a payment is outstanding (invoice.payment_failed, or status
    -- past_due/unpaid); NULL when paid up.
    past_due_since        timestamptz,
    -- The `created` of the event that last set or cleared past_due_since.
    payment_state_created timestamptz,
    updated_at            timestamptz NOT NULL,
    CHECK ((current_period_start IS NULL) = (current_period_end IS NULL)),
    CHECK ((state_created IS NULL) = (state_rank IS NULL))
);

CREATE INDEX billing_subscriptions_account_id_idx ON billing_subscriptions (account_id);
-- The past-due sweep.
CREATE INDEX billing_subscriptions_past_due_idx
    ON billing_subscriptions (past_due_since) WHERE past_due_since IS NOT NULL;
