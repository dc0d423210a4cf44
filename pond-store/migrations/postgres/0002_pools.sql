-- Worker pools: what a pooled stage requires of its worker, what pond found checking a
-- worker's signed result, and small records (enrollment codes, pool members, job inputs).
ALTER TABLE stages ADD COLUMN pool_tags TEXT;          -- JSON array (text); NULL for stages run by a server
ALTER TABLE stages ADD COLUMN pool_caps TEXT;          -- JSON array of capability globs
ALTER TABLE attempts ADD COLUMN attestation TEXT;      -- JSON
CREATE TABLE records (
    kind TEXT NOT NULL,
    key  TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
