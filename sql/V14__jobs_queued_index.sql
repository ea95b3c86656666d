-- The per-account cap on queued jobs is checked at every submission: by
-- this index it reads only the account's queued jobs (and at most the cap
-- of them), not every job it ever ran.
CREATE INDEX jobs_queued_by_account ON jobs (account_id) WHERE state = 'queued';
