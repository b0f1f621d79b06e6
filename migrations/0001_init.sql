-- 0001_init: the task store.
--
-- PostgreSQL holds the truth of every task; RabbitMQ only carries dispatch.
-- Each statement below is applied in one transaction by `longrun migrate`.

CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    queue            text NOT NULL DEFAULT 'default',
    agent            text NOT NULL,
    input            jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'suspended', 'retry_wait',
                                       'succeeded', 'failed', 'dead', 'cancelled')),
    -- last checkpointed step number (0 = nothing done yet); checkpoints are
    -- conditional on step = n - 1, so the step log has no gaps.
    step             integer NOT NULL DEFAULT 0 CHECK (step >= 0),
    state_version    integer NOT NULL DEFAULT 1,
    -- failed attempts (transient errors) and the ceiling before dead-lettering
    attempt          integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     integer NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
    -- claims since the last checkpoint (crash-loop detection) and in total
    claims           integer NOT NULL DEFAULT 0,
    claims_total     integer NOT NULL DEFAULT 0,
    -- budgets: {"max_steps":..,"max_tool_calls":..,"max_tokens":..,"max_cost_usd":..,"max_seconds":..}
    budgets          jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- usage so far
    tokens_in        bigint NOT NULL DEFAULT 0,
    tokens_out       bigint NOT NULL DEFAULT 0,
    tokens_cached    bigint NOT NULL DEFAULT 0,
    tool_calls       integer NOT NULL DEFAULT 0,
    cost_usd         numeric(14, 6) NOT NULL DEFAULT 0,
    active_ms        bigint NOT NULL DEFAULT 0,
    -- fencing: a claim bumps lease_epoch; every write is conditional on it
    lease_epoch      bigint NOT NULL DEFAULT 0,
    lease_owner      text,
    lease_expires_at timestamptz,
    -- suspension: why and until when (sleep, approval, event, rate_limited)
    suspend_reason   text,
    wait_event       text,
    resume_at        timestamptz,
    -- outcome
    stop_reason      text,
    result           jsonb,
    error            text,
    deadline         timestamptz,
    tenant           text,
    metadata         jsonb,
    -- where the outcome goes (AMQP reply_to + correlation_id, or a callback URL)
    reply_to         text,
    correlation_id   text,
    callback_url     text,
    -- outbox: set when a dispatch message for the current queued state was
    -- confirmed by the broker; NULL means the scheduler must (re)publish it.
    published_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    last_progress_at timestamptz
);

-- `longrun list --status S` and the scheduler's per-status sweeps.
CREATE INDEX tasks_status_created_idx ON tasks (status, created_at);
-- Scheduler: due resumes (suspended/retry_wait ordered by resume_at).
CREATE INDEX tasks_resume_idx ON tasks (resume_at)
    WHERE status IN ('suspended', 'retry_wait') AND resume_at IS NOT NULL;
-- Scheduler: expired leases of running tasks.
CREATE INDEX tasks_lease_idx ON tasks (lease_expires_at) WHERE status = 'running';
-- Scheduler outbox: queued tasks whose dispatch was never confirmed.
CREATE INDEX tasks_unpublished_idx ON tasks (updated_at)
    WHERE status = 'queued' AND published_at IS NULL;
-- Scheduler: deadlines of live tasks.
CREATE INDEX tasks_deadline_idx ON tasks (deadline)
    WHERE deadline IS NOT NULL AND status NOT IN ('succeeded', 'failed', 'dead', 'cancelled');
-- Retention: finished tasks by age.
CREATE INDEX tasks_finished_idx ON tasks (finished_at) WHERE finished_at IS NOT NULL;
-- `longrun list --tenant/--agent/--queue` filters.
CREATE INDEX tasks_tenant_idx ON tasks (tenant, created_at) WHERE tenant IS NOT NULL;
CREATE INDEX tasks_agent_idx ON tasks (agent, created_at);
CREATE INDEX tasks_queue_idx ON tasks (queue, created_at);

-- The append-only step log: the conversation is rebuilt from it on claim.
-- Each row holds only what the step added.
CREATE TABLE task_steps (
    task_id        uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    step_no        integer NOT NULL CHECK (step_no >= 1),
    epoch          bigint NOT NULL,
    worker         text,
    state_version  integer NOT NULL DEFAULT 1,
    kind           text NOT NULL DEFAULT 'step',
    model          text,
    -- messages appended to the conversation by this step (provider-neutral)
    messages       jsonb NOT NULL DEFAULT '[]'::jsonb,
    -- tool calls made and their outcomes (name, idempotency key, status, ms)
    tool_calls     jsonb,
    tokens_in      integer NOT NULL DEFAULT 0,
    tokens_out     integer NOT NULL DEFAULT 0,
    tokens_cached  integer NOT NULL DEFAULT 0,
    cost_usd       numeric(14, 6) NOT NULL DEFAULT 0,
    latency_ms     integer NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, step_no)
);
-- Throughput in `longrun stats` (steps in the last minutes).
CREATE INDEX task_steps_created_idx ON task_steps (created_at);

-- The audit log: every status transition and every operator action.
CREATE TABLE task_events (
    id          bigserial PRIMARY KEY,
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    from_status text,
    to_status   text,
    reason      text,
    actor       text NOT NULL,
    detail      jsonb,
    at          timestamptz NOT NULL DEFAULT now()
);
-- `longrun log ID`: events of one task in order.
CREATE INDEX task_events_task_idx ON task_events (task_id, id);

-- One row per dead-lettered message or task.  dedupe_key makes the record
-- idempotent: the worker records a dead letter and publishes it to the DLX
-- with the same key in a header; the scheduler's ingest then finds the row.
CREATE TABLE dead_letters (
    id             bigserial PRIMARY KEY,
    dedupe_key     text NOT NULL UNIQUE,
    task_id        uuid,
    message_id     text,
    queue          text,
    agent          text,
    reason         text NOT NULL,
    error          text,
    body           jsonb,
    raw_body       bytea,
    x_death        jsonb,
    death_count    integer,
    source         text NOT NULL DEFAULT 'worker' CHECK (source IN ('worker', 'broker', 'scheduler', 'cli')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    requeued_at    timestamptz,
    requeued_by    text
);
-- `longrun dlq list --reason R` and `stats` (dead letters by reason).
CREATE INDEX dead_letters_reason_idx ON dead_letters (reason, created_at);
-- `longrun dlq show` by task.
CREATE INDEX dead_letters_task_idx ON dead_letters (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX dead_letters_created_idx ON dead_letters (created_at);

-- Worker heartbeats (`longrun workers`).
CREATE TABLE workers (
    id           text PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    version      text NOT NULL,
    queues       text[] NOT NULL DEFAULT '{}',
    in_flight    integer NOT NULL DEFAULT 0,
    max_in_flight integer NOT NULL DEFAULT 0,
    draining     boolean NOT NULL DEFAULT false,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workers_heartbeat_idx ON workers (heartbeat_at);
