-- 0009: a notification when a task becomes final (issue 18 item 3).
--
-- `longrun wait` LISTENs on longrun_task_done instead of polling.  A trigger
-- rather than a NOTIFY in each statement, so that every writer (worker
-- checkpoints and transitions, scheduler kills, operator cancels) notifies
-- without knowing about it.  Payload: '<task id> <status>'.  Fires once per
-- task reaching succeeded, failed, dead or cancelled (not per step); a
-- notifying transaction takes PostgreSQL's notification lock at commit, so
-- only commits that end tasks serialise on it.
CREATE OR REPLACE FUNCTION lr_task_done_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('longrun_task_done', NEW.id::text || ' ' || NEW.status);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS tasks_done_notify ON tasks;
CREATE TRIGGER tasks_done_notify AFTER UPDATE OF status ON tasks FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'dead', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION lr_task_done_notify();
