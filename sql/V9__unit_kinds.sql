-- Units beyond tokens (docs/units.md): every usage event says what its
-- `units` count, and the rollups keep each kind apart, so quotas, reports
-- and the Stripe export never add images to tokens. Every row written before
-- this was billed in tokens, which is the default.

ALTER TABLE usage_events
    ADD COLUMN unit_kind text NOT NULL DEFAULT 'tokens'
    CHECK (unit_kind IN ('tokens', 'images', 'audio_seconds', 'characters', 'requests', 'gpu_seconds'));

-- The endpoints served beyond chat, completions and embeddings.
ALTER TABLE usage_events DROP CONSTRAINT usage_events_kind_check;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_kind_check CHECK (kind IN (
    'chat', 'completion', 'embedding', 'response', 'image', 'image_edit', 'speech',
    'transcription', 'translation', 'custom'));

ALTER TABLE usage_rollup_minute ADD COLUMN unit_kind text NOT NULL DEFAULT 'tokens';
ALTER TABLE usage_rollup_minute DROP CONSTRAINT usage_rollup_minute_pkey;
ALTER TABLE usage_rollup_minute ADD PRIMARY KEY (account_id, bucket, key_id, model, tier, unit_kind);

ALTER TABLE usage_rollup_day ADD COLUMN unit_kind text NOT NULL DEFAULT 'tokens';
ALTER TABLE usage_rollup_day DROP CONSTRAINT usage_rollup_day_pkey;
ALTER TABLE usage_rollup_day ADD PRIMARY KEY (account_id, bucket, key_id, model, tier, unit_kind);

ALTER TABLE usage_rollup_total_day ADD COLUMN unit_kind text NOT NULL DEFAULT 'tokens';
ALTER TABLE usage_rollup_total_day DROP CONSTRAINT usage_rollup_total_day_pkey;
ALTER TABLE usage_rollup_total_day ADD PRIMARY KEY (bucket, unit_kind);
