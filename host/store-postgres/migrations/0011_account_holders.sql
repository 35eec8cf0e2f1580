-- Account holders (a customer's record at one provider), the payment methods saved to them, and
-- the attempts that record each provider call changing them before it is made. A session may
-- name the holder whose saved methods pay it; `payhost_write` is migration 10's with that
-- column in `insert_session` (holder writes take the statement-per-op path).
CREATE TABLE account_holders (
    id TEXT PRIMARY KEY,
    provider_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    customer TEXT NOT NULL,
    reference TEXT,
    data TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending','active','deleted','failed')),
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);
-- One live holder per customer and provider: two racing creates cannot both reach the provider.
CREATE UNIQUE INDEX account_holders_one_live ON account_holders (provider_id, customer_id)
    WHERE status IN ('pending','active');
CREATE INDEX account_holders_customer ON account_holders (customer_id);

CREATE TABLE payment_methods (
    id TEXT PRIMARY KEY,
    account_holder_id TEXT NOT NULL REFERENCES account_holders (id),
    provider_id TEXT NOT NULL,
    reference TEXT,
    data TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending','saved','deleted','failed')),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);
CREATE INDEX payment_methods_holder ON payment_methods (account_holder_id);

CREATE TABLE holder_attempts (
    id TEXT PRIMARY KEY,
    account_holder_id TEXT NOT NULL REFERENCES account_holders (id),
    payment_method_id TEXT REFERENCES payment_methods (id),
    provider_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('in_flight','succeeded','failed','unknown','needs_operator')),
    detail TEXT NOT NULL,
    outcome TEXT,
    error TEXT,
    checks BIGINT NOT NULL,
    next_check_at BIGINT,
    call_deadline_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);
-- At most one open attempt per holder: an unknown one blocks the holder until it is known.
CREATE UNIQUE INDEX holder_attempts_one_open ON holder_attempts (account_holder_id)
    WHERE state IN ('in_flight','unknown','needs_operator');
CREATE INDEX holder_attempts_open ON holder_attempts (state)
    WHERE state IN ('in_flight','unknown','needs_operator');

-- Deleted and failed holders and methods, and settled attempts, never change again; attempts
-- are never deleted.
CREATE FUNCTION payhost_holders_terminal() RETURNS TRIGGER AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'invariant: attempts are never deleted';
    END IF;
    IF TG_TABLE_NAME = 'holder_attempts' THEN
        IF OLD.state IN ('succeeded','failed') AND NEW.state <> OLD.state THEN
            RAISE EXCEPTION 'invariant: a settled attempt cannot change';
        END IF;
    ELSIF OLD.status IN ('deleted','failed') AND NEW.status <> OLD.status THEN
        RAISE EXCEPTION 'invariant: a deleted or failed % cannot change', TG_TABLE_NAME;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER account_holders_terminal BEFORE UPDATE ON account_holders
    FOR EACH ROW EXECUTE FUNCTION payhost_holders_terminal();
CREATE TRIGGER payment_methods_terminal BEFORE UPDATE ON payment_methods
    FOR EACH ROW EXECUTE FUNCTION payhost_holders_terminal();
CREATE TRIGGER holder_attempts_terminal BEFORE UPDATE OR DELETE ON holder_attempts
    FOR EACH ROW EXECUTE FUNCTION payhost_holders_terminal();

ALTER TABLE payment_sessions ADD COLUMN account_holder_id TEXT REFERENCES account_holders (id);

CREATE OR REPLACE FUNCTION payhost_write(ops JSONB, me_host TEXT, me_epoch BIGINT) RETURNS VOID AS $$
DECLARE
    op JSONB;
    kind TEXT;
BEGIN
    FOR op IN SELECT value FROM jsonb_array_elements(ops) LOOP
        kind := op->>'op';
        IF kind = 'insert_collection' THEN
            INSERT INTO payment_collections (id, amount, currency_code, metadata, created_at, updated_at)
            VALUES (op->>'id', (op->>'amount')::BIGINT, op->>'currency_code', op->>'metadata',
                    (op->>'created_at')::BIGINT, (op->>'updated_at')::BIGINT);
        ELSIF kind = 'insert_session' THEN
            INSERT INTO payment_sessions (id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version, reference, account_holder_id)
            VALUES (op->>'id', op->>'payment_collection_id', op->>'cart_id', op->>'cart', op->>'context', op->>'provider_id',
                    (op->>'is_selected')::BOOLEAN, (op->>'is_initiated')::BOOLEAN, op->>'status', op->>'data', op->>'idempotency_key',
                    (op->>'amount')::BIGINT, op->>'currency_code', (op->>'payment_authorized_at')::BIGINT, op->>'metadata',
                    (op->>'created_at')::BIGINT, (op->>'updated_at')::BIGINT, (op->>'version')::BIGINT, op->>'reference', op->>'account_holder_id');
        ELSIF kind = 'update_session' THEN
            UPDATE payment_sessions SET cart_id = op->>'cart_id', cart = op->>'cart', context = op->>'context',
                   is_selected = (op->>'is_selected')::BOOLEAN, is_initiated = (op->>'is_initiated')::BOOLEAN,
                   status = op->>'status', data = op->>'data', amount = (op->>'amount')::BIGINT,
                   payment_authorized_at = (op->>'payment_authorized_at')::BIGINT, metadata = op->>'metadata',
                   updated_at = (op->>'updated_at')::BIGINT, version = (op->>'version')::BIGINT
             WHERE id = op->>'id' AND version = (op->>'expected_version')::BIGINT;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'PH001', MESSAGE = op->>'id';
            END IF;
        ELSIF kind = 'insert_attempt' THEN
            INSERT INTO attempts (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, error, reason, checks, next_check_at, resolution, created_at, updated_at, call_deadline_at, requested_by, owner_host, owner_epoch)
            SELECT op->>'id', op->>'entity_id', op->>'session_id', op->>'payment_id', op->>'provider_id', op->>'operation',
                   (op->>'amount')::BIGINT, op->>'currency_code', op->>'idempotency_key', op->>'state', op->>'outcome',
                   op->>'error', op->>'reason', (op->>'checks')::BIGINT, (op->>'next_check_at')::BIGINT, op->>'resolution',
                   (op->>'created_at')::BIGINT, (op->>'updated_at')::BIGINT,
                   payhost_now_ms() + (op->>'call_ms')::BIGINT, op->>'requested_by', me_host, me_epoch
             WHERE me_host IS NULL OR payhost_host_live(me_host, me_epoch);
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'PH002', MESSAGE = 'starting attempt ' || (op->>'id');
            END IF;
        ELSIF kind = 'update_attempt' THEN
            UPDATE attempts SET state = op->>'state', outcome = op->>'outcome', error = op->>'error',
                   checks = (op->>'checks')::BIGINT, next_check_at = (op->>'next_check_at')::BIGINT,
                   resolution = op->>'resolution', updated_at = (op->>'updated_at')::BIGINT
             WHERE id = op->>'id' AND (owner_host IS NULL OR me_host IS NULL OR (owner_host = me_host AND owner_epoch = me_epoch));
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'PH002', MESSAGE = 'writing attempt ' || (op->>'id');
            END IF;
        ELSIF kind = 'insert_payment' THEN
            INSERT INTO payments (id, payment_session_id, payment_collection_id, provider_id, amount, currency_code, data, captured_at, canceled_at, created_at, updated_at, version)
            VALUES (op->>'id', op->>'payment_session_id', op->>'payment_collection_id', op->>'provider_id',
                    (op->>'amount')::BIGINT, op->>'currency_code', op->>'data', (op->>'captured_at')::BIGINT,
                    (op->>'canceled_at')::BIGINT, (op->>'created_at')::BIGINT, (op->>'updated_at')::BIGINT, (op->>'version')::BIGINT);
        ELSIF kind = 'update_payment' THEN
            UPDATE payments SET data = op->>'data', captured_at = (op->>'captured_at')::BIGINT,
                   canceled_at = (op->>'canceled_at')::BIGINT, updated_at = (op->>'updated_at')::BIGINT,
                   version = (op->>'version')::BIGINT
             WHERE id = op->>'id' AND version = (op->>'expected_version')::BIGINT;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'PH001', MESSAGE = op->>'id';
            END IF;
        ELSIF kind = 'insert_capture' THEN
            INSERT INTO captures (id, payment_id, amount, attempt_id, created_at)
            VALUES (op->>'id', op->>'payment_id', (op->>'amount')::BIGINT, op->>'attempt_id', (op->>'created_at')::BIGINT);
        ELSIF kind = 'insert_refund' THEN
            INSERT INTO refunds (id, payment_id, amount, reason, attempt_id, created_at)
            VALUES (op->>'id', op->>'payment_id', (op->>'amount')::BIGINT, op->>'reason', op->>'attempt_id', (op->>'created_at')::BIGINT);
        ELSIF kind = 'claim_key' THEN
            INSERT INTO idempotency_keys AS k (key, operation, request_hash, response, created_at, owner_host, owner_epoch, claim_id)
            VALUES (op->>'key', op->>'operation', op->>'request_hash', NULL, (op->>'at')::BIGINT, me_host, me_epoch, op->>'claim_id')
            ON CONFLICT (key) DO UPDATE SET operation = EXCLUDED.operation, request_hash = EXCLUDED.request_hash,
                   created_at = EXCLUDED.created_at, owner_host = EXCLUDED.owner_host, owner_epoch = EXCLUDED.owner_epoch,
                   claim_id = EXCLUDED.claim_id
             WHERE k.response IS NULL AND k.attempt_id IS NULL AND NOT payhost_host_live(k.owner_host, k.owner_epoch);
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'PH003', MESSAGE = op->>'key';
            END IF;
        ELSIF kind = 'complete_key' THEN
            UPDATE idempotency_keys SET response = op->>'response'
             WHERE key = op->>'key' AND (owner_host IS NULL OR me_host IS NULL OR (owner_host = me_host AND owner_epoch = me_epoch));
        ELSIF kind = 'release_key' THEN
            DELETE FROM idempotency_keys WHERE key = op->>'key' AND response IS NULL AND attempt_id IS NULL
               AND claim_id IS NOT DISTINCT FROM op->>'claim_id';
        ELSIF kind = 'forget_key' THEN
            DELETE FROM idempotency_keys WHERE key = op->>'key' AND attempt_id = op->>'attempt_id';
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'PH003', MESSAGE = op->>'key';
            END IF;
        ELSIF kind = 'link_key' THEN
            UPDATE idempotency_keys SET attempt_id = op->>'attempt_id'
             WHERE key = op->>'key' AND (owner_host IS NULL OR me_host IS NULL OR (owner_host = me_host AND owner_epoch = me_epoch));
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'PH002', MESSAGE = 'linking key ' || (op->>'key');
            END IF;
        ELSIF kind = 'insert_webhook_event' THEN
            INSERT INTO webhook_events (provider_id, event_id, body, session_id, action, received_at, applied_at)
            VALUES (op->>'provider_id', op->>'event_id', op->>'body', op->>'session_id', op->>'action', (op->>'received_at')::BIGINT, NULL);
        ELSIF kind = 'mark_webhook_applied' THEN
            UPDATE webhook_events SET applied_at = (op->>'at')::BIGINT WHERE provider_id = op->>'provider_id' AND event_id = op->>'event_id';
        ELSIF kind = 'append_event' THEN
            WITH ev AS (
                INSERT INTO events (id, type, collection_id, session_id, payment_id, attempt_id, amount, currency_code, created_at, data)
                VALUES (op->>'id', op->>'type', op->>'collection_id', op->>'session_id', op->>'payment_id', op->>'attempt_id',
                        (op->>'amount')::BIGINT, op->>'currency_code', (op->>'created_at')::BIGINT, op->>'data')
                ON CONFLICT (id) DO NOTHING RETURNING pos)
            INSERT INTO event_deliveries (id, endpoint_id, event_pos, order_key, state, next_at, created_at)
            SELECT (op->>'id') || ':' || ep, ep, ev.pos, op->>'order_key', 'pending', payhost_now_ms(), payhost_now_ms()
              FROM ev, jsonb_array_elements_text(op->'deliver_to') AS ep;
        ELSE
            RAISE EXCEPTION 'payhost_write: unknown op %', kind;
        END IF;
    END LOOP;
END
$$ LANGUAGE plpgsql VOLATILE;
