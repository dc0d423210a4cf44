-- Byte-exact, idempotent log lines.
-- flags: 1 = the line continues in the next record (it was longer than one record holds),
--        2 = `text` is base64 of the line's bytes (not UTF-8, or holding NUL, which TEXT cannot).
-- line_seq: the producer's number for the line within its attempt; a line delivered twice
--           (a retried batch) is stored once.
ALTER TABLE logs ADD COLUMN flags BIGINT NOT NULL DEFAULT 0;
ALTER TABLE logs ADD COLUMN line_seq BIGINT;
CREATE UNIQUE INDEX logs_by_producer ON logs (run_id, stage, attempt, line_seq) WHERE line_seq IS NOT NULL;

-- A pool worker's claim first asks whether the worker already holds a live lease.
CREATE INDEX stages_by_lease_owner ON stages (lease_owner) WHERE state = 'running';
