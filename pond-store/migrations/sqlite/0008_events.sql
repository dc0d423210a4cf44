-- Run and stage state changes (the event outbox), written in the same transaction as the change.
-- One writer: rowid order is commit order.
CREATE TABLE events (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    type           TEXT NOT NULL,
    project_id     TEXT NOT NULL,
    run_id         TEXT NOT NULL,
    stage          TEXT,
    attempt        INTEGER,
    state          TEXT NOT NULL,
    previous_state TEXT,
    at             INTEGER NOT NULL
);
CREATE INDEX events_by_project ON events (project_id, seq);
