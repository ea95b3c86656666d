-- When a job's request got its GPU slot and was sent (NULL: not sent), in
-- place of a flag: the API shows it as the time the job started running,
-- and it orders jobs by when they really ran.
ALTER TABLE jobs ADD COLUMN sent_at timestamptz;
UPDATE jobs SET sent_at = coalesce(started_at, now()) WHERE sent;
ALTER TABLE jobs DROP COLUMN sent;
