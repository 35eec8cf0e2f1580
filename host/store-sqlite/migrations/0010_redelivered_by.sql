-- Who sent a parked delivery again, and when (as an attempt records who resolved it).
ALTER TABLE event_deliveries ADD COLUMN redelivered_by TEXT;
ALTER TABLE event_deliveries ADD COLUMN redelivered_at INTEGER;
