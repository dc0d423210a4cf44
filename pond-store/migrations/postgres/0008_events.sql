-- Run and stage state changes (the event outbox), written in the same transaction as the change.
-- A writer inserts with no position (`seq` NULL), so writers never wait on each other for one;
-- readers give positions to committed events in `id` order under one advisory lock before
-- reading (see `PgStore::sequence_events`). Positions are so handed out after commit, in the
-- order events became visible: gapless, and nothing ever lands behind a reader's cursor.
CREATE TABLE events (
    id             BIGSERIAL PRIMARY KEY,
    seq            BIGINT UNIQUE,
    type           TEXT NOT NULL,
    project_id     TEXT NOT NULL,
    run_id         TEXT NOT NULL,
    stage          TEXT,
    attempt        BIGINT,
    state          TEXT NOT NULL,
    previous_state TEXT,
    at             BIGINT NOT NULL
);
CREATE INDEX events_unsequenced ON events (id) WHERE seq IS NULL;
CREATE INDEX events_by_project ON events (project_id, seq);
