-- Pond's PostgreSQL schema, version 1. Released migrations are never edited; add a new file.
-- Same columns as the SQLite schema (ids as text, times as epoch milliseconds, JSON as text),
-- so one set of row decoders serves both.
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,      -- UUIDv7: sorts by creation time
    project_id       TEXT NOT NULL,
    state            TEXT NOT NULL,
    idempotency_key  TEXT,
    definition       TEXT NOT NULL,
    sources          TEXT NOT NULL,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    error            TEXT,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT
);
CREATE UNIQUE INDEX runs_idempotency ON runs (project_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_by_project ON runs (project_id, id);
CREATE INDEX runs_by_state ON runs (state, id);

CREATE TABLE stages (
    run_id           TEXT NOT NULL REFERENCES runs (id),
    key              TEXT NOT NULL,
    position         BIGINT NOT NULL,
    executor_kind    TEXT NOT NULL,
    state            TEXT NOT NULL,
    ready_at         BIGINT,
    attempt          BIGINT NOT NULL DEFAULT 0,
    failures         BIGINT NOT NULL DEFAULT 0,
    lost_leases      BIGINT NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    started_at       BIGINT,
    finished_at      BIGINT,
    error            TEXT,
    exit_code        BIGINT,
    PRIMARY KEY (run_id, key)
);
-- Claims walk these in due order and stop after LIMIT rows, so their cost does not grow with
-- the number of queued stages.
CREATE INDEX stages_ready ON stages (ready_at) WHERE state = 'queued' AND ready_at IS NOT NULL;
CREATE INDEX stages_leased ON stages (lease_expires_at) WHERE state = 'running';

CREATE TABLE attempts (
    run_id      TEXT NOT NULL,
    stage_key   TEXT NOT NULL,
    number      BIGINT NOT NULL,
    owner       TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT,
    outcome     TEXT,
    error       TEXT,
    PRIMARY KEY (run_id, stage_key, number)
);

-- Log positions are allocated per run under this row's lock, so they become visible in order:
-- a follower reading `seq > cursor` never skips a line committed late.
CREATE TABLE log_counters (
    run_id TEXT PRIMARY KEY,
    seq    BIGINT NOT NULL
);
CREATE TABLE logs (
    run_id  TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    stage   TEXT,
    attempt BIGINT NOT NULL,
    stream  TEXT NOT NULL,
    at      BIGINT NOT NULL,
    text    TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE blobs (
    id         TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    size       BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE blob_chunks (
    blob_id TEXT NOT NULL,
    idx     BIGINT NOT NULL,
    data    BYTEA NOT NULL,
    PRIMARY KEY (blob_id, idx)
);

CREATE TABLE artifacts (
    run_id     TEXT NOT NULL,
    name       TEXT NOT NULL,
    stage      TEXT NOT NULL,
    blob_id    TEXT NOT NULL,
    size       BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (run_id, name)
);

CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    projects      TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);
