-- Run and stage state changes (the event outbox), written in the same transaction as the change.
-- Positions come from the one row of event_counter, updated as a transaction's last statement:
-- its lock is held until commit, so positions are handed out in commit order and a rolled-back
-- transaction gives its positions back (no gaps, nothing committed behind a reader's cursor).
CREATE TABLE events (
    seq            BIGINT PRIMARY KEY,
    type           TEXT NOT NULL,
    project_id     TEXT NOT NULL,
    run_id         TEXT NOT NULL,
    stage          TEXT,
    attempt        BIGINT,
    state          TEXT NOT NULL,
    previous_state TEXT,
    at             BIGINT NOT NULL
);
CREATE INDEX events_by_project ON events (project_id, seq);
CREATE TABLE event_counter (
    id  INT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO event_counter (id, seq) VALUES (1, 0);
