-- OpenAI's Files and Batch APIs, over jobs (docs/jobs.md#batches).

-- A file's bytes are in the result store (`storage_key`); this is its record.
CREATE TABLE files (
    id          uuid        PRIMARY KEY,
    account_id  uuid        NOT NULL REFERENCES accounts (id),
    -- `batch` (uploaded), `batch_output` (a batch's output or error file).
    purpose     text        NOT NULL,
    filename    text        NOT NULL,
    bytes       bigint      NOT NULL,
    storage_key text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Deleted with its bytes after this (a batch's output files follow their
    -- tier's result retention; uploads are kept until deleted).
    expires_at  timestamptz
);
CREATE INDEX files_by_account ON files (account_id, id DESC);
CREATE INDEX files_expiring ON files (expires_at) WHERE expires_at IS NOT NULL;

-- A batch: one job per line of its input file.
CREATE TABLE batches (
    id                uuid        PRIMARY KEY,
    account_id        uuid        NOT NULL REFERENCES accounts (id),
    -- The submitting key's tier: its output files follow its result retention.
    tier              text        NOT NULL,
    endpoint          text        NOT NULL,
    input_file_id     uuid        NOT NULL,
    completion_window text        NOT NULL,
    status            text        NOT NULL,
    metadata          jsonb,
    -- Why validation failed, OpenAI-shaped (`{"object": "list", "data": […]}`).
    errors            jsonb,
    total             integer     NOT NULL DEFAULT 0,
    -- Set when it is finalized (its jobs' records may be retired later).
    completed         integer,
    failed            integer,
    output_file_id    uuid,
    error_file_id     uuid,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    in_progress_at    timestamptz,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz,
    CHECK (status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed',
                      'expired', 'cancelling', 'cancelled'))
);
CREATE INDEX batches_by_account ON batches (account_id, id DESC);
CREATE INDEX batches_unfinished ON batches (status) WHERE status IN ('in_progress', 'cancelling', 'finalizing');

ALTER TABLE jobs ADD COLUMN batch_id uuid REFERENCES batches (id),
                 ADD COLUMN custom_id text;
CREATE INDEX jobs_by_batch ON jobs (batch_id) WHERE batch_id IS NOT NULL;
