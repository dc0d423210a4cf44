-- no-transaction
-- A local driver claims by executor kind (`noop`, `shell`, …): without the kind in an index it
-- scanned every queued pooled stage (16.6 ms per claim with 100,000 queued for a pool; 0.15 ms
-- with this index, EXPLAIN ANALYZE on PostgreSQL 15). Built without blocking writes (a rolling
-- upgrade keeps serving), so alone in its file.
CREATE INDEX CONCURRENTLY IF NOT EXISTS stages_ready_by_kind ON stages (executor_kind, ready_at) WHERE state = 'queued' AND ready_at IS NOT NULL;
