-- no-transaction
-- Retention finds the oldest ended runs by this index instead of sorting every ended run.
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_finished ON runs (finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled');
