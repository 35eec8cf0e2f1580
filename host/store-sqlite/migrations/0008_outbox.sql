-- The outbox: one row per committed change, numbered in commit order (AUTOINCREMENT: a number
-- is never reused, and a rolled-back write takes none).
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    collection_id TEXT,
    session_id TEXT,
    payment_id TEXT,
    attempt_id TEXT,
    amount INTEGER,
    currency_code TEXT,
    created_at INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE event_deliveries (
    id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    event_seq INTEGER NOT NULL,
    order_key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'parked')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    first_tried_at INTEGER,
    claimed_by TEXT,
    claimed_until INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    delivered_at INTEGER
);
CREATE INDEX event_deliveries_open ON event_deliveries (endpoint_id, order_key, event_seq) WHERE state <> 'delivered';
CREATE INDEX event_deliveries_event ON event_deliveries (event_seq);
CREATE TABLE event_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT INTO event_meta (k, v) VALUES ('pruned_through', 0);
