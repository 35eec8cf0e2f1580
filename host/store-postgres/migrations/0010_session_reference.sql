-- The caller's own id for a session (a Medusa session id), so a caller that kept only its own
-- id finds the session; sessions are listed by it. `payhost_write` is migration 8's with the
-- reference in `insert_session`.
ALTER TABLE payment_sessions ADD COLUMN reference TEXT;
CREATE INDEX payment_sessions_reference ON payment_sessions (reference) WHERE reference IS NOT NULL;

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
            INSERT INTO payment_sessions (id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version, reference)
            VALUES (op->>'id', op->>'payment_collection_id', op->>'cart_id', op->>'cart', op->>'context', op->>'provider_id',
                    (op->>'is_selected')::BOOLEAN, (op->>'is_initiated')::BOOLEAN, op->>'status', op->>'data', op->>'idempotency_key',
                    (op->>'amount')::BIGINT, op->>'currency_code', (op->>'payment_authorized_at')::BIGINT, op->>'metadata',
                    (op->>'created_at')::BIGINT, (op->>'updated_at')::BIGINT, (op->>'version')::BIGINT, op->>'reference');
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
