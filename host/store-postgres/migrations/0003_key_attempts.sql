ALTER TABLE idempotency_keys ADD COLUMN attempt_id TEXT;
