-- 0011: the spend ledger and its caps (issue 19 item 4).
--
-- Caps per agent and per tenant, per UTC day and month, enforced before each
-- model call of a capped task: the worker reserves the call's worst-case
-- cost with lr_spend_reserve (one statement, under the scopes' advisory
-- locks: admitted only when, for every cap that applies, the period's
-- settled spend plus the live reservations plus this one stay within the
-- cap) and settles it after the call with lr_spend_settle (the reservation
-- deleted, the actual cost added to the ledger of every capped scope).
-- What was spent, capped or not, stays in task_steps (the report,
-- `longrun spend`); spend_usage is the ledger the caps are checked against.
--
-- Why these shapes (docs/architecture.md, "Spend caps"):
-- * spend_caps.cap_usd NULL is an operator's "no cap" (`longrun spend
--   set-cap --clear`): a row, not a deletion, so that the next worker start
--   does not bring the agents file's cap back.
-- * One reservation row per call with both scopes (agent, tenant), not one
--   per scope: one insert and one delete per call whatever is capped.
-- * Each reservation has its own expiry (the call's timeout plus the waits
--   a call can make before it is sent, at least 15 minutes): a worker killed
--   between the reservation and the settlement blocks nothing for longer,
--   and a live call is never dropped from the sum while it can still run.
CREATE TABLE spend_caps (
    scope      text NOT NULL CHECK (scope IN ('agent', 'tenant')),
    name       text NOT NULL,
    period     text NOT NULL CHECK (period IN ('day', 'month')),
    cap_usd    numeric CHECK (cap_usd >= 0),
    source     text NOT NULL CHECK (source IN ('file', 'operator')),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text,
    PRIMARY KEY (scope, name, period),
    CHECK (cap_usd IS NOT NULL OR source = 'operator')
);

-- The ledger: settled spend of a capped scope per period (period_start: the
-- UTC day or month it belongs to).
CREATE TABLE spend_usage (
    scope        text NOT NULL,
    name         text NOT NULL,
    period       text NOT NULL,
    period_start timestamptz NOT NULL,
    spent_usd    numeric NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, name, period, period_start)
);

-- Model calls in flight of capped tasks, at their worst-case cost.  A row
-- counts until expires_at; it is deleted by its settlement, or a day after
-- it expired (by the next reservation of its agent, or the scheduler's
-- retention sweep).
CREATE TABLE spend_reservations (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    agent      text NOT NULL,
    tenant     text,
    amount_usd numeric NOT NULL CHECK (amount_usd >= 0),
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX spend_reservations_agent_idx ON spend_reservations (agent, expires_at);
CREATE INDEX spend_reservations_tenant_idx ON spend_reservations (tenant, expires_at) WHERE tenant IS NOT NULL;
-- The retention sweep's scan of expired rows.
CREATE INDEX spend_reservations_expires_idx ON spend_reservations (expires_at);

-- The UTC day or month that t falls in: its first instant, and the next one.
CREATE FUNCTION lr_spend_period_start(p text, t timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT date_trunc(CASE p WHEN 'day' THEN 'day' ELSE 'month' END, t AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
$$;
CREATE FUNCTION lr_spend_period_end(p text, t timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT (date_trunc(CASE p WHEN 'day' THEN 'day' ELSE 'month' END, t AT TIME ZONE 'UTC')
            + CASE p WHEN 'day' THEN interval '1 day' ELSE interval '1 month' END) AT TIME ZONE 'UTC'
$$;

-- The live reservations of one scope at t.
CREATE FUNCTION lr_spend_reserved(p_scope text, p_name text, t timestamptz) RETURNS numeric
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT sum(amount_usd) FROM spend_reservations
                      WHERE p_scope = 'agent' AND agent = p_name AND expires_at > t), 0)
         + coalesce((SELECT sum(amount_usd) FROM spend_reservations
                      WHERE p_scope = 'tenant' AND tenant = p_name AND expires_at > t), 0)
$$;

-- Each cap with its period now: what the ledger says was spent, the live
-- reservations, when the period rolls over.  `longrun spend caps` and the
-- scheduler's gauges read it.
CREATE VIEW spend_cap_status AS
SELECT c.scope, c.name, c.period, c.cap_usd, c.source, c.updated_at, c.updated_by,
       lr_spend_period_start(c.period, now()) AS period_start, lr_spend_period_end(c.period, now()) AS resets_at,
       coalesce(u.spent_usd, 0) AS spent_usd, lr_spend_reserved(c.scope, c.name, now()) AS reserved_usd,
       (SELECT count(*) FROM spend_reservations s WHERE s.expires_at > now()
           AND ((c.scope = 'agent' AND s.agent = c.name) OR (c.scope = 'tenant' AND s.tenant = c.name))) AS reservations
  FROM spend_caps c
  LEFT JOIN spend_usage u ON u.scope = c.scope AND u.name = c.name AND u.period = c.period
       AND u.period_start = lr_spend_period_start(c.period, now());

-- A cap set in the middle of a period starts from what its scope already
-- spent in it (task_steps), not from 0; never lowers what the ledger holds.
CREATE FUNCTION lr_spend_seed(p_scope text, p_name text, p_period text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s timestamptz := lr_spend_period_start(p_period, clock_timestamp());
    spent numeric;
BEGIN
    SELECT coalesce(sum(st.cost_usd), 0) INTO spent
      FROM task_steps st JOIN tasks k ON k.id = st.task_id
     WHERE st.created_at >= s
       AND ((p_scope = 'agent' AND k.agent = p_name) OR (p_scope = 'tenant' AND k.tenant = p_name));
    INSERT INTO spend_usage (scope, name, period, period_start, spent_usd)
    VALUES (p_scope, p_name, p_period, s, spent)
    ON CONFLICT (scope, name, period, period_start)
        DO UPDATE SET spent_usd = greatest(spend_usage.spent_usd, EXCLUDED.spent_usd), updated_at = now();
END $$;

-- The tasks of a scope suspended by a spend cap resume now (the cap was
-- raised or cleared); each gets a task_events row.  Returns how many.
CREATE FUNCTION lr_spend_wake(p_scope text, p_name text, p_actor text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH w AS (UPDATE tasks SET resume_at = now(), updated_at = now()
                WHERE status = 'suspended' AND suspend_reason = 'spend_cap'
                  AND ((p_scope = 'agent' AND agent = p_name) OR (p_scope = 'tenant' AND tenant = p_name))
                RETURNING id),
         ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor, detail)
                SELECT id, 'suspended', 'suspended', 'spend_cap_raised', coalesce(p_actor, 'unknown'),
                       jsonb_build_object('scope', p_scope, 'name', p_name) FROM w)
    SELECT count(*) INTO n FROM w;
    IF n > 0 THEN
        PERFORM pg_notify('longrun_wakeup', '');
    END IF;
    RETURN n;
END $$;

-- Sets (p_cap) or clears (p_cap NULL) one cap.  An operator's change always
-- applies, and a clear is stored as a row without an amount; a worker's
-- agents file (p_source 'file') never overrides an operator's row, and a
-- cap no longer in the file deletes the file's row.  A cap that did not
-- exist starts its ledger from task_steps (lr_spend_seed); one raised or
-- cleared wakes the tasks of its scope that it suspended.  A change
-- notifies longrun_spend (the workers reload which scopes have caps).
CREATE FUNCTION lr_spend_set_cap(p_scope text, p_name text, p_period text, p_cap numeric, p_source text, p_by text,
                                 OUT old_cap numeric, OUT new_cap numeric, OUT changed boolean,
                                 OUT woken integer, OUT kept_operator boolean)
LANGUAGE plpgsql AS $$
DECLARE
    cur spend_caps%ROWTYPE;
    found_row boolean;
BEGIN
    woken := 0;
    kept_operator := false;
    SELECT * INTO cur FROM spend_caps WHERE scope = p_scope AND name = p_name AND period = p_period FOR UPDATE;
    found_row := FOUND;
    old_cap := cur.cap_usd;
    IF p_source = 'file' AND found_row AND cur.source = 'operator' THEN
        new_cap := old_cap;
        changed := false;
        kept_operator := true;
        RETURN;
    END IF;
    IF p_source = 'file' AND p_cap IS NULL THEN
        DELETE FROM spend_caps WHERE scope = p_scope AND name = p_name AND period = p_period AND source = 'file';
    ELSE
        INSERT INTO spend_caps (scope, name, period, cap_usd, source, updated_at, updated_by)
        VALUES (p_scope, p_name, p_period, p_cap, p_source, now(), p_by)
        ON CONFLICT (scope, name, period) DO UPDATE
            SET cap_usd = EXCLUDED.cap_usd, source = EXCLUDED.source, updated_at = now(), updated_by = EXCLUDED.updated_by
            WHERE EXCLUDED.source = 'operator' OR spend_caps.source = 'file';
    END IF;
    new_cap := p_cap;
    changed := old_cap IS DISTINCT FROM new_cap;
    IF new_cap IS NOT NULL AND old_cap IS NULL THEN
        PERFORM lr_spend_seed(p_scope, p_name, p_period);
    END IF;
    IF old_cap IS NOT NULL AND (new_cap IS NULL OR new_cap > old_cap) THEN
        woken := lr_spend_wake(p_scope, p_name, p_by);
    END IF;
    IF changed THEN
        PERFORM pg_notify('longrun_spend', p_scope || ':' || p_name);
    END IF;
END $$;

-- A worker's agents file at its start: p_caps = [{"scope", "name", "day",
-- "month"}] for every agent and tenant the file defines (null: no cap of
-- that period in the file), in (scope, name) order so that workers starting
-- together lock the rows in one order.  Returns how many caps changed.
CREATE FUNCTION lr_spend_file_caps(p_caps jsonb, p_by text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    e jsonb;
    r record;
    n integer := 0;
BEGIN
    FOR e IN SELECT value FROM jsonb_array_elements(p_caps) LOOP
        SELECT * INTO r FROM lr_spend_set_cap(e->>'scope', e->>'name', 'day', (e->>'day')::numeric, 'file', p_by);
        n := n + CASE WHEN r.changed THEN 1 ELSE 0 END;
        SELECT * INTO r FROM lr_spend_set_cap(e->>'scope', e->>'name', 'month', (e->>'month')::numeric, 'file', p_by);
        n := n + CASE WHEN r.changed THEN 1 ELSE 0 END;
    END LOOP;
    RETURN n;
END $$;

-- Reserves p_amount (a model call's worst-case cost) for a task of agent
-- p_agent and tenant p_tenant (NULL: none), for p_ttl_s seconds at most.
-- Each scope's advisory lock (transaction-scoped; agent first, tenant
-- second, in two lock spaces, so no two callers wait for each other in a
-- cycle) serialises the reservations that share a scope across the fleet;
-- every statement after the locks reads a fresh snapshot (plpgsql, READ
-- COMMITTED), so it sees whatever the previous holder committed, and the
-- one SELECT reads the ledger and the reservations in one snapshot, so a
-- settlement (one transaction: the reservation deleted, the cost added) is
-- seen whole or not at all.  Granted when, for every cap of the agent and
-- the tenant, spent in the current period + live reservations + p_amount
-- <= cap; then a reservation row is written (none when no cap applies:
-- reservation_id NULL).  Refused otherwise, with the cap that binds and
-- wait_ms until its period rolls over: of the caps whose settled spend
-- alone leaves no room for p_amount, the one that rolls over last
-- (in_flight false: nothing but the period's end or a raise frees it);
-- when there is none, of the caps that only the live reservations fill
-- (in_flight true: room comes back as those calls settle below their
-- reservations), the one that rolls over last.
CREATE FUNCTION lr_spend_reserve(p_agent text, p_tenant text, p_amount numeric, p_ttl_s integer,
                                 OUT granted boolean, OUT reservation_id bigint, OUT cap_scope text,
                                 OUT cap_name text, OUT cap_period text, OUT cap_usd numeric,
                                 OUT spent_usd numeric, OUT reserved_usd numeric, OUT resets_at timestamptz,
                                 OUT wait_ms bigint, OUT in_flight boolean)
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    r record;
    capped boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('longrun.spend.agent'), hashtext(p_agent));
    IF p_tenant IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('longrun.spend.tenant'), hashtext(p_tenant));
    END IF;
    t := clock_timestamp();
    -- expired rows no longer count; they stay a day for a late settlement
    DELETE FROM spend_reservations WHERE agent = p_agent AND expires_at < t - interval '1 day';
    -- one statement (one snapshot): every cap that applies; first those whose
    -- settled spend alone leaves no room for this call, then those that the
    -- reservations of calls in flight fill; of those the one that rolls over last
    SELECT y.*, y.spent + y.reserved + p_amount > y.cap_usd AS over, y.spent + p_amount > y.cap_usd AS over_spent
      INTO r
      FROM (SELECT c.scope, c.name, c.period, c.cap_usd, coalesce(u.spent_usd, 0) AS spent, res.reserved,
                   lr_spend_period_end(c.period, t) AS ends
              FROM spend_caps c
              LEFT JOIN spend_usage u ON u.scope = c.scope AND u.name = c.name AND u.period = c.period
                   AND u.period_start = lr_spend_period_start(c.period, t)
             CROSS JOIN LATERAL (SELECT lr_spend_reserved(c.scope, c.name, t) AS reserved) res
             WHERE c.cap_usd IS NOT NULL
               AND ((c.scope = 'agent' AND c.name = p_agent) OR (c.scope = 'tenant' AND c.name = p_tenant))) y
     ORDER BY y.spent + p_amount > y.cap_usd DESC, y.spent + y.reserved + p_amount > y.cap_usd DESC, y.ends DESC,
              y.scope, y.period
     LIMIT 1;
    capped := FOUND;
    IF capped AND r.over THEN
        granted := false;
        cap_scope := r.scope;
        cap_name := r.name;
        cap_period := r.period;
        cap_usd := r.cap_usd;
        spent_usd := r.spent;
        reserved_usd := r.reserved;
        resets_at := r.ends;
        wait_ms := greatest(1, ceil(extract(epoch FROM r.ends - t) * 1000)::bigint);
        in_flight := NOT r.over_spent;
        RETURN;
    END IF;
    granted := true;
    IF capped THEN
        INSERT INTO spend_reservations (agent, tenant, amount_usd, created_at, expires_at)
        VALUES (p_agent, p_tenant, p_amount, t, t + make_interval(secs => p_ttl_s))
        RETURNING id INTO reservation_id;
    END IF;
END $$;

-- After the call: reservation p_id is deleted and the call's actual cost
-- added, in the period current now, to the ledger of every scope of the
-- call (the row's agent and tenant) that has a cap, in one transaction
-- (rows in one order, so settlements never deadlock).  Idempotent: a
-- settlement sent again (its answer lost with a connection) finds no row
-- and adds nothing; returns whether it settled.  An expired row is still
-- there (pruned a day after it expired), so a call that outlived its
-- reservation is still added.
CREATE FUNCTION lr_spend_settle(p_id bigint, p_actual numeric) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz := clock_timestamp();
    a text;
    tn text;
BEGIN
    DELETE FROM spend_reservations WHERE id = p_id RETURNING agent, tenant INTO a, tn;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_actual > 0 THEN
        INSERT INTO spend_usage (scope, name, period, period_start, spent_usd)
        SELECT c.scope, c.name, c.period, lr_spend_period_start(c.period, t), p_actual
          FROM spend_caps c
         WHERE c.cap_usd IS NOT NULL
           AND ((c.scope = 'agent' AND c.name = a) OR (c.scope = 'tenant' AND c.name = tn))
         ORDER BY c.scope, c.name, c.period
        ON CONFLICT (scope, name, period, period_start)
            DO UPDATE SET spent_usd = spend_usage.spent_usd + EXCLUDED.spent_usd, updated_at = now();
    END IF;
    RETURN true;
END $$;
