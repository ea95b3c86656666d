-- Completion callbacks (docs/jobs.md#callbacks): a signed POST to a job's
-- URL (or its account's) when the job ends, retried with backoff for hours.

-- The account's default URL, and the secret every callback of it is signed with.
ALTER TABLE accounts ADD COLUMN callback_url text,
                     ADD COLUMN callback_secret text;
ALTER TABLE jobs ADD COLUMN callback_url text;

-- One delivery per ended job, queued in the statement that ends it.
CREATE TABLE job_callbacks (
    job_id       uuid        PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    url          text        NOT NULL,
    attempts     integer     NOT NULL DEFAULT 0,
    next_at      timestamptz NOT NULL DEFAULT now(),
    -- A sender holds the delivery until then; another may take it after.
    lease_until  timestamptz,
    delivered_at timestamptz,
    gave_up_at   timestamptz,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_callbacks_due ON job_callbacks (next_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;
