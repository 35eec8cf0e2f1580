-- When the attempt's provider call stops waiting: until then, plus a margin, a "not attempted"
-- from the provider proves nothing (the call may still land).
ALTER TABLE attempts ADD COLUMN call_deadline_at INTEGER;
