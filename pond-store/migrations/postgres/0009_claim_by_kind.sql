-- A local driver claims by executor kind (`noop`, `shell`, …): without the kind in an index it
-- scanned every queued pooled stage (16.6 ms per claim with 100,000 queued for a pool; 0.15 ms
-- with this index, EXPLAIN ANALYZE on PostgreSQL 15).
-- (Plain CREATE INDEX, in the migration's transaction: CONCURRENTLY deadlocks with the other
-- nodes waiting on the migration lock when several start at once. The build holds writes to
-- the table while it runs: seconds for millions of rows.)
CREATE INDEX stages_ready_by_kind ON stages (executor_kind, ready_at) WHERE state = 'queued' AND ready_at IS NOT NULL;
-- Whether any artifact still holds a blob (a replaced artifact's, a retired run's) is a lookup.
CREATE INDEX artifacts_by_blob ON artifacts (blob_id);
-- Retention finds the oldest ended runs by this index instead of sorting every ended run.
CREATE INDEX runs_finished ON runs (finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled');
