/*
 * scheduler.c - longrun-scheduler: resumes, recovery, deadlines, dead-letter
 * ingest and retention.  One active instance; standbys wait.
 *
 * Design.  One libuv loop.  Leadership is a PostgreSQL session advisory lock
 * held on a dedicated one-connection pool: standbys try it every second;
 * when the leader's session dies (even by kill -9) the server releases the
 * lock and a standby takes it.  A leader that loses its lock connection stops
 * sweeping at once.  Tasks are safe even if two leaders overlapped for a
 * moment: every sweep is a conditional update (FOR UPDATE SKIP LOCKED) and
 * workers fence on epochs.
 *
 * The leader sweeps every LONGRUN_SWEEP_INTERVAL_MS and whenever a NOTIFY on
 * channel longrun_wakeup arrives (approve, signal, cancel, enqueue).  Each
 * sweep statement moves at most LONGRUN_SWEEP_BATCH tasks to `queued` and
 * returns them; each is then published (confirmed) and marked published.
 * A crash between the update and the publish leaves a queued, unpublished
 * task: the outbox sweep republishes it after LONGRUN_OUTBOX_GRACE_SECONDS.
 * The outbox publishes at most one batch per sweep interval, and none while
 * its previous batch still waits for confirms or marks (SQL_OUTBOX).
 *
 * Every instance (leader or not) consumes longrun.dead and records each
 * message in dead_letters before acking it.
 *
 * Signals, the health tick and the shutdown are the daemon skeleton's
 * (common/daemon.h).  The first SIGTERM/SIGINT stops at once (there is
 * nothing to drain: every sweep is a transaction), in this order: the
 * timers; the leader lock's session, so that a standby takes over without
 * waiting; RabbitMQ, so that nothing new arrives that could no longer be
 * recorded; PostgreSQL last, after its in-flight statements finished.
 */
#include "scheduler.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "amqp.h"
#include "daemon.h"
#include "log.h"
#include "text.h"
#include "health.h"
#include "list.h"
#include "metrics.h"
#include "pg.h"
#include "spendgauge.h"
#include "task.h"

#define LEADER_LOCK_KEY "7283947202"

/* Resume due suspended / retry_wait tasks. $1 batch. */
#define SQL_RESUME                                                                                  \
    "WITH due AS (SELECT id, status FROM tasks WHERE status IN ('suspended', 'retry_wait')"         \
    "  AND resume_at <= now() ORDER BY resume_at LIMIT $1 FOR UPDATE SKIP LOCKED),"                 \
    " u AS (UPDATE tasks t SET status = 'queued', resume_at = NULL, published_at = NULL,"           \
    "  updated_at = now() FROM due WHERE t.id = due.id RETURNING t.id, t.queue, due.status AS old," \
    "  t.suspend_reason),"                                                                          \
    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor)"              \
    "  SELECT id, old, 'queued', CASE WHEN old = 'retry_wait' THEN 'retry_due'"                     \
    "   ELSE 'resumed:' || coalesce(suspend_reason, '?') END, $2 FROM u)"                           \
    " SELECT id, queue FROM u"

/* Running tasks whose lease expired: their worker is gone. $1 batch. */
#define SQL_EXPIRED                                                                             \
    "WITH due AS (SELECT id FROM tasks WHERE status = 'running' AND lease_expires_at < now()"   \
    "  ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED),"                             \
    " u AS (UPDATE tasks t SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL," \
    "  published_at = NULL, updated_at = now() FROM due WHERE t.id = due.id"                    \
    "  RETURNING t.id, t.queue),"                                                               \
    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor)"          \
    "  SELECT id, 'running', 'queued', 'lease_expired', $2 FROM u)"                             \
    " SELECT id, queue FROM u"

/* Outbox: queued tasks whose publish was never confirmed, after a grace
 * period.  published_at is set only after a broker confirm (the CLI's
 * enqueue, the worker's SQL_MARK_PUBLISHED, SQL_INSERT_CLAIMED, the
 * scheduler's own marks) and cleared by every move to queued that is not
 * followed by a confirmed publish yet, so NULL is the only state in which the
 * task may be missing from the broker.  A task confirmed once is in a durable
 * quorum queue until a consumer takes it (claims it, or drops it as not
 * runnable) or the broker dead-letters it (ingested below): it is never
 * republished, however long it waits, so a backlog is not multiplied.
 * $1 batch, $2 grace seconds. */
#define SQL_OUTBOX                                                                 \
    "SELECT id, queue FROM tasks WHERE status = 'queued' AND published_at IS NULL" \
    " AND updated_at < now() - make_interval(secs => $2::int)"                     \
    " ORDER BY updated_at LIMIT $1"

/* Outbox bookkeeping of one publish batch: $1 uuid[] of confirmed tasks. */
#define SQL_MARK_PUBLISHED "UPDATE tasks SET published_at = now() WHERE id = ANY($1::uuid[]) AND status = 'queued'"

/* Deadlines of live tasks. $1 batch. */
#define SQL_DEADLINE                                                                           \
    "WITH due AS (SELECT id, status FROM tasks WHERE deadline < now() AND status IN"           \
    "  ('queued', 'running', 'suspended', 'retry_wait') ORDER BY deadline LIMIT $1"            \
    "  FOR UPDATE SKIP LOCKED),"                                                               \
    " u AS (UPDATE tasks t SET status = 'dead', stop_reason = 'deadline',"                     \
    "  error = 'the task''s deadline passed', lease_owner = NULL, lease_expires_at = NULL,"    \
    "  finished_at = now(), updated_at = now() FROM due WHERE t.id = due.id"                   \
    "  RETURNING t.*, due.status AS old),"                                                     \
    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor)"         \
    "  SELECT id, old, 'dead', 'deadline', $2 FROM u),"                                        \
    " dl AS (INSERT INTO dead_letters (dedupe_key, task_id, message_id, queue, agent, reason," \
    "  error, body, source) SELECT 'task:' || id || ':deadline', id, id::text, queue, agent,"  \
    "  'deadline', error, jsonb_build_object('id', id, 'agent', agent, 'input', input),"       \
    "  'scheduler' FROM u ON CONFLICT (dedupe_key) DO NOTHING)"                                \
    " SELECT id, stop_reason, error, step, tokens_in, tokens_out, cost_usd::float8, reply_to," \
    "  correlation_id FROM u"

/* Progress-based liveness: a running task whose lease keeps being renewed
 * but that wrote no checkpoint for twice the step timeout is looping or
 * stuck: dead-letter it (no_progress); its worker's next write is fenced out.
 * $1 batch, $2 seconds, $3 actor. */
#define SQL_NO_PROGRESS                                                                             \
    "WITH due AS (SELECT id FROM tasks WHERE status = 'running' AND"                                \
    "  coalesce(last_progress_at, started_at, updated_at) < now() - make_interval(secs => $2::int)" \
    "  LIMIT $1 FOR UPDATE SKIP LOCKED),"                                                           \
    " u AS (UPDATE tasks t SET status = 'dead', stop_reason = 'no_progress',"                       \
    "  error = 'no checkpoint for ' || $2 || ' s while its lease was renewed',"                     \
    "  lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now()"        \
    "  FROM due WHERE t.id = due.id RETURNING t.*),"                                                \
    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor)"              \
    "  SELECT id, 'running', 'dead', 'no_progress', $3 FROM u),"                                    \
    " dl AS (INSERT INTO dead_letters (dedupe_key, task_id, message_id, queue, agent, reason,"      \
    "  error, body, source) SELECT 'task:' || id || ':no_progress:' || lease_epoch, id, id::text,"  \
    "  queue, agent, 'no_progress', error, jsonb_build_object('id', id, 'agent', agent,"            \
    "  'input', input), 'scheduler' FROM u ON CONFLICT (dedupe_key) DO NOTHING)"                    \
    " SELECT id, stop_reason, error, step, tokens_in, tokens_out, cost_usd::float8, reply_to,"      \
    "  correlation_id FROM u"

/* Retention: finished tasks (and, by cascade, their steps and events).
 * Also the rate reservations of keys nobody reserves on any more (a
 * reservation prunes its own keys' rows past the window, worker/ratewin.h;
 * an hour is past any window), the old fixed windows (rate_windows,
 * still written by workers of the previous release during an upgrade),
 * spend reservations a day past their expiry (a late settlement still
 * finds them until then, migration 0011) and spend ledger periods older
 * than 400 days.  $1 batch, $2 days. */
#define SQL_RETENTION                                                                           \
    "WITH rr AS (DELETE FROM rate_reservations WHERE reserved_at < now() - interval '1 hour')," \
    " sr AS (DELETE FROM spend_reservations WHERE expires_at < now() - interval '1 day'),"      \
    " su AS (DELETE FROM spend_usage WHERE period_start < now() - interval '400 days'),"        \
    " rw AS (DELETE FROM rate_windows WHERE window_start < now() - interval '1 hour'),"         \
    " dlr AS (DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE"          \
    "  created_at < now() - make_interval(days => $2::int) LIMIT $1))"                          \
    " DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished_at <"                  \
    " now() - make_interval(days => $2::int) LIMIT $1)"

/* Dead-letter ingest: one row per message, idempotent on the key.
 * $1 key, $2 message_id, $3 queue, $4 reason, $5 raw hex, $6 headers json,
 * $7 death count, $8 body is json, $9 task id. */
#define SQL_INGEST \
    "WITH dl AS (INSERT INTO dead_letters (dedupe_key, message_id, queue, reason, error,"      \
    "  raw_body, body, x_death, death_count, source, task_id)"                                 \
    " VALUES ($1, $2, $3, $4, NULL, $5::bytea,"                                                \
    "  CASE WHEN $8::bool THEN convert_from($5::bytea, 'UTF8')::jsonb END, $6::jsonb,"         \
    "  $7::int, 'broker', $9::uuid)"                                                           \
    " ON CONFLICT (dedupe_key) DO UPDATE SET x_death = EXCLUDED.x_death,"                      \
    "  death_count = EXCLUDED.death_count, updated_at = now() RETURNING 1),"                   \
    /* a task whose message the broker dead-lettered (delivery limit) and that   */            \
    /* is still queued would only be republished by the outbox: stop it here     */            \
    " t AS (UPDATE tasks SET status = 'dead', stop_reason = 'broker:' || $4,"                  \
    "  error = 'dead-lettered by RabbitMQ (' || $4 || ')', finished_at = now(),"               \
    "  updated_at = now() WHERE $10::bool AND id = $9::uuid AND status = 'queued' RETURNING id)," \
    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor)"         \
    "  SELECT id, 'queued', 'dead', 'broker:' || $4, $11 FROM t)"                              \
    " SELECT count(*) FROM dl"

typedef struct sched {
    uv_loop_t *loop;
    lr_daemon_t *d;
    lr_config_t cfg;
    char id[160];
    /* Components, NULL once the shutdown reached them (lr_daemon_add_*). */
    lr_pg_pool_t *pg;
    lr_pg_pool_t *lock; /* one connection: the leader lock's session */
    lr_amqp_t *amqp;
    uv_timer_t tick;
    uv_timer_t lock_timer;
    /* Dead letters PostgreSQL could not record wait here before they go
     * back to longrun.dead, so that an outage is not a hot loop of
     * redeliveries: dlq_backoff_ms doubles per failure (500 ms .. 30 s) and
     * is reset by the next success. */
    uv_timer_t dlq_timer;
    lr_list_t dlq_held;
    long dlq_backoff_ms;
    bool leader;
    bool lock_pending;
    bool stopping;
    int sweeps_running; /* statements in flight in this sweep round */
    bool sweep_again;   /* a wake-up arrived during a sweep */
    bool outbox_busy;   /* an outbox batch waits for its confirms and marks */
    uint64_t last_retention_ms;
    uint64_t resumed, recovered, republished, deadlined, ingested;
    bool amqp_up;
    int pg_usable;
    uv_thread_t depth_thread;
    bool depth_started;
    atomic_int depth_stop;
} sched_t;

/* Metric families (docs/metrics.md). */
static lr_metric_t *m_resumes, *m_leader, *m_ingested, *m_deadline, *m_depth, *m_consumers, *m_tasks, *m_suspended,
    *m_ready, *m_no_progress, *m_stalled;

static void metrics_init(void) {
    lr_spend_gauges_init();
    m_resumes = lr_metric_counter("longrun_resumes_total",
                                  "Tasks put back to queued and published by the scheduler, by kind.", "kind");
    m_leader = lr_metric_gauge("longrun_scheduler_leader", "1 when this scheduler instance is the leader.", NULL);
    m_ingested = lr_metric_counter("longrun_dead_letters_ingested_total",
                                   "Messages from longrun.dead recorded in dead_letters, by reason.", "reason");
    m_deadline = lr_metric_counter("longrun_deadline_total", "Tasks dead-lettered past their deadline.", NULL);
    m_depth = lr_metric_gauge("longrun_queue_depth", "Ready messages in a RabbitMQ queue.", "queue");
    m_consumers = lr_metric_gauge("longrun_queue_consumers", "Consumers of a RabbitMQ queue.", "queue");
    m_tasks = lr_metric_gauge("longrun_tasks", "Live tasks by status (leader only).", "status");
    m_suspended = lr_metric_gauge("longrun_suspended_tasks", "Suspended tasks by reason (leader only).", "reason");
    m_ready = lr_metric_gauge("longrun_ready", "1 when this process is ready (readiness probe).", NULL);
    m_no_progress = lr_metric_counter("longrun_no_progress_total",
                                      "Running tasks dead-lettered for writing no checkpoint (no_progress).", NULL);
    m_stalled = lr_metric_gauge("longrun_tasks_without_progress",
                                "Running tasks with no checkpoint for longer than LONGRUN_STEP_TIMEOUT_SECONDS "
                                "(leader, every 10 s).",
                                NULL);
}

/* The publishes of one sweep statement's rows.  Their outbox marks are
 * written in one UPDATE once every confirm is in (one round trip per batch,
 * not per task: this is what bounds the resume rate of a burst). */
typedef struct pub_batch {
    sched_t *s;
    int pending; /* publishes whose confirm has not arrived */
    int n;       /* confirmed ids in ids */
    char *ids;   /* n * 37 bytes */
    bool outbox; /* the outbox's batch: clears s->outbox_busy when done */
} pub_batch_t;

typedef struct pub {
    sched_t *s;
    pub_batch_t *b;
    char id[40];
    char queue[72];
} pub_t;

static void sweep(sched_t *s);

/* ------------------------------------------------------------- publishing */

/* Frees a batch; the outbox may send its next one. */
static void batch_free(pub_batch_t *b) {
    if (b->outbox) {
        b->s->outbox_busy = false;
    }
    free(b->ids);
    free(b);
}

static void marked_cb(int err, const PGresult *res, void *arg) {
    pub_batch_t *b = arg;
    if (err != 0) {
        /* The messages are in the broker but the rows say unpublished: the
         * outbox sends them once more after the grace (a duplicate delivery,
         * acked and dropped by the claim). */
        lr_warn("scheduler.mark_failed", "cannot mark %d published task(s): %s", b->n,
                res != NULL ? PQresultErrorMessage(res) : lr_strerror(err));
    }
    batch_free(b);
}

static void batch_flush(pub_batch_t *b) {
    size_t len = 0;
    char *arr;
    if (b->n == 0 || b->s->stopping || (arr = malloc((size_t)b->n * 38 + 3)) == NULL) {
        batch_free(b);
        return;
    }
    arr[len++] = '{';
    for (int i = 0; i < b->n; i++) {
        len += (size_t)sprintf(arr + len, "%s%s", i ? "," : "", b->ids + (size_t)i * 37);
    }
    arr[len++] = '}';
    arr[len] = '\0';
    if (lr_pg_query(b->s->pg, SQL_MARK_PUBLISHED, 1, (const char *const[]){arr}, 0, marked_cb, b) != 0) {
        batch_free(b);
    }
    free(arr);
}

static void published_cb(int err, void *arg) {
    pub_t *p = arg;
    pub_batch_t *b = p->b;
    if (err != 0) {
        /* Left unpublished: the outbox sweep retries after its grace. */
        lr_warn("scheduler.publish_failed", "publish of task %s failed: %s", p->id, lr_strerror(err));
    } else {
        snprintf(b->ids + (size_t)b->n * 37, 37, "%.36s", p->id);
        b->n++;
    }
    free(p);
    if (--b->pending == 0) {
        batch_flush(b);
    }
}

static void publish_rows(sched_t *s, const PGresult *res, uint64_t *counter, const char *what, bool outbox) {
    int n = PQntuples(res);
    pub_batch_t *b = n > 0 ? calloc(1, sizeof(*b)) : NULL;
    if (b != NULL && (b->ids = calloc((size_t)n, 37)) == NULL) {
        free(b);
        b = NULL;
    }
    if (b == NULL) {
        return; /* nothing, or no memory: the outbox sweep publishes them */
    }
    b->s = s;
    b->outbox = outbox;
    if (outbox) {
        s->outbox_busy = true;
    }
    b->pending = 1; /* held until every publish below is sent */
    for (int i = 0; i < n; i++) {
        pub_t *p = calloc(1, sizeof(*p));
        lr_amqp_msg_t msg;
        char body[64];
        if (p == NULL) {
            continue;
        }
        p->s = s;
        p->b = b;
        snprintf(p->id, sizeof(p->id), "%s", lr_pg_get(res, i, 0));
        snprintf(p->queue, sizeof(p->queue), "%s", lr_pg_get(res, i, 1) ? lr_pg_get(res, i, 1) : "default");
        snprintf(body, sizeof(body), "{\"id\":\"%s\"}", p->id);
        memset(&msg, 0, sizeof(msg));
        msg.body = body;
        msg.body_len = strlen(body);
        msg.message_id = p->id;
        msg.content_type = "application/json";
        msg.persistent = true;
        msg.mandatory = true;
        b->pending++;
        if (s->amqp == NULL || lr_amqp_publish(s->amqp, LR_AMQP_EXCHANGE, p->queue, &msg, published_cb, p) != 0) {
            b->pending--;
            free(p);
        }
    }
    if (--b->pending == 0) {
        batch_flush(b);
    }
    *counter += (uint64_t)n;
    lr_info("scheduler.dispatched", "%s: %d task(s) queued and published", what, n);
}

static void reply_refused_cb(int err, const PGresult *res, void *arg) {
    (void)arg;
    if (err != 0) {
        lr_warn("task.reply_refused_unrecorded", "the refused reply_to of a task was not recorded: %s",
                res != NULL ? PQresultErrorMessage(res) : lr_strerror(err));
    }
}

/* Records on the task that its outcome was not published to reply_to (why). */
static void record_reply_refused(sched_t *s, const char *id, const char *reply_to, const char *why) {
    const char *params[4] = {id, s->id, reply_to, why};
    if (s->pg == NULL || lr_pg_query(s->pg, LR_SQL_REPLY_REFUSED, 4, params, 10000, reply_refused_cb, NULL) != 0) {
        lr_warn("task.reply_refused_unrecorded", "task %s: the refused reply_to was not recorded", id);
    }
}

/* The outcome of tasks the scheduler killed (deadline, no_progress), to
 * their reply_to queues: the same JSON a worker sends (docs/task-contract.md),
 * best effort (the outcome is in the row either way).  Columns: id,
 * stop_reason, error, step, tokens_in, tokens_out, cost_usd, reply_to,
 * correlation_id. */
static void send_outcomes(sched_t *s, const PGresult *res) {
    for (int i = 0; i < PQntuples(res); i++) {
        const char *reply_to = lr_pg_get(res, i, 7);
        char *body;
        if (reply_to == NULL || reply_to[0] == '\0' || s->amqp == NULL) {
            continue;
        }
        body = lr_outcome_json(lr_pg_get(res, i, 0), "dead", NULL, lr_pg_get(res, i, 2), lr_pg_get(res, i, 1),
                               atol(lr_pg_get(res, i, 3)), atol(lr_pg_get(res, i, 4)), atol(lr_pg_get(res, i, 5)),
                               atof(lr_pg_get(res, i, 6)));
        if (body != NULL) {
            const char *id = lr_pg_get(res, i, 0);
            char why[512];
            if (lr_amqp_publish_reply(s->amqp, s->cfg.reply_to_prefix, reply_to, lr_pg_get(res, i, 8), id, body, why,
                                      sizeof(why)) == LR_EPERM) {
                record_reply_refused(s, id, reply_to, why);
            }
        }
        free(body);
    }
}

/* ------------------------------------------------------------------ sweeps */

typedef struct sweep_op {
    sched_t *s;
    int kind;
} sweep_op_t;

enum { OP_RESUME, OP_EXPIRED, OP_OUTBOX, OP_DEADLINE, OP_NO_PROGRESS, OP_RETENTION, OP_COUNT };

static void sweep_cb(int err, const PGresult *res, void *arg) {
    sweep_op_t *op = arg;
    sched_t *s = op->s;
    int kind = op->kind;
    free(op);
    s->sweeps_running--;
    if (err != 0) {
        lr_warn("scheduler.sweep_failed", "sweep %d failed: %s", kind,
                res != NULL ? PQresultErrorMessage(res) : lr_strerror(err));
    } else if (!s->stopping) {
        switch (kind) {
        case OP_RESUME:
            lr_metric_add(m_resumes, (const char *const[]){"resume"}, PQntuples(res));
            publish_rows(s, res, &s->resumed, "resume", false);
            break;
        case OP_EXPIRED:
            lr_metric_add(m_resumes, (const char *const[]){"lease_expired"}, PQntuples(res));
            publish_rows(s, res, &s->recovered, "lease expired", false);
            break;
        case OP_OUTBOX:
            lr_metric_add(m_resumes, (const char *const[]){"outbox"}, PQntuples(res));
            publish_rows(s, res, &s->republished, "outbox", true);
            break;
        case OP_DEADLINE:
            if (PQntuples(res) > 0) {
                s->deadlined += (uint64_t)PQntuples(res);
                lr_info("scheduler.deadline", "%d task(s) dead-lettered past their deadline", PQntuples(res));
                lr_metric_add(m_deadline, NULL, PQntuples(res));
                send_outcomes(s, res);
            }
            break;
        case OP_NO_PROGRESS:
            if (PQntuples(res) > 0) {
                lr_warn("scheduler.no_progress",
                        "%d running task(s) wrote no checkpoint for %d s although their "
                        "leases were renewed: dead-lettered with reason no_progress",
                        PQntuples(res), 2 * s->cfg.step_timeout_seconds);
                lr_metric_add(m_no_progress, NULL, PQntuples(res));
                send_outcomes(s, res);
            }
            break;
        default:
            if (PQcmdTuples((PGresult *)res)[0] != '\0' && atoi(PQcmdTuples((PGresult *)res)) > 0) {
                lr_info("scheduler.retention", "deleted %s finished task(s) past retention",
                        PQcmdTuples((PGresult *)res));
            }
            break;
        }
        /* A full batch means more may be due: go again soon (bounded batches
         * keep each transaction short so new work keeps flowing).  Not for
         * the outbox: its rate stays one batch per sweep interval, so that a
         * burst of unconfirmed publishes (a broker outage) is redispatched
         * at a pace the broker and the workers can take. */
        if (kind != OP_RETENTION && kind != OP_OUTBOX && PQntuples(res) >= s->cfg.sweep_batch) {
            s->sweep_again = true;
        }
    }
    if (s->sweeps_running == 0 && s->sweep_again && s->leader && !s->stopping) {
        s->sweep_again = false;
        sweep(s);
    }
}

static void sweep_query(sched_t *s, int kind, const char *sql, int n, const char *const *params) {
    sweep_op_t *op = calloc(1, sizeof(*op));
    if (op == NULL) {
        return;
    }
    op->s = s;
    op->kind = kind;
    s->sweeps_running++;
    if (lr_pg_query(s->pg, sql, n, params, 10000, sweep_cb, op) != 0) {
        s->sweeps_running--;
        free(op);
    }
}

static void sweep(sched_t *s) {
    char batch[16], grace[16], days[16];
    uint64_t now;
    if (!s->leader || s->stopping) {
        return;
    }
    if (s->sweeps_running > 0) {
        s->sweep_again = true;
        return;
    }
    snprintf(batch, sizeof(batch), "%d", s->cfg.sweep_batch);
    snprintf(grace, sizeof(grace), "%d", s->cfg.outbox_grace_seconds);
    snprintf(days, sizeof(days), "%d", s->cfg.retention_days);
    sweep_query(s, OP_RESUME, SQL_RESUME, 2, (const char *const[]){batch, s->id});
    sweep_query(s, OP_EXPIRED, SQL_EXPIRED, 2, (const char *const[]){batch, s->id});
    if (!s->outbox_busy) {
        sweep_query(s, OP_OUTBOX, SQL_OUTBOX, 2, (const char *const[]){batch, grace});
    }
    sweep_query(s, OP_DEADLINE, SQL_DEADLINE, 2, (const char *const[]){batch, s->id});
    {
        char limit[24];
        snprintf(limit, sizeof(limit), "%d", 2 * s->cfg.step_timeout_seconds);
        sweep_query(s, OP_NO_PROGRESS, SQL_NO_PROGRESS, 3, (const char *const[]){batch, limit, s->id});
    }
    uv_update_time(s->loop);
    now = uv_now(s->loop);
    if (s->cfg.retention_days > 0 && now - s->last_retention_ms > 60000) {
        s->last_retention_ms = now;
        sweep_query(s, OP_RETENTION, SQL_RETENTION, 2, (const char *const[]){batch, days});
    }
}

static void tick_cb(uv_timer_t *t) { sweep(t->data); }

static void on_notify(const char *channel, const char *payload, void *arg) {
    (void)channel;
    (void)payload;
    sweep(arg);
}

/* ---------------------------------------------------------------- leader */

static void lock_cb(int err, const PGresult *res, void *arg) {
    sched_t *s = arg;
    const char *v;
    s->lock_pending = false;
    if (err != 0 || s->stopping) {
        return;
    }
    v = lr_pg_get(res, 0, 0);
    if (v != NULL && v[0] == 't' && !s->leader) {
        s->leader = true;
        lr_info("scheduler.leader", "this instance is now the leader");
        sweep(s);
    }
}

static void lock_timer_cb(uv_timer_t *t) {
    sched_t *s = t->data;
    if (s->leader || s->lock_pending || s->stopping) {
        return;
    }
    s->lock_pending = true;
    if (lr_pg_query(s->lock, "SELECT pg_try_advisory_lock(" LEADER_LOCK_KEY ")", 0, NULL, 900, lock_cb, s) != 0) {
        s->lock_pending = false;
    }
}

static void on_lock_state(int usable, void *arg) {
    sched_t *s = arg;
    if (usable == 0 && s->leader) {
        /* The session holding the lock is gone: so is the lock. */
        s->leader = false;
        lr_warn("scheduler.leadership_lost", "lost the leader lock's database session; standing by");
    }
}

/* ------------------------------------------------------------ dlq ingest */

typedef struct ingest {
    sched_t *s;
    lr_amqp_delivery_t *d;
    bool safe;      /* record only what PostgreSQL surely accepts */
    lr_list_t link; /* in s->dlq_held while it waits to be requeued */
} ingest_t;

static void ingest_send(ingest_t *in);

#define DLQ_BACKOFF_MIN_MS 500
#define DLQ_BACKOFF_MAX_MS 30000

/* Gives every held dead letter back to longrun.dead (requeue) and frees
 * it; without a broker connection only frees it (the broker requeues what
 * a closed channel held). */
static void dlq_release_held(sched_t *s) {
    lr_list_foreach_safe(it, nx, &s->dlq_held) {
        ingest_t *in = lr_list_entry(it, ingest_t, link);
        lr_list_remove(&in->link);
        if (s->amqp != NULL) {
            (void)lr_amqp_reject(s->amqp, in->d, true);
        }
        lr_amqp_delivery_free(in->d);
        free(in);
    }
}

static void dlq_timer_cb(uv_timer_t *t) { dlq_release_held(t->data); }

/* A dead letter that could not be recorded: requeued after the backoff. */
static void ingest_hold(ingest_t *in) {
    sched_t *s = in->s;
    if (s->stopping) {
        lr_list_push_back(&s->dlq_held, &in->link);
        dlq_release_held(s);
        return;
    }
    lr_list_push_back(&s->dlq_held, &in->link);
    if (!uv_is_active((uv_handle_t *)&s->dlq_timer)) {
        /* the backoff grows once per round of retries, not per message held */
        s->dlq_backoff_ms = s->dlq_backoff_ms == 0                       ? DLQ_BACKOFF_MIN_MS
                            : s->dlq_backoff_ms * 2 > DLQ_BACKOFF_MAX_MS ? DLQ_BACKOFF_MAX_MS
                                                                         : s->dlq_backoff_ms * 2;
        uv_timer_start(&s->dlq_timer, dlq_timer_cb, (uint64_t)s->dlq_backoff_ms, 0);
    }
}

static void ingest_cb(int err, const PGresult *res, void *arg) {
    ingest_t *in = arg;
    if (err == LR_EDB && !in->safe) {
        /* Something in the message (body, id, headers) is not storable:
         * record the raw bytes only rather than requeue it forever. */
        lr_warn("dlq.ingest_safe_mode", "dead letter refused by PostgreSQL (%s); recording the raw bytes only",
                res != NULL ? PQresultErrorMessage(res) : "?");
        in->safe = true;
        ingest_send(in);
        return;
    }
    if (err != 0) {
        sched_t *s = in->s;
        ingest_hold(in); /* (may free in) */
        lr_warn("dlq.ingest_failed", "cannot record a dead letter (%s); it goes back to %s in at most %ld ms",
                res != NULL ? PQresultErrorMessage(res) : lr_strerror(err), LR_AMQP_DEAD_QUEUE, s->dlq_backoff_ms);
        return;
    } else {
        in->s->dlq_backoff_ms = 0;
        in->s->ingested++;
        lr_metric_inc1(m_ingested, "all");
        if (in->s->amqp != NULL) {
            (void)lr_amqp_ack(in->s->amqp, in->d);
        }
    }
    lr_amqp_delivery_free(in->d);
    free(in);
}

/* Reads x-death[0].reason/queue/count and our own x-longrun-* headers. */
static void dead_info(const lr_amqp_delivery_t *d, char *key, size_t keylen, char *reason, size_t reasonlen,
                      char *queue, size_t queuelen, long *count) {
    cJSON *h = d->headers_json != NULL ? cJSON_Parse(d->headers_json) : NULL;
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(h, "x-longrun-dead-letter-key");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(h, "x-longrun-reason");
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(h, "x-longrun-queue");
    const cJSON *xd = cJSON_GetObjectItemCaseSensitive(h, "x-death");
    const cJSON *first = cJSON_IsArray(xd) ? cJSON_GetArrayItem(xd, 0) : NULL;
    const cJSON *xr = cJSON_GetObjectItemCaseSensitive(first, "reason");
    const cJSON *xq = cJSON_GetObjectItemCaseSensitive(first, "queue");
    const cJSON *xc = cJSON_GetObjectItemCaseSensitive(first, "count");

    *count = cJSON_IsNumber(xc) ? (long)xc->valuedouble : -1;
    snprintf(reason, reasonlen, "%s",
             cJSON_IsString(r)    ? r->valuestring
             : cJSON_IsString(xr) ? xr->valuestring
                                  : "unknown");
    snprintf(queue, queuelen, "%s", cJSON_IsString(q) ? q->valuestring : cJSON_IsString(xq) ? xq->valuestring : "");
    if (cJSON_IsString(k)) {
        snprintf(key, keylen, "%s", k->valuestring);
    } else {
        /* A broker-made dead letter (delivery limit, rejection by a foreign
         * consumer, expiry): one row per message and death count. */
        snprintf(key, keylen, "broker:%s:%s:%ld", d->message_id != NULL ? d->message_id : "none", reason, *count);
    }
    cJSON_Delete(h);
}

static void ingest_send(ingest_t *in) {
    sched_t *s = in->s;
    lr_amqp_delivery_t *d = in->d;
    char key[300], reason[64], queue[128], cnt[24];
    char *hex = lr_bytea_hex(d->body, d->body_len);
    long count;
    const char *params[11];
    bool is_json, mid_ok;

    if (hex == NULL) {
        if (s->amqp != NULL) {
            (void)lr_amqp_reject(s->amqp, d, true);
        }
        lr_amqp_delivery_free(d);
        free(in);
        return;
    }
    dead_info(d, key, sizeof(key), reason, sizeof(reason), queue, sizeof(queue), &count);
    is_json = !in->safe && lr_json_storable(d->body, d->body_len);
    mid_ok = !in->safe && d->message_id != NULL && lr_pg_text_ok(d->message_id, strlen(d->message_id));
    if (in->safe || !lr_pg_text_ok(key, strlen(key))) {
        /* The key may quote a message id that is not text. */
        for (size_t i = 0; key[i] != '\0'; i++) {
            if ((unsigned char)key[i] >= 0x80) {
                key[i] = '?';
            }
        }
    }
    snprintf(cnt, sizeof(cnt), "%ld", count);
    params[0] = key;
    params[1] = mid_ok ? d->message_id : NULL;
    params[2] = lr_pg_text_ok(queue, strlen(queue)) ? queue : NULL;
    params[3] = lr_pg_text_ok(reason, strlen(reason)) ? reason : "unknown";
    params[4] = hex;
    params[5] = in->safe ? NULL : d->headers_json;
    params[6] = count >= 0 ? cnt : NULL;
    params[7] = is_json ? "true" : "false";
    params[8] = mid_ok && lr_uuid_valid(d->message_id) ? d->message_id : NULL;
    params[9] = strncmp(key, "broker:", 7) == 0 ? "true" : "false";
    params[10] = s->id;
    if (lr_pg_query(s->pg, SQL_INGEST, 11, params, 0, ingest_cb, in) != 0) {
        ingest_hold(in); /* the pool's queue is full or it is shutting down */
    }
    free(hex);
}

static void on_dead(lr_amqp_delivery_t *d, void *arg) {
    sched_t *s = arg;
    ingest_t *in = calloc(1, sizeof(*in));
    if (in == NULL) {
        (void)lr_amqp_reject(s->amqp, d, true);
        lr_amqp_delivery_free(d);
        return;
    }
    in->s = s;
    in->d = d;
    ingest_send(in);
}

/* ---------------------------------------------------------- health, depth */

/* RabbitMQ queue depths, read by a plain thread with the blocking helpers
 * (passive declares) every 10 s, so that the loop never waits on them. */
static void depth_thread(void *arg) {
    sched_t *s = arg;
    char err[256];
    char *queues = strdup(s->cfg.queues);
    while (!atomic_load(&s->depth_stop) && queues != NULL) {
        lr_amqp_sync_t *a = NULL;
        if (lr_amqp_sync_connect(&a, s->cfg.amqp_url, 5000, err, sizeof(err)) == 0) {
            char *copy = strdup(queues), *save = NULL;
            for (char *q = copy != NULL ? strtok_r(copy, ",", &save) : NULL; q != NULL;
                 q = strtok_r(NULL, ",", &save)) {
                char name[200];
                uint32_t msgs = 0, cons = 0;
                snprintf(name, sizeof(name), "%s%s", LR_AMQP_QUEUE_PREFIX, q);
                if (lr_amqp_sync_queue_info(a, name, &msgs, &cons, err, sizeof(err)) == 0) {
                    lr_metric_set(m_depth, (const char *const[]){name}, msgs);
                    lr_metric_set(m_consumers, (const char *const[]){name}, cons);
                }
            }
            free(copy);
            {
                uint32_t msgs = 0, cons = 0;
                if (lr_amqp_sync_queue_info(a, LR_AMQP_DEAD_QUEUE, &msgs, &cons, err, sizeof(err)) == 0) {
                    lr_metric_set(m_depth, (const char *const[]){LR_AMQP_DEAD_QUEUE}, msgs);
                    lr_metric_set(m_consumers, (const char *const[]){LR_AMQP_DEAD_QUEUE}, cons);
                }
            }
            lr_amqp_sync_close(a);
        }
        for (int i = 0; i < 100 && !atomic_load(&s->depth_stop); i++) {
            usleep(100000);
        }
    }
    free(queues);
}

static void spend_gauges_cb(int err, const PGresult *res, void *arg) {
    (void)arg;
    if (err == 0) {
        lr_spend_gauges_update(res);
    }
}

static void counts_cb(int err, const PGresult *res, void *arg) {
    (void)arg;
    if (err != 0) {
        return;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        const char *kind = lr_pg_get(res, i, 0), *key = lr_pg_get(res, i, 1);
        double n = atof(lr_pg_get(res, i, 2));
        if (kind != NULL && strcmp(kind, "p") == 0) {
            lr_metric_set(m_stalled, NULL, n);
        } else if (kind != NULL && key != NULL && strcmp(kind, "s") == 0) {
            lr_metric_set(m_tasks, (const char *const[]){key}, n);
        } else if (kind != NULL && key != NULL) {
            lr_metric_set(m_suspended, (const char *const[]){key}, n);
        }
    }
}

/* The /health snapshot, built as a tree (any length, every string escaped)
 * and handed to the health server, which copies it. */
static void snapshot(const sched_t *s, lr_health_t *health) {
    cJSON *o = cJSON_CreateObject(), *deps, *dep;
    if (o == NULL) {
        return;
    }
    cJSON_AddStringToObject(o, "instance", s->id);
    cJSON_AddBoolToObject(o, "leader", s->leader);
    deps = cJSON_AddObjectToObject(o, "dependencies");
    dep = cJSON_AddObjectToObject(deps, "rabbitmq");
    cJSON_AddStringToObject(dep, "status", s->amqp_up ? "up" : "down");
    dep = cJSON_AddObjectToObject(deps, "postgres");
    cJSON_AddStringToObject(dep, "status", s->pg_usable > 0 ? "up" : "down");
    cJSON_AddNumberToObject(dep, "usable_connections", s->pg_usable);
    cJSON_AddNumberToObject(o, "resumed", (double)s->resumed);
    cJSON_AddNumberToObject(o, "recovered", (double)s->recovered);
    cJSON_AddNumberToObject(o, "republished", (double)s->republished);
    cJSON_AddNumberToObject(o, "dead_letters_ingested", (double)s->ingested);
    lr_health_set_snapshot_tree(health, o);
}

/* Every second (the daemon ticks liveness): readiness, gauges, the
 * /health snapshot. */
static void on_tick(lr_daemon_t *d, void *arg) {
    sched_t *s = arg;
    lr_health_t *health = lr_daemon_health(d);
    const char *why = NULL;
    char step_timeout[24];
    static unsigned ticks;
    snprintf(step_timeout, sizeof(step_timeout), "%d", s->cfg.step_timeout_seconds);
    if (s->pg_usable == 0) {
        why = "PostgreSQL not connected";
    } else if (!s->amqp_up) {
        why = "RabbitMQ not connected";
    }
    lr_health_set_ready(health, why == NULL, why);
    lr_metric_set(m_ready, NULL, why == NULL ? 1 : 0);
    lr_metric_set(m_leader, NULL, s->leader ? 1 : 0);
    if (s->leader && ticks++ % 10 == 0 && !s->stopping) {
        /* Live tasks by status and suspended ones by reason (both indexed). */
        if (lr_pg_query(s->pg,
                        "SELECT 's', st.status, count(t.id) FROM unnest(ARRAY['queued','running','suspended',"
                        "'retry_wait']) st(status) LEFT JOIN tasks t ON t.status = st.status GROUP BY st.status"
                        " UNION ALL SELECT 'r', coalesce(suspend_reason, 'unknown'), count(*) FROM tasks"
                        " WHERE status = 'suspended' GROUP BY 2"
                        " UNION ALL SELECT 'p', 'stalled', count(*) FROM tasks WHERE status = 'running' AND"
                        " coalesce(last_progress_at, started_at, updated_at) < now() - make_interval(secs => $1::int)",
                        1, (const char *const[]){step_timeout}, 5000, counts_cb, s) != 0) {
            lr_debug("scheduler.counts", "cannot queue the counts");
        }
        if (lr_pg_query(s->pg, LR_SQL_SPEND_GAUGES, 0, NULL, 5000, spend_gauges_cb, s) != 0) {
            lr_debug("scheduler.counts", "cannot queue the spend caps' gauges");
        }
    } else if (!s->leader) {
        lr_spend_gauges_update(NULL); /* the leader's gauges */
    }
    snapshot(s, health);
}

static void on_pg_state(int usable, void *arg) {
    sched_t *s = arg;
    s->pg_usable = usable;
}

/* -------------------------------------------------------------- lifecycle */

/* The first SIGTERM/SIGINT: nothing to drain, stop now (in the order the
 * components were registered in start()). */
static void on_drain(lr_daemon_t *d, const char *why, void *arg) {
    sched_t *s = arg;
    s->stopping = true;
    uv_timer_stop(&s->dlq_timer);
    dlq_release_held(s);
    lr_info("scheduler.stopping",
            "%s: stopping (leader lock released with the session); the same signal "
            "again exits at once",
            why);
    lr_daemon_shutdown(d);
}

static void on_amqp_state(int connected, const char *detail, void *arg) {
    ((sched_t *)arg)->amqp_up = connected != 0;
    if (connected) {
        lr_info("amqp.connected", "RabbitMQ connected; ingesting %s", LR_AMQP_DEAD_QUEUE);
    } else {
        lr_warn("amqp.disconnected", "RabbitMQ unavailable: %s; reconnecting", detail ? detail : "");
    }
}

/* Creates the components and starts the timers.  Returns 0 or the exit
 * code (what failed is logged); whatever was created is closed by the
 * shutdown either way. */
static int start(sched_t *s) {
    const lr_config_t *cfg = &s->cfg;
    lr_pg_opts_t po;
    lr_amqp_opts_t ao;
    char err[512];
    static const char *const consume[] = {LR_AMQP_DEAD_QUEUE, NULL};
    static const char *const declare[] = {"default", NULL};

    /* Registered first, closed first; the timers before anything they use. */
    uv_timer_init(s->loop, &s->tick);
    uv_timer_init(s->loop, &s->lock_timer);
    uv_timer_init(s->loop, &s->dlq_timer);
    s->tick.data = s->lock_timer.data = s->dlq_timer.data = s;
    if (lr_daemon_add_handle(s->d, "sweep timer", (uv_handle_t *)&s->tick) != 0 ||
        lr_daemon_add_handle(s->d, "lock timer", (uv_handle_t *)&s->lock_timer) != 0 ||
        lr_daemon_add_handle(s->d, "dead-letter retry timer", (uv_handle_t *)&s->dlq_timer) != 0 ||
        lr_daemon_add_pg(s->d, "leader lock", &s->lock) != 0 ||
        lr_daemon_add_amqp(s->d, "rabbitmq", &s->amqp, 3000) != 0 || lr_daemon_add_pg(s->d, "postgres", &s->pg) != 0) {
        lr_error("scheduler.start", "cannot register the components");
        return 1;
    }

    memset(&po, 0, sizeof(po));
    po.conninfo = cfg->database_url;
    po.size = 2;
    po.application_name = "longrun-scheduler";
    po.on_state = on_pg_state;
    po.state_arg = s;
    if (lr_pg_pool_init(&s->pg, s->loop, &po, err, sizeof(err)) != 0) {
        lr_error("scheduler.config", "LONGRUN_DATABASE_URL: %s", err);
        return 2;
    }
    po.size = 1;
    po.application_name = "longrun-scheduler-lock";
    po.on_state = on_lock_state;
    po.state_arg = s;
    if (lr_pg_pool_init(&s->lock, s->loop, &po, err, sizeof(err)) != 0) {
        return 2;
    }
    if (lr_pg_listen(s->pg, "longrun_wakeup", on_notify, s) != 0) {
        return 1;
    }
    memset(&ao, 0, sizeof(ao));
    ao.url = cfg->amqp_url;
    ao.consume = consume;
    ao.declare = declare;
    ao.prefetch = 100;
    ao.delivery_limit = cfg->delivery_limit;
    ao.max_length = cfg->queue_max_length;
    ao.on_delivery = on_dead;
    ao.on_state = on_amqp_state;
    ao.arg = s;
    if (lr_amqp_start(&s->amqp, s->loop, &ao, err, sizeof(err)) != 0) {
        lr_error("scheduler.config", "LONGRUN_AMQP_URL: %s", err);
        return 2;
    }
    uv_timer_start(&s->tick, tick_cb, (uint64_t)cfg->sweep_interval_ms, (uint64_t)cfg->sweep_interval_ms);
    if (uv_thread_create(&s->depth_thread, depth_thread, s) == 0) {
        s->depth_started = true;
    }
    uv_timer_start(&s->lock_timer, lock_timer_cb, 100, 1000);
    return 0;
}

int lr_scheduler_run(const lr_config_t *cfg) {
    sched_t *s = calloc(1, sizeof(*s));
    uv_loop_t loop;
    lr_daemon_opts_t dopts;
    char err[512], host[100] = "";
    int rc;

    if (s == NULL || uv_loop_init(&loop) != 0) {
        free(s);
        return 1;
    }
    s->loop = &loop;
    s->cfg = *cfg;
    lr_list_init(&s->dlq_held);
    gethostname(host, sizeof(host) - 1);
    snprintf(s->id, sizeof(s->id), "scheduler:%s-%d", host, (int)getpid());
    lr_log_init("scheduler", s->id, lr_log_level_parse(cfg->log_level), strcmp(cfg->log_format, "json") == 0);
    metrics_init();
    memset(&dopts, 0, sizeof(dopts));
    dopts.name = "scheduler";
    dopts.http_port = cfg->http_port;
    dopts.stall_ms = 10000;
    dopts.on_drain = on_drain;
    dopts.on_tick = on_tick;
    dopts.arg = s;
    if (lr_daemon_init(&s->d, &loop, &dopts, err, sizeof(err)) != 0) {
        lr_error("scheduler.config", "%s", err);
        uv_loop_close(&loop);
        free(s);
        lr_spend_gauges_free();
        lr_metrics_free();
        return 2;
    }
    rc = start(s);
    if (rc == 0) {
        lr_info("scheduler.started",
                "longrun-scheduler %s: sweep every %d ms, batch %d, outbox grace %d s, "
                "retention %d days",
                LONGRUN_VERSION, cfg->sweep_interval_ms, cfg->sweep_batch, cfg->outbox_grace_seconds,
                cfg->retention_days);
    } else {
        s->stopping = true;
        lr_daemon_shutdown(s->d); /* close what start() created */
    }
    if (lr_daemon_run(s->d) != 0 && rc == 0) {
        rc = 1;
    }
    if (rc == 0) {
        lr_info("scheduler.exit",
                "exiting: resumed %llu, recovered %llu, republished %llu, deadline %llu, "
                "dead letters ingested %llu",
                (unsigned long long)s->resumed, (unsigned long long)s->recovered, (unsigned long long)s->republished,
                (unsigned long long)s->deadlined, (unsigned long long)s->ingested);
    }
    dlq_release_held(s); /* (any held after the shutdown began: only freed, the broker requeues them) */
    if (s->depth_started) {
        atomic_store(&s->depth_stop, 1);
        uv_thread_join(&s->depth_thread);
    }
    lr_daemon_free(s->d);
    if (uv_loop_close(&loop) != 0) {
        lr_error("scheduler.exit", "the event loop still has open handles at exit");
    }
    free(s);
    lr_spend_gauges_free();
    lr_metrics_free();
    return rc;
}
