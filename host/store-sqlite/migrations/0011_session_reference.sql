-- The caller's own id for a session (a Medusa session id), so a caller that kept only its own
-- id finds the session; sessions are listed by it.
ALTER TABLE payment_sessions ADD COLUMN reference TEXT;
CREATE INDEX payment_sessions_reference ON payment_sessions (reference) WHERE reference IS NOT NULL;
