-- Lifecycle transitions of GPU instances (cold, provisioning, warm, starting,
-- hot, draining, failed), one row per transition, written by the fleet
-- controller off the request path. Cost and availability are computed from
-- these rows: an instance is in `to_state` from `at` until its next row, at
-- `hourly_cost` per hour (see docs/fleet.md for the query).
CREATE TABLE instance_events (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL,
    backend     text        NOT NULL,
    -- The provider's id of the instance (pod id, process name); NULL while
    -- nothing is rented.
    instance_id text,
    from_state  text        NOT NULL,
    to_state    text        NOT NULL,
    reason      text        NOT NULL,
    -- Price per hour in `to_state` (running price, stopped price, or 0).
    hourly_cost double precision NOT NULL,
    CHECK (from_state IN ('cold', 'provisioning', 'warm', 'starting', 'hot', 'draining', 'failed')),
    CHECK (to_state IN ('cold', 'provisioning', 'warm', 'starting', 'hot', 'draining', 'failed'))
);

-- Per backend in time order: the last state (recovery at start-up) and the
-- intervals between transitions (cost reports).
CREATE INDEX instance_events_backend_at ON instance_events (backend, at, id);
