-- no-transaction
-- Whether any artifact still holds a blob (a replaced artifact's, a retired run's) is a lookup.
CREATE INDEX CONCURRENTLY IF NOT EXISTS artifacts_by_blob ON artifacts (blob_id);
