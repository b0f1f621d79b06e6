/*
 * sql.h - the worker's statements.  Each is one round trip; every write is
 * fenced on (id, lease_epoch) and, for checkpoints, on step = n - 1.
 */
#ifndef LR_WORKER_SQL_H
#define LR_WORKER_SQL_H

/* Claim: bump the epoch and take the lease if the task is runnable (queued,
 * or running with an expired lease).  The LEFT JOINs always return one row:
 * claimed columns are NULL when the claim failed, and cur_* say why.
 * $1 id, $2 worker, $3 lease seconds, $4 claim only if claims (without
 * progress so far) is below this (how the worker defers suspects), $5 may
 * take back a live lease this worker holds (a retry after a connection loss
 * hid whether the first claim committed; it does not count as a claim).
 * cancel_requested: an operator's cancel the last owner did not see (the
 * task is cancelled instead of running a step). */
#define SQL_CLAIM                                                                                 \
    "WITH o AS (SELECT id, status, ($5::bool AND status = 'running' AND lease_owner = $2"         \
    "   AND lease_expires_at >= now()) AS own, started_at IS NULL AS first_claim"                 \
    "  FROM tasks WHERE id = $1 FOR UPDATE),"                                                     \
    " c AS (UPDATE tasks t SET status = 'running', lease_epoch = t.lease_epoch + 1,"              \
    "   lease_owner = $2, lease_expires_at = now() + make_interval(secs => $3::int),"             \
    "   claims = t.claims + CASE WHEN o.own THEN 0 ELSE 1 END,"                                   \
    "   claims_total = t.claims_total + CASE WHEN o.own THEN 0 ELSE 1 END,"                       \
    "   started_at = coalesce(t.started_at, now()), updated_at = now(),"                          \
    "   event_seq = t.event_seq + 1,"                                                             \
    "   suspend_reason = NULL, wait_event = NULL, resume_at = NULL"                               \
    "  FROM o WHERE t.id = o.id AND (o.own OR (t.claims < $4::int AND (t.status = 'queued' OR"    \
    "   (t.status = 'running' AND (t.lease_expires_at IS NULL OR t.lease_expires_at < now())))))" \
    "  RETURNING t.*, o.status AS old_status, o.own, o.first_claim),"                             \
    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor)"            \
    "  SELECT id, old_status, 'running', CASE WHEN own THEN 'reclaimed'"                          \
    "   WHEN old_status = 'running' THEN 'lease_expired' ELSE 'claimed' END, $2 FROM c)"          \
    " SELECT c.lease_epoch, c.step, c.claims, c.attempt, c.max_attempts, c.agent, c.queue,"       \
    "  c.input::text, c.budgets::text, c.tokens_in, c.tokens_out, c.cost_usd, c.tool_calls,"      \
    "  c.active_ms, (c.deadline IS NOT NULL AND c.deadline < now()) AS past_deadline,"            \
    "  c.cancel_requested, c.event_seq,"                                                          \
    "  c.reply_to, c.correlation_id, c.callback_url, c.state_version, c.tenant,"                  \
    "  (SELECT count(*) FROM tasks x WHERE x.tenant = c.tenant AND x.status = 'running'"          \
    "   AND x.id <> c.id) AS tenant_running,"                                                     \
    "  cur.status AS cur_status, cur.claims AS cur_claims,"                                       \
    "  (cur.lease_expires_at IS NOT NULL AND cur.lease_expires_at >= now()) AS cur_leased,"       \
    "  (extract(epoch FROM now() - c.outage_since) * 1000)::bigint AS outage_ms,"                 \
    "  (extract(epoch FROM now() - c.started_at) * 1000)::bigint AS wall_ms,"                     \
    "  (extract(epoch FROM now() - c.created_at) * 1000)::bigint AS age_ms,"                      \
    "  CASE WHEN c.first_claim THEN (extract(epoch FROM now() - c.created_at) * 1000)::bigint"    \
    "   END AS queue_wait_ms"                                                                     \
    " FROM (SELECT 1) one LEFT JOIN c ON true"                                                    \
    " LEFT JOIN tasks cur ON cur.id = $1"

/* A task that arrives as a full message and has no row yet: create it
 * already claimed.  $1 id, $2 queue, $3 agent, $4 input, $5 budgets,
 * $6 max_attempts, $7 deadline, $8 tenant, $9 metadata, $10 callback_url,
 * $11 reply_to, $12 correlation_id, $13 worker, $14 lease seconds. */
#define SQL_INSERT_CLAIMED                                                                        \
    "WITH c AS (INSERT INTO tasks (id, queue, agent, input, budgets, max_attempts, deadline,"     \
    "  tenant, metadata, callback_url, reply_to, correlation_id, status, lease_epoch,"            \
    "  lease_owner, lease_expires_at, claims, claims_total, started_at, published_at, event_seq)" \
    " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::int, $7::timestamptz, $8, $9::jsonb, $10,"    \
    "  $11, $12, 'running', 1, $13, now() + make_interval(secs => $14::int), 1, 1, now(), now()," \
    "  1)"                                                                                        \
    " ON CONFLICT (id) DO NOTHING RETURNING *),"                                                  \
    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor)"            \
    "  SELECT id, NULL, 'running', 'received', $13 FROM c)"                                       \
    " SELECT lease_epoch, step, claims, attempt, max_attempts, agent, queue, input::text,"        \
    "  budgets::text, tokens_in, tokens_out, cost_usd, tool_calls, active_ms, event_seq,"         \
    "  (deadline IS NOT NULL AND deadline < now()) AS past_deadline, reply_to, correlation_id,"   \
    "  callback_url, state_version, tenant,"                                                      \
    "  (SELECT count(*) FROM tasks x WHERE x.tenant = c.tenant AND x.status = 'running')"         \
    "   AS tenant_running FROM c"

/* Checkpoint one step: append the step row and advance the task row, in one
 * statement, only if we still hold the epoch and the previous step is the
 * last one written.  Zero rows = fenced out.
 * $1 id, $2 epoch, $3 step_no, $4 new status, $5 worker, $6 messages,
 * $7 tool_calls, $8 model, $9 tokens_in, $10 tokens_out, $11 tokens_cached,
 * $12 cost, $13 latency_ms, $14 release lease (bool), $15 result,
 * $16 error, $17 stop_reason, $18 suspend_reason, $19 resume_in_ms,
 * $20 wait_event, $21 event reason, $22 tool call count, $23 active_ms,
 * $24 lease seconds, $25 state version of the step (worker/state.h),
 * $26 fallback (the model calls that did not answer, JSON or NULL; 0008),
 * $27 the step's events (worker/events.h: started, its tool calls, finished),
 * to which event_seq adds one when the task leaves running (0010).
 * outage_since (0006): set by the first provider_unavailable park, kept by
 * the next ones, cleared by a step a model answered ($8).  Returns the
 * status as written and the row's error (an operator's cancel sets both). */
#define SQL_CHECKPOINT                                                                                  \
    "WITH t AS (UPDATE tasks SET step = $3,"                                                            \
    "   status = CASE WHEN cancel_requested THEN 'cancelled' ELSE $4 END, claims = 0,"                  \
    "   tokens_in = tokens_in + $9, tokens_out = tokens_out + $10,"                                     \
    "   tokens_cached = tokens_cached + $11, cost_usd = cost_usd + $12::numeric,"                       \
    "   tool_calls = tool_calls + $22, active_ms = active_ms + $23,"                                    \
    "   lease_owner = CASE WHEN $14::bool OR cancel_requested THEN NULL ELSE lease_owner END,"          \
    "   lease_expires_at = CASE WHEN $14::bool OR cancel_requested THEN NULL"                           \
    "     ELSE now() + make_interval(secs => $24::int) END,"                                            \
    "   result = coalesce($15::jsonb, result),"                                                         \
    "   error = CASE WHEN cancel_requested THEN error ELSE $16 END,"                                    \
    "   stop_reason = CASE WHEN cancel_requested THEN 'cancelled'"                                      \
    "     ELSE coalesce($17, stop_reason) END, suspend_reason = $18,"                                   \
    "   resume_at = CASE WHEN $19::bigint IS NULL THEN NULL"                                            \
    "     ELSE now() + make_interval(secs => $19::bigint / 1000.0) END,"                                \
    "   wait_event = $20,"                                                                              \
    "   outage_since = CASE WHEN $18 = 'provider_unavailable' THEN coalesce(outage_since, now())"       \
    "     WHEN $8::text IS NOT NULL THEN NULL ELSE outage_since END,"                                   \
    "   published_at = CASE WHEN $4 = 'running' AND NOT cancel_requested THEN published_at END,"        \
    "   finished_at = CASE WHEN cancel_requested OR $4 IN ('succeeded', 'failed', 'dead', 'cancelled')" \
    "     THEN now() ELSE finished_at END,"                                                             \
    "   updated_at = CASE WHEN $4 <> 'running' OR cancel_requested THEN now() ELSE updated_at END,"     \
    "   last_progress_at = now(),"                                                                      \
    "   state_version = greatest(state_version, $25::int),"                                             \
    "   event_seq = event_seq + $27::int"                                                               \
    "     + CASE WHEN $4 <> 'running' OR cancel_requested THEN 1 ELSE 0 END"                            \
    "  WHERE id = $1 AND lease_epoch = $2 AND step = $3 - 1 AND status = 'running'"                     \
    "  RETURNING id, queue, agent, input, budgets, tokens_in, tokens_out, cost_usd, step, status,"      \
    "   error, event_seq),"                                                                             \
    " s AS (INSERT INTO task_steps (task_id, step_no, epoch, worker, model, messages,"                  \
    "  tool_calls, tokens_in, tokens_out, tokens_cached, cost_usd, latency_ms, state_version,"          \
    "  fallback)"                                                                                       \
    "  SELECT id, $3, $2, $5, $8, coalesce($6::jsonb, '[]'::jsonb), $7::jsonb, $9, $10, $11,"           \
    "   $12::numeric, $13, $25::int, $26::jsonb FROM t RETURNING step_no),"                             \
    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor)"                  \
    "  SELECT id, 'running', status, CASE WHEN status = 'cancelled' AND $4 <> 'cancelled'"              \
    "   THEN 'cancel_requested' ELSE $21 END, $5 FROM t WHERE status <> 'running'),"                    \
    " dl AS (INSERT INTO dead_letters (dedupe_key, task_id, message_id, queue, agent, reason,"          \
    "   error, body, source)"                                                                           \
    "  SELECT 'task:' || id || ':' || $2, id, id::text, queue, agent, coalesce($17, 'failed'),"         \
    "   $16, jsonb_build_object('id', id, 'agent', agent, 'input', input, 'budgets', budgets),"         \
    "   'worker' FROM t WHERE status = 'dead' ON CONFLICT (dedupe_key) DO NOTHING)"                     \
    " SELECT s.step_no, t.tokens_in, t.tokens_out, t.cost_usd, t.status, t.error, t.event_seq"          \
    " FROM s, t"

/* Did step $2 of task $1 commit under epoch $3?  (After an ambiguous
 * connection loss during a checkpoint.) */
#define SQL_STEP_EXISTS "SELECT 1 FROM task_steps WHERE task_id = $1 AND step_no = $2 AND epoch = $3"

/* A transition without a step (retry_wait, dead, queued on abandon, ...),
 * fenced on the epoch.  $1 id, $2 epoch, $3 new status, $4 worker,
 * $5 event reason, $6 error, $7 stop_reason (also the dead-letter reason),
 * $8 resume_in_ms, $9 attempt increment, $10 suspend_reason.  A hand-back to
 * `queued` (drain, abandoned at the drain deadline) takes back its claim:
 * the worker did not crash, so it must not count towards crash_loop.
 * A provider_unavailable park comes this way (no step row, no budget used)
 * and sets outage_since on the first one.  An immediate cancel (worker/
 * cancel.c) comes this way too, as `cancelled`, which only an operator's
 * cancel_requested allows.  As in the checkpoint, cancel_requested turns a
 * wait (suspended, retry_wait) into `cancelled` (event reason
 * cancel_requested); a hand-back to `queued` is cancelled by its next claim.
 * Returns the status as written and the row's error (the operator's reason
 * when cancelled) and event_seq, advanced by one (the event that reports the
 * transition, 0010). */
#define SQL_TRANSITION_CANCELS "(cancel_requested AND $3 IN ('suspended', 'retry_wait'))"
#define SQL_TRANSITION                                                                                                \
    "WITH t AS (UPDATE tasks SET status = CASE WHEN " SQL_TRANSITION_CANCELS " THEN 'cancelled' ELSE $3 END,"         \
    "   attempt = attempt + $9::int,"                                                                                 \
    "   claims = CASE WHEN $3 IN ('queued', 'suspended', 'retry_wait') THEN greatest(claims - 1, 0) ELSE claims END," \
    "   error = CASE WHEN " SQL_TRANSITION_CANCELS " THEN error ELSE coalesce($6, error) END,"                        \
    "   stop_reason = CASE WHEN " SQL_TRANSITION_CANCELS " THEN 'cancelled' ELSE coalesce($7, stop_reason) END,"      \
    "   resume_at = CASE WHEN $8::bigint IS NULL OR " SQL_TRANSITION_CANCELS " THEN NULL"                             \
    "     ELSE now() + make_interval(secs => $8::bigint / 1000.0) END,"                                               \
    "   suspend_reason = CASE WHEN " SQL_TRANSITION_CANCELS " THEN NULL ELSE $10 END,"                                \
    "   lease_owner = NULL, lease_expires_at = NULL,"                                                                 \
    "   outage_since = CASE WHEN $10 = 'provider_unavailable' THEN coalesce(outage_since, now())"                     \
    "     ELSE outage_since END,"                                                                                     \
    "   published_at = NULL,"                                                                                         \
    "   finished_at = CASE WHEN $3 IN ('succeeded', 'failed', 'dead', 'cancelled') OR " SQL_TRANSITION_CANCELS        \
    "   THEN now() ELSE finished_at END, updated_at = now(), event_seq = event_seq + 1"                               \
    "  WHERE id = $1 AND lease_epoch = $2 AND status = 'running' AND ($3 <> 'cancelled' OR cancel_requested)"         \
    "  RETURNING id, queue, agent, input, budgets, step, attempt, status, error, event_seq),"                         \
    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor, detail)"                        \
    "  SELECT id, 'running', status, CASE WHEN status = 'cancelled' AND $3 <> 'cancelled'"                            \
    "   THEN 'cancel_requested' ELSE $5 END, $4,"                                                                     \
    "   CASE WHEN $6::text IS NULL THEN NULL ELSE jsonb_build_object('error', $6::text) END"                          \
    "  FROM t),"                                                                                                      \
    " dl AS (INSERT INTO dead_letters (dedupe_key, task_id, message_id, queue, agent, reason,"                        \
    "   error, body, source)"                                                                                         \
    "  SELECT 'task:' || id || ':' || $2, id, id::text, queue, agent, coalesce($7, $5), $6,"                          \
    "   jsonb_build_object('id', id, 'agent', agent, 'input', input, 'budgets', budgets),"                            \
    "   'worker' FROM t WHERE $3 = 'dead' ON CONFLICT (dedupe_key) DO NOTHING)"                                       \
    " SELECT id, step, attempt, status, error, event_seq FROM t"

/* After a transition's resend changed nothing: the task's status and epoch
 * now (did the first attempt commit?). */
#define SQL_TASK_STATUS "SELECT status, lease_epoch FROM tasks WHERE id = $1"

/* A message that is not a valid task: record it (raw bytes kept) once.
 * $1 raw body, $2 message_id, $3 queue, $4 reason, $5 error, $6 headers json,
 * $7 delivery count, $8 body is JSON (bool), $9 task id if known.  Returns the
 * dedupe key for the DLX publish. */
#define SQL_DEAD_MESSAGE                                                                            \
    "INSERT INTO dead_letters (dedupe_key, message_id, queue, reason, error, raw_body, body,"       \
    "  x_death, death_count, source, task_id)"                                                      \
    " VALUES ('msg:' || coalesce($2, encode(sha256($1::bytea), 'hex')), $2, $3, $4, $5, $1::bytea," \
    "  CASE WHEN $8::bool THEN convert_from($1::bytea, 'UTF8')::jsonb END, $6::jsonb, $7::int,"     \
    "  'worker', $9::uuid)"                                                                         \
    " ON CONFLICT (dedupe_key) DO UPDATE SET updated_at = now()"                                    \
    " RETURNING dedupe_key"

/* Renew the leases of every task this worker holds, each fenced on its own
 * epoch.  $1 uuid[], $2 bigint[], $3 lease seconds.  Rows locked by another
 * statement are skipped, not waited for: they are being checkpointed (which
 * extends the lease itself) or touched by an operator, and waiting could
 * deadlock with a group commit of this worker's own checkpoints that locks
 * the same rows in another order.  Returns (id, epoch, renewed): renewed
 * pairs, and pairs positively fenced out (another epoch, no longer running,
 * or gone) with renewed = false; skipped pairs are not returned. */
#define SQL_RENEW                                                                          \
    "WITH u AS (SELECT * FROM unnest($1::uuid[], $2::bigint[]) AS u(id, epoch)),"          \
    " l AS (SELECT t.id FROM tasks t JOIN u ON t.id = u.id AND t.lease_epoch = u.epoch"    \
    "  AND t.status = 'running' ORDER BY t.id FOR UPDATE OF t SKIP LOCKED),"               \
    " r AS (UPDATE tasks t SET lease_expires_at = now() + make_interval(secs => $3::int)"  \
    "  FROM l WHERE t.id = l.id RETURNING t.id, t.lease_epoch)"                            \
    " SELECT id::text, lease_epoch, true AS renewed FROM r"                                \
    " UNION ALL SELECT u.id::text, u.epoch, false FROM u LEFT JOIN tasks t ON t.id = u.id" \
    "  WHERE t.id IS NULL OR t.lease_epoch <> u.epoch OR t.status <> 'running'"

#define SQL_HEARTBEAT                                                                            \
    "INSERT INTO workers (id, hostname, pid, version, queues, in_flight, max_in_flight,"         \
    "  draining, heartbeat_at)"                                                                  \
    " VALUES ($1, $2, $3::int, $4, string_to_array($5, ','), $6::int, $7::int, $8::bool, now())" \
    " ON CONFLICT (id) DO UPDATE SET in_flight = EXCLUDED.in_flight,"                            \
    "  draining = EXCLUDED.draining, heartbeat_at = now()"

#define SQL_MARK_PUBLISHED                                                      \
    "UPDATE tasks SET published_at = now() WHERE id = $1 AND status = 'queued'" \
    " AND published_at IS NULL"

/* A tenant's running tasks, counted after a claim committed (the claim's own
 * count could not see claims racing on other connections). */
#define SQL_TENANT_RUNNING "SELECT count(*) FROM tasks WHERE tenant = $1 AND status = 'running'"

/* The step log and then the task's signals (approval decisions, events). */
#define SQL_HISTORY                                                                                     \
    "SELECT kind, n, body, v FROM ("                                                                    \
    " SELECT 0 AS kind, step_no::bigint AS n, messages::text AS body, state_version AS v"               \
    "  FROM task_steps WHERE task_id = $1"                                                              \
    " UNION ALL SELECT 1, id, json_build_object('signal', name, 'payload', payload, 'id', id)::text, 1" \
    "  FROM task_signals WHERE task_id = $1) x ORDER BY kind, n"

/* The kill switches that are on, as "kind:name". */
#define SQL_FLAGS "SELECT kind || ':' || name FROM flags WHERE disabled"

/* The database's schema version (0 before the first migration). */
#define SQL_SCHEMA_VERSION "SELECT coalesce(max(version), 0) FROM schema_migrations"

/* The settings that make a commit durable, as this connection sees them
 * (ALTER DATABASE / ALTER ROLE ... SET apply), and for whom. */
#define SQL_DURABILITY                                                                      \
    "SELECT current_setting('fsync'), current_setting('synchronous_commit'), current_user," \
    " current_database()"

/* ------------------------------------------- rate windows (worker/ratewin.c) */

/* Reserves one request and the estimated tokens on the model's key and,
 * when the tenant is capped, on the tenant's key, both or neither, in the
 * sliding window (migration 0007, lr_rate_reserve: each key's advisory lock
 * serialises its reservations across the fleet).  $1 model key or NULL (the
 * model has no limit), $2 rpm, $3 tpm (0 = no limit), $4 tenant key or NULL,
 * $5 tenant tpm, $6 estimate, $7 window seconds.  One row: granted, the wait
 * in ms when not, and the new reservations' ids (NULL: none). */
#define SQL_RATE_RESERVE "SELECT granted, wait_ms, model_id, tenant_id FROM lr_rate_reserve($1, $2, $3, $4, $5, $6, $7)"

/* After the call: the reservations' tokens become the actual count.
 * $1 model row id, $2 tenant row id (0: none; ids start at 1), $3 tokens.
 * A row already pruned (a call longer than the window) matches nothing. */
#define SQL_RATE_SETTLE "UPDATE rate_reservations SET tokens = $3::bigint WHERE id IN ($1::bigint, $2::bigint)"

/* --------------------------------------------- spend caps (worker/spend.c) */

/* Reserves a model call's worst-case cost against every spend cap of the
 * task's agent and tenant (migration 0011, lr_spend_reserve: each scope's
 * advisory lock serialises the reservations that share it).  $1 agent,
 * $2 tenant or NULL, $3 USD, $4 seconds the reservation counts at most.
 * One row: granted, the reservation's id (NULL: no cap applies), and for a
 * refusal the cap that binds, its spend, its live reservations, when its
 * period rolls over, how long until then, and whether only the
 * reservations of calls in flight fill it. */
#define SQL_SPEND_RESERVE                                                                          \
    "SELECT granted, reservation_id, cap_scope, cap_name, cap_period, cap_usd::float8,"            \
    " spent_usd::float8, reserved_usd::float8,"                                                    \
    " to_char(resets_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), wait_ms, in_flight" \
    " FROM lr_spend_reserve($1, $2, $3::numeric, $4::int)"

/* After the call: the reservation is deleted and the actual cost added to
 * the ledger of every capped scope (idempotent).  $1 id, $2 USD. */
#define SQL_SPEND_SETTLE "SELECT lr_spend_settle($1::bigint, $2::numeric)"

/* The scopes that have a cap now, as "agent:<name>" / "tenant:<name>". */
#define SQL_SPEND_CAPS "SELECT DISTINCT scope || ':' || name FROM spend_caps WHERE cap_usd IS NOT NULL"

/* The agents file's caps, written at start (never over an operator's).
 * $1 [{"scope","name","day","month"}], $2 the worker.  Returns how many
 * changed. */
#define SQL_SPEND_FILE_CAPS "SELECT lr_spend_file_caps($1::jsonb, $2)"

#endif
