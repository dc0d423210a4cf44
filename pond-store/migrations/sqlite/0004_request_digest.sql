-- Idempotency: SHA-256 of what a submit asked for, so a key reused for a different request is
-- refused instead of answered with the first run. NULL for runs stored before it was kept.
ALTER TABLE runs ADD COLUMN request_digest TEXT;
