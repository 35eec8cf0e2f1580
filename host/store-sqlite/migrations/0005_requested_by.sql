-- The API key id of the request that started the attempt.
ALTER TABLE attempts ADD COLUMN requested_by TEXT;
