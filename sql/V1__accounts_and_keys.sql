-- Accounts and their API keys. A key's secret is never stored: only its
-- SHA-256, looked up through a unique index.

CREATE TABLE accounts (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    tier        text        NOT NULL,
    status      text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id              uuid        PRIMARY KEY,
    account_id      uuid        NOT NULL REFERENCES accounts (id),
    hash            bytea       NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
    display_prefix  text        NOT NULL,
    name            text,
    -- NULL: every model; otherwise only these.
    allowed_models  text[],
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    revoked_at      timestamptz
);

CREATE INDEX api_keys_account_id_idx ON api_keys (account_id);
CREATE INDEX api_keys_display_prefix_idx ON api_keys (display_prefix);
