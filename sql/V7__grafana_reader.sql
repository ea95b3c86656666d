-- A read-only role for Grafana's Postgres datasource
-- (grafana/provisioning/datasources/datasources.yml). It may read what the
-- provisioned dashboards query and nothing else: the usage rollups, the
-- fleet's event log, and the columns of accounts, keys, subscriptions and
-- Stripe exports that hold no secret. Not the raw usage log, not key hashes
-- or prefixes, not Stripe customer ids or errors, and no writes of any kind.
-- A new panel that needs more gets it from a new migration.
--
-- A migration cannot hold a secret, so the role is created without a
-- password and cannot log in: `tollgate migrate` with GRAFANA_DB_PASSWORD set
-- gives it one (docker-compose.yml does), or an administrator runs
-- ALTER ROLE tollgate_grafana LOGIN PASSWORD '...'.
--
-- Roles belong to the whole server, grants to one database. Every database
-- migrated on a server runs this (the tests migrate many at once), so the
-- role is created only when missing, a creation racing another database's is
-- tolerated, and the grants are made here, per database. Creating it needs
-- CREATEROLE; where the migrating user lacks it, an administrator creates
-- the role first (CREATE ROLE tollgate_grafana NOLOGIN) and this only grants.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tollgate_grafana') THEN
        CREATE ROLE tollgate_grafana NOLOGIN NOINHERIT;
    END IF;
EXCEPTION
    -- Created by a concurrent migration of another database after the check:
    -- duplicate_object once it committed, unique_violation on pg_authid's
    -- name index while both were in flight.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

GRANT SELECT ON usage_rollup_minute, usage_rollup_day, usage_rollup_total_day, instance_events
    TO tollgate_grafana;
GRANT SELECT (id, name, tier, status, created_at, billing_subscription_id)
    ON accounts TO tollgate_grafana;
GRANT SELECT (id, account_id, created_at, expires_at, revoked_at)
    ON api_keys TO tollgate_grafana;
GRANT SELECT (subscription_id, account_id, status, tier, current_period_start, current_period_end)
    ON billing_subscriptions TO tollgate_grafana;
GRANT SELECT (account_id, meter, bucket_start, seq, units, state)
    ON billing_usage_exports TO tollgate_grafana;
