-- Artifacts belong to one attempt of their stage: a pooled result's signed manifest is compared
-- with that attempt's artifacts, and an attempt whose result was reported takes no more output.
-- attempt 0: stored before this migration (no attempt matches it).
ALTER TABLE artifacts ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
-- The attempt whose output was closed when its result arrived (NULL: none).
ALTER TABLE stages ADD COLUMN output_closed_attempt INTEGER;
