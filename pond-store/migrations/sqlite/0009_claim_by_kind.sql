-- A local driver claims by executor kind (`noop`, `shell`, …): without the kind in an index it
-- walked every queued pooled stage under the writer lock (35 ms per claim with 100,000 queued
-- for a pool; 3 ms with this index, sqlite3 CLI timings).
CREATE INDEX stages_ready_by_kind ON stages (executor_kind, ready_at) WHERE state = 'queued' AND ready_at IS NOT NULL;
-- Whether any artifact still holds a blob is a lookup; retention finds the oldest ended runs.
CREATE INDEX artifacts_by_blob ON artifacts (blob_id);
CREATE INDEX runs_finished ON runs (finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled');
