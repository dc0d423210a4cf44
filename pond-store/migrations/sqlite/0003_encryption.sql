-- Confidential runs: the recipients a run's output is encrypted to (JSON), NULL when it is not.
ALTER TABLE runs ADD COLUMN encryption TEXT;
