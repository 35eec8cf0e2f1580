ALTER TABLE attempts ADD COLUMN call_deadline_at BIGINT;
