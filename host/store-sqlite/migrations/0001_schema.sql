CREATE TABLE payment_collections (
    id TEXT PRIMARY KEY,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency_code TEXT NOT NULL CHECK (length(currency_code) = 3),
    metadata TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE payment_sessions (
    id TEXT PRIMARY KEY,
    payment_collection_id TEXT NOT NULL REFERENCES payment_collections(id),
    cart_id TEXT,
    cart TEXT NOT NULL,
    context TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    is_selected INTEGER NOT NULL CHECK (is_selected IN (0, 1)),
    is_initiated INTEGER NOT NULL CHECK (is_initiated IN (0, 1)),
    status TEXT NOT NULL CHECK (status IN ('pending','requires_more','authorized','error','canceled')),
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
CREATE INDEX payment_sessions_cart ON payment_sessions(cart_id);
CREATE INDEX payment_sessions_collection ON payment_sessions(payment_collection_id);
-- Terminal session states never move back.
CREATE TRIGGER payment_sessions_terminal BEFORE UPDATE OF status ON payment_sessions
WHEN OLD.status IN ('authorized','error','canceled') AND NEW.status <> OLD.status
BEGIN
    SELECT RAISE(ABORT, 'invariant: a terminal session status cannot change');
END;

CREATE TABLE payments (
    id TEXT PRIMARY KEY,
    payment_session_id TEXT NOT NULL UNIQUE REFERENCES payment_sessions(id),
    payment_collection_id TEXT NOT NULL REFERENCES payment_collections(id),
    provider_id TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency_code TEXT NOT NULL CHECK (length(currency_code) = 3),
    data TEXT NOT NULL,
    captured_at INTEGER,
    canceled_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX payments_collection ON payments(payment_collection_id);
CREATE TRIGGER payments_cancel_uncaptured BEFORE UPDATE OF canceled_at ON payments
WHEN NEW.canceled_at IS NOT NULL AND OLD.canceled_at IS NULL
BEGIN
    SELECT RAISE(ABORT, 'invariant: a payment with captures cannot be canceled')
    WHERE EXISTS (SELECT 1 FROM captures WHERE payment_id = NEW.id);
END;
CREATE TRIGGER payments_never_uncancel BEFORE UPDATE OF canceled_at ON payments
WHEN OLD.canceled_at IS NOT NULL AND (NEW.canceled_at IS NULL OR NEW.canceled_at <> OLD.canceled_at)
BEGIN
    SELECT RAISE(ABORT, 'invariant: a canceled payment stays canceled');
END;

CREATE TABLE captures (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments(id),
    amount INTEGER NOT NULL CHECK (amount > 0),
    attempt_id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE INDEX captures_payment ON captures(payment_id);
CREATE TRIGGER captures_within_amount BEFORE INSERT ON captures
BEGIN
    SELECT RAISE(ABORT, 'invariant: captures would exceed the payment amount')
    WHERE (SELECT COALESCE(SUM(amount), 0) FROM captures WHERE payment_id = NEW.payment_id)
          + NEW.amount > (SELECT amount FROM payments WHERE id = NEW.payment_id);
    SELECT RAISE(ABORT, 'invariant: a canceled payment cannot be captured')
    WHERE (SELECT canceled_at FROM payments WHERE id = NEW.payment_id) IS NOT NULL;
END;

CREATE TABLE refunds (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments(id),
    amount INTEGER NOT NULL CHECK (amount > 0),
    reason TEXT,
    attempt_id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE INDEX refunds_payment ON refunds(payment_id);
CREATE TRIGGER refunds_within_captures BEFORE INSERT ON refunds
BEGIN
    SELECT RAISE(ABORT, 'invariant: refunds would exceed captures')
    WHERE (SELECT COALESCE(SUM(amount), 0) FROM refunds WHERE payment_id = NEW.payment_id)
          + NEW.amount > (SELECT COALESCE(SUM(amount), 0) FROM captures WHERE payment_id = NEW.payment_id);
    SELECT RAISE(ABORT, 'invariant: a canceled payment cannot be refunded')
    WHERE (SELECT canceled_at FROM payments WHERE id = NEW.payment_id) IS NOT NULL;
END;
-- Captures and refunds are money that moved: never changed, never deleted.
CREATE TRIGGER captures_immutable BEFORE UPDATE ON captures
BEGIN SELECT RAISE(ABORT, 'invariant: captures are immutable'); END;
CREATE TRIGGER captures_kept BEFORE DELETE ON captures
BEGIN SELECT RAISE(ABORT, 'invariant: captures are never deleted'); END;
CREATE TRIGGER refunds_immutable BEFORE UPDATE ON refunds
BEGIN SELECT RAISE(ABORT, 'invariant: refunds are immutable'); END;
CREATE TRIGGER refunds_kept BEFORE DELETE ON refunds
BEGIN SELECT RAISE(ABORT, 'invariant: refunds are never deleted'); END;

CREATE TABLE attempts (
    id TEXT PRIMARY KEY,
    entity_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    payment_id TEXT,
    provider_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    amount INTEGER NOT NULL,
    currency_code TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('in_flight','succeeded','failed','unknown','needs_operator')),
    outcome TEXT,
    error TEXT,
    reason TEXT,
    checks INTEGER NOT NULL,
    next_check_at INTEGER,
    resolution TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
-- At most one open attempt per session or payment: two racing operations cannot both call.
CREATE UNIQUE INDEX attempts_one_open ON attempts(entity_id)
    WHERE state IN ('in_flight','unknown','needs_operator');
CREATE INDEX attempts_entity ON attempts(entity_id);
-- Failed and succeeded attempts are history: kept, and never reopened.
CREATE TRIGGER attempts_kept BEFORE DELETE ON attempts
BEGIN SELECT RAISE(ABORT, 'invariant: attempts are never deleted'); END;
CREATE TRIGGER attempts_closed_stay_closed BEFORE UPDATE OF state ON attempts
WHEN OLD.state IN ('succeeded','failed') AND NEW.state <> OLD.state
BEGIN SELECT RAISE(ABORT, 'invariant: a settled attempt cannot change'); END;

CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT,
    created_at INTEGER NOT NULL
);
