-- Each claim of a key has its own id, so releasing one never removes another run's.
ALTER TABLE idempotency_keys ADD COLUMN claim_id TEXT;
