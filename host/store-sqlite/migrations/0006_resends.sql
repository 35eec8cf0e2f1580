-- How many times the reconciler sent the attempt again with its idempotency key.
ALTER TABLE attempts ADD COLUMN resends INTEGER NOT NULL DEFAULT 0;
