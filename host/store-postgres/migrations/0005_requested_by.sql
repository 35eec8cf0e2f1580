ALTER TABLE attempts ADD COLUMN requested_by TEXT;
