-- The name each instance is created under (`tollgate-{backend}-{uuid v7}`),
-- minted by the fleet controller and written *before* the provider's create
-- call. A row with a name and no `instance_id` is a create whose answer was
-- not recorded (lost, or Tollgate stopped meanwhile): at start-up it is
-- looked up at the provider by this name and adopted, or given up if nothing
-- was rented, so that a lost answer never leaves a billed instance behind.
-- NULL on rows written before this column, and while nothing is rented.
ALTER TABLE instance_events ADD COLUMN instance_name text;
