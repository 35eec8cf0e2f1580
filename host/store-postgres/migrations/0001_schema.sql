CREATE TABLE payment_collections (
    id TEXT PRIMARY KEY,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency_code TEXT NOT NULL CHECK (length(currency_code) = 3),
    metadata TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE payment_sessions (
    id TEXT PRIMARY KEY,
    payment_collection_id TEXT NOT NULL REFERENCES payment_collections(id),
    cart_id TEXT,
    cart TEXT NOT NULL,
    context TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    is_selected BOOLEAN NOT NULL,
    is_initiated BOOLEAN NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending','requires_more','authorized','error','canceled')),
    data TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency_code TEXT NOT NULL CHECK (length(currency_code) = 3),
    payment_authorized_at BIGINT,
    metadata TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);
CREATE INDEX payment_sessions_cart ON payment_sessions(cart_id);
CREATE INDEX payment_sessions_collection ON payment_sessions(payment_collection_id);
CREATE FUNCTION payhost_invariant(message TEXT) RETURNS void AS $$
BEGIN RAISE EXCEPTION 'invariant: %', message; END $$ LANGUAGE plpgsql;
CREATE FUNCTION payment_sessions_terminal() RETURNS trigger AS $$
BEGIN
    IF OLD.status IN ('authorized','error','canceled') AND NEW.status <> OLD.status THEN
        PERFORM payhost_invariant('a terminal session status cannot change');
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER payment_sessions_terminal BEFORE UPDATE ON payment_sessions
    FOR EACH ROW EXECUTE FUNCTION payment_sessions_terminal();

CREATE TABLE payments (
    id TEXT PRIMARY KEY,
    payment_session_id TEXT NOT NULL UNIQUE REFERENCES payment_sessions(id),
    payment_collection_id TEXT NOT NULL REFERENCES payment_collections(id),
    provider_id TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency_code TEXT NOT NULL CHECK (length(currency_code) = 3),
    data TEXT NOT NULL,
    captured_at BIGINT,
    canceled_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);
CREATE INDEX payments_collection ON payments(payment_collection_id);
CREATE TABLE captures (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments(id),
    amount BIGINT NOT NULL CHECK (amount > 0),
    attempt_id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE INDEX captures_payment ON captures(payment_id);
CREATE TABLE refunds (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments(id),
    amount BIGINT NOT NULL CHECK (amount > 0),
    reason TEXT,
    attempt_id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE INDEX refunds_payment ON refunds(payment_id);

-- Money movements serialize on their payment's row, so concurrent inserts from two hosts
-- cannot both pass the sum checks.
CREATE FUNCTION payments_guard() RETURNS trigger AS $$
BEGIN
    IF OLD.canceled_at IS NULL AND NEW.canceled_at IS NOT NULL
       AND EXISTS (SELECT 1 FROM captures WHERE payment_id = NEW.id) THEN
        PERFORM payhost_invariant('a payment with captures cannot be canceled');
    END IF;
    IF OLD.canceled_at IS NOT NULL AND NEW.canceled_at IS DISTINCT FROM OLD.canceled_at THEN
        PERFORM payhost_invariant('a canceled payment stays canceled');
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER payments_guard BEFORE UPDATE ON payments
    FOR EACH ROW EXECUTE FUNCTION payments_guard();
CREATE FUNCTION captures_guard() RETURNS trigger AS $$
DECLARE p payments%ROWTYPE;
BEGIN
    SELECT * INTO p FROM payments WHERE id = NEW.payment_id FOR UPDATE;
    IF p.canceled_at IS NOT NULL THEN
        PERFORM payhost_invariant('a canceled payment cannot be captured');
    END IF;
    IF (SELECT COALESCE(SUM(amount), 0) FROM captures WHERE payment_id = NEW.payment_id) + NEW.amount > p.amount THEN
        PERFORM payhost_invariant('captures would exceed the payment amount');
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER captures_guard BEFORE INSERT ON captures
    FOR EACH ROW EXECUTE FUNCTION captures_guard();
CREATE FUNCTION refunds_guard() RETURNS trigger AS $$
DECLARE p payments%ROWTYPE;
BEGIN
    SELECT * INTO p FROM payments WHERE id = NEW.payment_id FOR UPDATE;
    IF p.canceled_at IS NOT NULL THEN
        PERFORM payhost_invariant('a canceled payment cannot be refunded');
    END IF;
    IF (SELECT COALESCE(SUM(amount), 0) FROM refunds WHERE payment_id = NEW.payment_id) + NEW.amount
       > (SELECT COALESCE(SUM(amount), 0) FROM captures WHERE payment_id = NEW.payment_id) THEN
        PERFORM payhost_invariant('refunds would exceed captures');
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER refunds_guard BEFORE INSERT ON refunds
    FOR EACH ROW EXECUTE FUNCTION refunds_guard();
CREATE FUNCTION movements_immutable() RETURNS trigger AS $$
BEGIN PERFORM payhost_invariant('captures, refunds and attempts are never changed or deleted'); RETURN NULL; END $$ LANGUAGE plpgsql;
CREATE TRIGGER captures_immutable BEFORE UPDATE OR DELETE ON captures
    FOR EACH ROW EXECUTE FUNCTION movements_immutable();
CREATE TRIGGER refunds_immutable BEFORE UPDATE OR DELETE ON refunds
    FOR EACH ROW EXECUTE FUNCTION movements_immutable();

CREATE TABLE attempts (
    id TEXT PRIMARY KEY,
    entity_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    payment_id TEXT,
    provider_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    amount BIGINT NOT NULL,
    currency_code TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('in_flight','succeeded','failed','unknown','needs_operator')),
    outcome TEXT,
    error TEXT,
    reason TEXT,
    checks BIGINT NOT NULL,
    next_check_at BIGINT,
    resolution TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX attempts_one_open ON attempts(entity_id)
    WHERE state IN ('in_flight','unknown','needs_operator');
CREATE INDEX attempts_entity ON attempts(entity_id);
CREATE TRIGGER attempts_kept BEFORE DELETE ON attempts
    FOR EACH ROW EXECUTE FUNCTION movements_immutable();
CREATE FUNCTION attempts_closed() RETURNS trigger AS $$
BEGIN
    IF OLD.state IN ('succeeded','failed') AND NEW.state <> OLD.state THEN
        PERFORM payhost_invariant('a settled attempt cannot change');
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER attempts_closed BEFORE UPDATE ON attempts
    FOR EACH ROW EXECUTE FUNCTION attempts_closed();

CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT,
    created_at BIGINT NOT NULL
);
