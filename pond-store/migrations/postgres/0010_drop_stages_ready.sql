-- Claims walk `stages_ready_by_kind` (0009), one kind at a time; nothing reads the queue in due
-- order across kinds any more. Left in place, this index cost every stage write an index
-- update, and PostgreSQL's generic plan for the claim preferred it (it cannot tell how many rows
-- a kind has) and filtered its way past every queued stage of the other kinds: 40 ms per local
-- claim with 100,000 local and 100,000 pooled stages queued, 0.1 ms without it.
DROP INDEX stages_ready;
