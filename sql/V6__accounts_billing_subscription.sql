-- The subscription that grants an account its tier (billing/src/webhook/
-- apply.rs keeps it beside `accounts.tier`); NULL when none does. Its
-- current period is the account's quota period, so the gateway joins it
-- rather than choosing a subscription again by rules of its own.
ALTER TABLE accounts ADD COLUMN billing_subscription_id text;
