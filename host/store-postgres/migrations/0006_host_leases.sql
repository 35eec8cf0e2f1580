-- Host leases, on the database's clock: who owns what is decided here, never by a host's clock.
CREATE SEQUENCE host_epochs;
CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL,
    info TEXT NOT NULL
);
ALTER TABLE attempts ADD COLUMN owner_host TEXT, ADD COLUMN owner_epoch BIGINT;
ALTER TABLE idempotency_keys ADD COLUMN owner_host TEXT, ADD COLUMN owner_epoch BIGINT;
ALTER TABLE attempts ADD COLUMN resends BIGINT NOT NULL DEFAULT 0;
ALTER TABLE idempotency_keys ADD COLUMN claim_id TEXT;
CREATE FUNCTION payhost_now_ms() RETURNS BIGINT AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
$$ LANGUAGE sql VOLATILE;
CREATE FUNCTION payhost_host_live(h TEXT, e BIGINT) RETURNS BOOLEAN AS $$
    SELECT EXISTS (SELECT 1 FROM hosts WHERE id = h AND epoch = e AND lease_expires_at > payhost_now_ms())
$$ LANGUAGE sql VOLATILE;
