-- Webhooks as received (after verification), applied once per (provider, event id).
CREATE TABLE webhook_events (
    provider_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    body TEXT NOT NULL,
    session_id TEXT,
    action TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    applied_at INTEGER,
    PRIMARY KEY (provider_id, event_id)
);
