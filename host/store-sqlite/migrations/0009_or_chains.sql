-- The same rules, written as OR chains: SQLite evaluates `x IN (three or more constants)` by
-- building a temporary B-tree on every statement that checks it, which was a third of the
-- writer's instructions. CHECK constraints cannot be altered, so the three tables that had such a
-- list are rebuilt (the 12-step procedure of SQLite's ALTER TABLE page, foreign keys off).
CREATE TABLE payment_sessions_new (
    id TEXT PRIMARY KEY,
    payment_collection_id TEXT NOT NULL REFERENCES payment_collections(id),
    cart_id TEXT,
    cart TEXT NOT NULL,
    context TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    is_selected INTEGER NOT NULL CHECK (is_selected IN (0, 1)),
    is_initiated INTEGER NOT NULL CHECK (is_initiated IN (0, 1)),
    status TEXT NOT NULL CHECK (status = 'pending' OR status = 'requires_more' OR status = 'authorized' OR status = 'error' OR status = 'canceled'),
    data TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency_code TEXT NOT NULL CHECK (length(currency_code) = 3),
    payment_authorized_at INTEGER,
    metadata TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);
INSERT INTO payment_sessions_new (id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version)
    SELECT id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version FROM payment_sessions ORDER BY rowid;
DROP TABLE payment_sessions;
ALTER TABLE payment_sessions_new RENAME TO payment_sessions;
CREATE INDEX payment_sessions_cart ON payment_sessions(cart_id);
CREATE INDEX payment_sessions_collection ON payment_sessions(payment_collection_id);
-- Terminal session states never move back.
CREATE TRIGGER payment_sessions_terminal BEFORE UPDATE OF status ON payment_sessions
WHEN (OLD.status = 'authorized' OR OLD.status = 'error' OR OLD.status = 'canceled') AND NEW.status <> OLD.status
BEGIN
    SELECT RAISE(ABORT, 'invariant: a terminal session status cannot change');
END;

CREATE TABLE attempts_new (
    id TEXT PRIMARY KEY,
    entity_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    payment_id TEXT,
    provider_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    amount INTEGER NOT NULL,
    currency_code TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state = 'in_flight' OR state = 'succeeded' OR state = 'failed' OR state = 'unknown' OR state = 'needs_operator'),
    outcome TEXT,
    error TEXT,
    reason TEXT,
    checks INTEGER NOT NULL,
    next_check_at INTEGER,
    resolution TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    call_deadline_at INTEGER,
    requested_by TEXT,
    resends INTEGER NOT NULL DEFAULT 0
);
INSERT INTO attempts_new (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, error, reason, checks, next_check_at, resolution, created_at, updated_at, call_deadline_at, requested_by, resends)
    SELECT id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, error, reason, checks, next_check_at, resolution, created_at, updated_at, call_deadline_at, requested_by, resends FROM attempts ORDER BY rowid;
DROP TABLE attempts;
ALTER TABLE attempts_new RENAME TO attempts;
-- At most one open attempt per session or payment: two racing operations cannot both call.
CREATE UNIQUE INDEX attempts_one_open ON attempts(entity_id)
    WHERE state = 'in_flight' OR state = 'unknown' OR state = 'needs_operator';
CREATE INDEX attempts_entity ON attempts(entity_id);
-- Failed and succeeded attempts are history: kept, and never reopened.
CREATE TRIGGER attempts_kept BEFORE DELETE ON attempts
BEGIN SELECT RAISE(ABORT, 'invariant: attempts are never deleted'); END;
CREATE TRIGGER attempts_closed_stay_closed BEFORE UPDATE OF state ON attempts
WHEN OLD.state IN ('succeeded','failed') AND NEW.state <> OLD.state
BEGIN SELECT RAISE(ABORT, 'invariant: a settled attempt cannot change'); END;

CREATE TABLE event_deliveries_new (
    id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    event_seq INTEGER NOT NULL,
    order_key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state = 'pending' OR state = 'delivered' OR state = 'parked'),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    first_tried_at INTEGER,
    claimed_by TEXT,
    claimed_until INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    delivered_at INTEGER
);
INSERT INTO event_deliveries_new (id, endpoint_id, event_seq, order_key, state, attempts, next_at, first_tried_at, claimed_by, claimed_until, last_error, created_at, delivered_at)
    SELECT id, endpoint_id, event_seq, order_key, state, attempts, next_at, first_tried_at, claimed_by, claimed_until, last_error, created_at, delivered_at FROM event_deliveries ORDER BY rowid;
DROP TABLE event_deliveries;
ALTER TABLE event_deliveries_new RENAME TO event_deliveries;
CREATE INDEX event_deliveries_open ON event_deliveries (endpoint_id, order_key, event_seq) WHERE state <> 'delivered';
CREATE INDEX event_deliveries_event ON event_deliveries (event_seq);
