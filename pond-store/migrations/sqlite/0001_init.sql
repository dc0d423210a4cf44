-- Pond's SQLite schema, version 1. Released migrations are never edited; add a new file.
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,      -- UUIDv7: sorts by creation time
    project_id       TEXT NOT NULL,
    state            TEXT NOT NULL,
    idempotency_key  TEXT,
    definition       TEXT NOT NULL,         -- JSON, immutable
    sources          TEXT NOT NULL,         -- JSON, `resolved` filled on first fetch
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
);
CREATE UNIQUE INDEX runs_idempotency ON runs (project_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_by_project ON runs (project_id, id);
CREATE INDEX runs_by_state ON runs (state, id);

CREATE TABLE stages (
    run_id           TEXT NOT NULL REFERENCES runs (id),
    key              TEXT NOT NULL,
    position         INTEGER NOT NULL,
    executor_kind    TEXT NOT NULL,
    state            TEXT NOT NULL,
    ready_at         INTEGER,
    attempt          INTEGER NOT NULL DEFAULT 0,
    failures         INTEGER NOT NULL DEFAULT 0,
    lost_leases      INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    started_at       INTEGER,
    finished_at      INTEGER,
    error            TEXT,
    exit_code        INTEGER,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX stages_ready ON stages (ready_at) WHERE state = 'queued' AND ready_at IS NOT NULL;
CREATE INDEX stages_leased ON stages (lease_expires_at) WHERE state = 'running';

CREATE TABLE attempts (
    run_id      TEXT NOT NULL,
    stage_key   TEXT NOT NULL,
    number      INTEGER NOT NULL,
    owner       TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    outcome     TEXT,
    error       TEXT,
    PRIMARY KEY (run_id, stage_key, number)
);

CREATE TABLE logs (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  TEXT NOT NULL,
    stage   TEXT,
    attempt INTEGER NOT NULL,
    stream  TEXT NOT NULL,
    at      INTEGER NOT NULL,
    text    TEXT NOT NULL
);
CREATE INDEX logs_by_run ON logs (run_id, seq);

CREATE TABLE blobs (
    id         TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE blob_chunks (
    blob_id TEXT NOT NULL,
    idx     INTEGER NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (blob_id, idx)
);

CREATE TABLE artifacts (
    run_id     TEXT NOT NULL,
    name       TEXT NOT NULL,
    stage      TEXT NOT NULL,
    blob_id    TEXT NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, name)
);

CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    projects      TEXT NOT NULL,            -- JSON array
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
