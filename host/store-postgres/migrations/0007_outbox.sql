-- The outbox. A write inserts its events with no number (`pos` is only insertion order: a
-- sequence, with gaps, not in commit order); the sequencer numbers committed ones afterwards
-- (`payhost_sequence_events`), one host at a time, so `seq` is gap-free and a number is never
-- given below one a reader may already have seen. Writes never wait for one another here.
CREATE TABLE event_seq (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), last BIGINT NOT NULL);
INSERT INTO event_seq (one, last) VALUES (true, 0);
CREATE TABLE events (
    pos BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq BIGINT UNIQUE,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    collection_id TEXT,
    session_id TEXT,
    payment_id TEXT,
    attempt_id TEXT,
    amount BIGINT,
    currency_code TEXT,
    created_at BIGINT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX events_unsequenced ON events (pos) WHERE seq IS NULL;
CREATE TABLE event_deliveries (
    id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    event_pos BIGINT NOT NULL,
    order_key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'parked')),
    attempts BIGINT NOT NULL DEFAULT 0,
    next_at BIGINT NOT NULL,
    first_tried_at BIGINT,
    claimed_by TEXT,
    claimed_until BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    delivered_at BIGINT
);
CREATE INDEX event_deliveries_open ON event_deliveries (endpoint_id, order_key, event_pos) WHERE state <> 'delivered';
CREATE INDEX event_deliveries_due ON event_deliveries (next_at) WHERE state = 'pending';
CREATE INDEX event_deliveries_event ON event_deliveries (event_pos);
CREATE TABLE event_meta (k TEXT PRIMARY KEY, v BIGINT NOT NULL);
-- Numbers the committed events that have none, in insertion order, after the last number given.
-- Under a transaction-scoped advisory lock, so sequencers (one per host) take turns; every
-- statement of a VOLATILE function sees what committed before it started, so once the lock is
-- held the counter and the unnumbered rows are read as the previous sequencer left them.
-- Returns how many it numbered.
CREATE FUNCTION payhost_sequence_events() RETURNS BIGINT AS $$
DECLARE
    base BIGINT;
    n BIGINT;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM events WHERE seq IS NULL) THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(7378697629483820646);
    SELECT last INTO base FROM event_seq;
    WITH todo AS (
        SELECT pos, row_number() OVER (ORDER BY pos) AS k FROM events WHERE seq IS NULL ORDER BY pos LIMIT 10000
    )
    UPDATE events e SET seq = base + todo.k FROM todo WHERE e.pos = todo.pos;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        UPDATE event_seq SET last = base + n;
    END IF;
    RETURN n;
END
$$ LANGUAGE plpgsql VOLATILE;
INSERT INTO event_meta (k, v) VALUES ('pruned_through', 0);
