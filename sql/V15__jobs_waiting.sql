-- What a job claimed but not yet sent is waiting for, written by the gateway
-- that queued it: since when its model has had no GPU up (the fleet is
-- waking one: `waiting_for_capacity`), and when it was expected to start.
ALTER TABLE jobs ADD COLUMN waiting_since timestamptz,
                 ADD COLUMN expected_start_at timestamptz;
