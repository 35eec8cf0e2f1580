-- A key whose operation started a money movement names its attempt, so a retry after a crash or
-- an unknown outcome is answered from the attempt and never moves money twice.
ALTER TABLE idempotency_keys ADD COLUMN attempt_id TEXT;
