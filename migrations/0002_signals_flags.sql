-- 0002_signals_flags: human-in-the-loop signals, kill switches, cancellation.

-- Approval decisions and external events delivered to a task
-- (`longrun approve|deny|signal`).  The agent reads them when it resumes.
CREATE TABLE task_signals (
    id         bigserial PRIMARY KEY,
    task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    name       text NOT NULL,          -- "approval" or "event:<name>"
    payload    jsonb,
    actor      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Loaded with the step log on every claim of a waiting agent.
CREATE INDEX task_signals_task_idx ON task_signals (task_id, id);

-- Fleet-wide kill switches (`longrun tools|models disable NAME`): read by
-- workers at start-up and on NOTIFY longrun_flags.
CREATE TABLE flags (
    kind       text NOT NULL CHECK (kind IN ('tool', 'model', 'writes')),
    name       text NOT NULL,
    disabled   boolean NOT NULL DEFAULT true,
    reason     text,
    actor      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, name)
);

-- `longrun cancel`: a running task stops at its next step boundary.
ALTER TABLE tasks ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
