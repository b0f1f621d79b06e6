-- 0005: make the updates of a running task's row HOT (heap-only tuples).
--
-- A checkpoint in the middle of a slice and a lease renewal change only
-- columns that no index covers (step, usage, lease_expires_at, ...), so
-- PostgreSQL can write the new row version on the same page without touching
-- any index, provided the page has room.  Before this migration the partial
-- index on lease_expires_at made every checkpoint and renewal a full update
-- (one new entry in each of the table's indexes).  The scheduler's expired-
-- lease sweep reads the running tasks through tasks_status_created_idx.
DROP INDEX IF EXISTS tasks_lease_idx;
-- Leave room on each page for the new versions of its rows.
ALTER TABLE tasks SET (fillfactor = 70);
