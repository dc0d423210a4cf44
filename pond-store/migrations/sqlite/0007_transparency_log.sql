-- The transparency log: an append-only list of leaves (consumer-signed requests, pooled stages'
-- attestations), index by index. Its Merkle tree (RFC 6962) is computed from the leaf hashes.
CREATE TABLE transparency_log (
    idx        INTEGER PRIMARY KEY,
    run_id     TEXT NOT NULL,
    leaf       TEXT NOT NULL,
    leaf_hash  BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX transparency_log_by_run ON transparency_log (run_id);
