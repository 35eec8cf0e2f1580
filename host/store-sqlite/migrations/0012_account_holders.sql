-- Account holders (a customer's record at one provider), the payment methods saved to them, and
-- the attempts that record each provider call changing them before it is made. A session may
-- name the holder whose saved methods pay it. Lists of values are OR chains (migration 9: an
-- `IN` list builds a temporary B-tree on every statement that checks it).
CREATE TABLE account_holders (
    id TEXT PRIMARY KEY,
    provider_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    customer TEXT NOT NULL,
    reference TEXT,
    data TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status = 'pending' OR status = 'active' OR status = 'deleted' OR status = 'failed'),
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);
-- One live holder per customer and provider: two racing creates cannot both reach the provider.
CREATE UNIQUE INDEX account_holders_one_live ON account_holders (provider_id, customer_id)
    WHERE status = 'pending' OR status = 'active';
CREATE INDEX account_holders_customer ON account_holders (customer_id);
CREATE TRIGGER account_holders_terminal BEFORE UPDATE OF status ON account_holders
WHEN (OLD.status = 'deleted' OR OLD.status = 'failed') AND NEW.status <> OLD.status
BEGIN SELECT RAISE(ABORT, 'invariant: a deleted or failed account holder cannot change'); END;

CREATE TABLE payment_methods (
    id TEXT PRIMARY KEY,
    account_holder_id TEXT NOT NULL REFERENCES account_holders (id),
    provider_id TEXT NOT NULL,
    reference TEXT,
    data TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status = 'pending' OR status = 'saved' OR status = 'deleted' OR status = 'failed'),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX payment_methods_holder ON payment_methods (account_holder_id);
CREATE TRIGGER payment_methods_terminal BEFORE UPDATE OF status ON payment_methods
WHEN (OLD.status = 'deleted' OR OLD.status = 'failed') AND NEW.status <> OLD.status
BEGIN SELECT RAISE(ABORT, 'invariant: a deleted or failed payment method cannot change'); END;

CREATE TABLE holder_attempts (
    id TEXT PRIMARY KEY,
    account_holder_id TEXT NOT NULL REFERENCES account_holders (id),
    payment_method_id TEXT REFERENCES payment_methods (id),
    provider_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state = 'in_flight' OR state = 'succeeded' OR state = 'failed' OR state = 'unknown' OR state = 'needs_operator'),
    detail TEXT NOT NULL,
    outcome TEXT,
    error TEXT,
    checks INTEGER NOT NULL,
    next_check_at INTEGER,
    call_deadline_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);
-- At most one open attempt per holder: an unknown one blocks the holder until it is known.
CREATE UNIQUE INDEX holder_attempts_one_open ON holder_attempts (account_holder_id)
    WHERE state = 'in_flight' OR state = 'unknown' OR state = 'needs_operator';
CREATE INDEX holder_attempts_open ON holder_attempts (state)
    WHERE state = 'in_flight' OR state = 'unknown' OR state = 'needs_operator';
CREATE TRIGGER holder_attempts_kept BEFORE DELETE ON holder_attempts
BEGIN SELECT RAISE(ABORT, 'invariant: attempts are never deleted'); END;
CREATE TRIGGER holder_attempts_closed_stay_closed BEFORE UPDATE OF state ON holder_attempts
WHEN (OLD.state = 'succeeded' OR OLD.state = 'failed') AND NEW.state <> OLD.state
BEGIN SELECT RAISE(ABORT, 'invariant: a settled attempt cannot change'); END;

ALTER TABLE payment_sessions ADD COLUMN account_holder_id TEXT REFERENCES account_holders (id);
