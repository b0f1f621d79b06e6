/*
 * dlq.c - `longrun dlq list|show|requeue|purge`, `longrun stats`,
 * `longrun workers`, and the kill switches `longrun tools|models
 * disable|enable NAME`.
 *
 * Requeue resumes a dead task from its last good step (the step log is
 * kept): status dead -> queued, budgets overridden as asked, attempts reset
 * on request, an audit event with the actor, then a confirmed publish of the
 * continuation.  Bulk requeues run in batches of 500 (one transaction each)
 * with a progress line; a crash in the middle leaves each batch either fully
 * requeued or untouched, and requeued-but-unpublished tasks are dispatched by
 * the scheduler's outbox sweep.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "amqp.h"
#include "cli.h"
#include "task.h"

#define REQUEUE_BATCH 500

enum {
    D_REASON = OPT_FIRST_COMMAND_OPTION,
    D_AGENT,
    D_SINCE,
    D_LIMIT,
    D_ALL,
    D_DRY_RUN,
    D_DEADLINE,
    D_MODEL,
    D_RESET,
    D_OLDER,
};

static cJSON *rows_json(PGresult *r) {
    cJSON *arr = cJSON_CreateArray();
    for (int i = 0; i < PQntuples(r); i++) {
        cJSON *o = cJSON_CreateObject();
        for (int c = 0; c < PQnfields(r); c++) {
            const char *name = PQfname(r, c);
            if (PQgetisnull(r, i, c)) {
                cJSON_AddNullToObject(o, name);
            } else if (PQftype(r, c) == 20 || PQftype(r, c) == 23 || PQftype(r, c) == 1700 || PQftype(r, c) == 21) {
                cJSON_AddNumberToObject(o, name, atof(PQgetvalue(r, i, c)));
            } else if (PQftype(r, c) == 3802 || PQftype(r, c) == 114) {
                cJSON *j = cJSON_Parse(PQgetvalue(r, i, c));
                cJSON_AddItemToObject(o, name, j != NULL ? j : cJSON_CreateString(PQgetvalue(r, i, c)));
            } else if (PQftype(r, c) == 16) {
                cJSON_AddBoolToObject(o, name, PQgetvalue(r, i, c)[0] == 't');
            } else {
                cJSON_AddStringToObject(o, name, PQgetvalue(r, i, c));
            }
        }
        cJSON_AddItemToArray(arr, o);
    }
    return arr;
}

/* Prints rows r as one JSON array of objects (rows_json()). */
static void print_rows_json(PGresult *r) {
    cJSON *j = rows_json(r);
    cli_print_json(j);
    cJSON_Delete(j);
}

/* A read-only query whose rows a command prints: as JSON with --json, else
 * with print_table. */
typedef struct rows_query {
    const char *sql;
    int nparams;
    const char *const *params;
    void (*print_table)(PGresult *r);
} rows_query_t;

/* Connects, runs q and prints its rows.  Returns an exit code. */
static int show_rows(cli_t *c, const rows_query_t *q) {
    PGconn *db = cli_db_connect(c);
    PGresult *r;
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    r = cli_exec(c, db, q->sql, q->nparams, q->params);
    if (r == NULL) {
        PQfinish(db);
        return LR_EXIT_FAIL;
    }
    if (c->json) {
        print_rows_json(r);
    } else {
        q->print_table(r);
    }
    PQclear(r);
    PQfinish(db);
    return LR_EXIT_OK;
}

/* ------------------------------------------------------------------- list */

static void print_dead_letters(PGresult *r) {
    printf("%-7s %-36s %-14s %-16s %-20s %s\n", "ID", "TASK", "AGENT", "REASON", "CREATED", "ERROR");
    for (int i = 0; i < PQntuples(r); i++) {
        printf("%-7s %-36s %-14.14s %-16.16s %-20s %.60s%s\n", PQgetvalue(r, i, 0),
               PQgetisnull(r, i, 1) ? "(malformed message)" : PQgetvalue(r, i, 1), PQgetvalue(r, i, 2),
               PQgetvalue(r, i, 3), PQgetvalue(r, i, 6), PQgetvalue(r, i, 4),
               PQgetisnull(r, i, 7) ? "" : "  [requeued]");
    }
}

static int dlq_list(cli_t *c, int argc, char **argv) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"reason", required_argument, NULL, D_REASON},
                                         {"agent", required_argument, NULL, D_AGENT},
                                         {"since", required_argument, NULL, D_SINCE},
                                         {"limit", required_argument, NULL, D_LIMIT},
                                         {NULL, 0, NULL, 0}};
    const char *params[4] = {NULL, NULL, NULL, "50"};
    const rows_query_t q =
        {"SELECT d.id, d.task_id::text, coalesce(d.agent, t.agent) AS agent, d.reason, d.error, d.source,"
         " to_char(d.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS created_at,"
         " to_char(d.requeued_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS requeued_at"
         " FROM dead_letters d LEFT JOIN tasks t ON t.id = d.task_id"
         " WHERE ($1::text IS NULL OR d.reason = $1) AND ($2::text IS NULL OR coalesce(d.agent, t.agent) = $2)"
         " AND ($3::interval IS NULL OR d.created_at >= now() - $3::interval)"
         " ORDER BY d.id DESC LIMIT $4::int",
         4, params, print_dead_letters};
    char since[64], lim[16];
    long v;
    int opt;
    while ((opt = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (opt) {
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        case 'h':
            printf("usage: longrun dlq list [--reason R] [--agent A] [--since 1h] [--limit N] [--json]\n"
                   "\nDead letters, newest first: id, task, reason, error, when, and whether requeued.\n");
            return LR_EXIT_OK;
        case D_REASON: params[0] = optarg; break;
        case D_AGENT: params[1] = optarg; break;
        case D_SINCE:
            if (cli_duration(optarg, since, sizeof(since)) != 0) {
                return cli_fail(c, LR_EXIT_USAGE, "--since: '%s' is not a duration like 30m, 2h, 7d", optarg);
            }
            params[2] = since;
            break;
        case D_LIMIT:
            if (cli_parse_long(c, "--limit", optarg, 1, 100000, &v) != 0) {
                return LR_EXIT_USAGE;
            }
            snprintf(lim, sizeof(lim), "%ld", v);
            params[3] = lim;
            break;
        default: return cli_fail(c, LR_EXIT_USAGE, "unknown option (see --help)");
        }
    }
    if (optind < argc) {
        return cli_fail(c, LR_EXIT_USAGE, "unexpected argument '%s'", argv[optind]);
    }
    return show_rows(c, &q);
}

/* Resolves a dead letter reference (numeric id or task uuid) to its row. */
static PGresult *find_dead(cli_t *c, PGconn *db, const char *ref) {
    char *end = NULL;
    strtol(ref, &end, 10);
    if (lr_uuid_valid(ref)) {
        return cli_exec(c, db, "SELECT * FROM dead_letters WHERE task_id = $1 ORDER BY id DESC LIMIT 1", 1, &ref);
    }
    if (end != ref && *end == '\0') {
        return cli_exec(c, db, "SELECT * FROM dead_letters WHERE id = $1::bigint", 1, &ref);
    }
    cli_fail(c, LR_EXIT_USAGE, "'%s' is neither a dead-letter id nor a task id", ref);
    return NULL;
}

/* ------------------------------------------------------------------- show */

/* What `dlq show` prints: the dead letter's row, and when it has a task, the
 * task's row and its last steps (NULL when it has none or a query failed). */
typedef struct dead_view {
    PGresult *dead;
    PGresult *task;
    PGresult *steps;
} dead_view_t;

/* Reads the task of v->dead, if it has one, and its last 5 steps. */
static void read_dead_task(cli_t *c, PGconn *db, dead_view_t *v) {
    int col = PQfnumber(v->dead, "task_id");
    const char *tid;
    if (PQgetisnull(v->dead, 0, col)) {
        return;
    }
    tid = PQgetvalue(v->dead, 0, col);
    v->task =
        cli_exec(c, db,
                 "SELECT status, agent, step, attempt, max_attempts, claims_total, budgets, tokens_in, tokens_out,"
                 " tool_calls, cost_usd, active_ms, stop_reason, error FROM tasks WHERE id = $1",
                 1, &tid);
    v->steps = cli_exec(c, db,
                        "SELECT step_no, model, tokens_in, tokens_out, latency_ms, tool_calls FROM task_steps"
                        " WHERE task_id = $1 ORDER BY step_no DESC LIMIT 5",
                        1, &tid);
}

/* --json: {"dead_letter": {..}, "task": {..}, "last_steps": [..]}. */
static void print_dead_json(const dead_view_t *v) {
    cJSON *o = cJSON_CreateObject();
    cJSON *dl = rows_json(v->dead);
    cJSON_AddItemToObject(o, "dead_letter", cJSON_DetachItemFromArray(dl, 0));
    cJSON_Delete(dl);
    if (v->task != NULL && PQntuples(v->task) > 0) {
        cJSON *tj = rows_json(v->task);
        cJSON_AddItemToObject(o, "task", cJSON_DetachItemFromArray(tj, 0));
        cJSON_Delete(tj);
    }
    if (v->steps != NULL) {
        cJSON_AddItemToObject(o, "last_steps", rows_json(v->steps));
    }
    cli_print_json(o);
    cJSON_Delete(o);
}

/* The non-null columns of the dead letter and of its task, then its last steps. */
static void print_dead_text(const dead_view_t *v) {
    const PGresult *d = v->dead, *t = v->task, *s = v->steps;
    for (int col = 0; col < PQnfields(d); col++) {
        if (!PQgetisnull(d, 0, col)) {
            printf("%-14s %.300s\n", PQfname(d, col), PQgetvalue(d, 0, col));
        }
    }
    if (t != NULL && PQntuples(t) > 0) {
        printf("\ntask:\n");
        for (int col = 0; col < PQnfields(t); col++) {
            if (!PQgetisnull(t, 0, col)) {
                printf("  %-13s %s\n", PQfname(t, col), PQgetvalue(t, 0, col));
            }
        }
    }
    if (s != NULL && PQntuples(s) > 0) {
        printf("\nlast steps:\n");
        for (int i = 0; i < PQntuples(s); i++) {
            printf("  step %-4s %-20s tokens %s/%s %s ms %.100s\n", PQgetvalue(s, i, 0), PQgetvalue(s, i, 1),
                   PQgetvalue(s, i, 2), PQgetvalue(s, i, 3), PQgetvalue(s, i, 4), PQgetvalue(s, i, 5));
        }
    }
}

static const char show_usage[] =
    "usage: longrun dlq show ID|TASK_ID [--json]\n"
    "\nOne dead letter: reason, last error, attempts, budget used, the last steps, and the raw\n"
    "body of a malformed message.\n";

static int dlq_show(cli_t *c, int argc, char **argv) {
    dead_view_t v = {NULL, NULL, NULL};
    PGconn *db;
    int rc = cli_no_options(c, argc, argv, show_usage, CLI_UNKNOWN_SAY_SO);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    if (optind + 1 != argc) {
        return cli_fail(c, LR_EXIT_USAGE, "exactly one ID is expected");
    }
    db = cli_db_connect(c);
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    v.dead = find_dead(c, db, argv[optind]);
    if (v.dead == NULL || PQntuples(v.dead) == 0) {
        if (v.dead != NULL) {
            cli_fail(c, LR_EXIT_USAGE, "no dead letter %s", argv[optind]);
        }
        PQclear(v.dead);
        PQfinish(db);
        return LR_EXIT_USAGE;
    }
    read_dead_task(c, db, &v);
    if (c->json) {
        print_dead_json(&v);
    } else {
        print_dead_text(&v);
    }
    PQclear(v.dead);
    PQclear(v.task);
    PQclear(v.steps);
    PQfinish(db);
    return LR_EXIT_OK;
}

/* ---------------------------------------------------------------- requeue */

/* One `dlq requeue`: what was asked, then the selected tasks and the counts.
 * Owns ids, budgets, db and sel (freed at the end of dlq_requeue()); the
 * strings are borrowed from argv. */
typedef struct requeue {
    cli_t *c;
    bool all, dry, reset;
    const char *reason;   /* --reason: every dead task with this stop reason */
    const char *deadline; /* --deadline, or NULL */
    const char *model;    /* --model, or NULL */
    lr_budgets_t b;       /* the budget overrides */
    cJSON *ids;           /* the IDs given, as a JSON array */
    char *budgets;        /* b as JSON text */
    PGconn *db;
    PGresult *sel; /* the dead tasks selected: id, queue, step, agent, stop_reason */
    long total, done, published;
} requeue_t;

static void requeue_usage(void) {
    printf("usage: longrun dlq requeue ID... | --all | --reason R  [overrides] [--dry-run] [--json]\n"
           "\nRequeues dead tasks; each resumes from its last good step (no step runs again).\n"
           "  --max-steps N --max-tokens N --max-cost USD --max-tool-calls N --max-seconds N\n"
           "                         raise (or set) budgets\n"
           "  --deadline RFC3339     a new deadline\n"
           "  --model NAME           try this model of the agent's chain first\n"
           "  --reset-attempts       start the attempt counter again\n"
           "  --dry-run              say what would happen; change nothing\n"
           "IDs are task ids or dead-letter ids.  Bulk requeues run in batches of %d.\n",
           REQUEUE_BATCH);
}

/* A budget flag, checked and set in q->b.  Returns 0, or -1 after printing why. */
static int requeue_budget(requeue_t *q, int opt, const char *arg) {
    char err[256];
    double v;
    const cli_budget_flag_t *f = cli_budget_option(q->c, opt, arg, &v);
    if (f == NULL) {
        return -1;
    }
    if (lr_budget_set(&q->b, f->budget, v, err, sizeof(err)) != 0) {
        return cli_fail(q->c, -1, "%s: %s", f->flag, err);
    }
    return 0;
}

/* The IDs after the options: each a task id or a dead-letter id, added to
 * q->ids.  Returns 0, or -1 after printing why. */
static int requeue_ids(requeue_t *q, int argc, char **argv) {
    for (int i = optind; i < argc; i++) {
        char *end = NULL;
        strtol(argv[i], &end, 10);
        if (!lr_uuid_valid(argv[i]) && !(end != argv[i] && *end == '\0')) {
            return cli_fail(q->c, -1, "'%s' is neither a task id nor a dead-letter id", argv[i]);
        }
        cJSON_AddItemToArray(q->ids, cJSON_CreateString(argv[i]));
    }
    return 0;
}

/* Parses the options and IDs into q.  Returns 0 to go on, -1 after --help,
 * or an exit code after printing why. */
static int requeue_options(requeue_t *q, int argc, char **argv) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"all", no_argument, NULL, D_ALL},
                                         {"reason", required_argument, NULL, D_REASON},
                                         {"dry-run", no_argument, NULL, D_DRY_RUN},
                                         CLI_BUDGET_OPTIONS,
                                         {"deadline", required_argument, NULL, D_DEADLINE},
                                         {"model", required_argument, NULL, D_MODEL},
                                         {"reset-attempts", no_argument, NULL, D_RESET},
                                         CLI_ACTOR_OPTION,
                                         {NULL, 0, NULL, 0}};
    int opt;
    while ((opt = cli_next_option(q->c, argc, argv, "h", opts)) != -1) {
        switch (opt) {
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        case 'h': requeue_usage(); return -1;
        case D_ALL: q->all = true; break;
        case D_REASON: q->reason = optarg; break;
        case D_DRY_RUN: q->dry = true; break;
        case D_RESET: q->reset = true; break;
        case D_DEADLINE:
            if (!lr_rfc3339_valid(optarg)) {
                return cli_fail(q->c, LR_EXIT_USAGE, "--deadline: '%s' is not an RFC 3339 time", optarg);
            }
            q->deadline = optarg;
            break;
        case D_MODEL: q->model = optarg; break;
        case OPT_MAX_STEPS:
        case OPT_MAX_TOKENS:
        case OPT_MAX_COST:
        case OPT_MAX_SECONDS:
        case OPT_MAX_TOOL_CALLS:
            if (requeue_budget(q, opt, optarg) != 0) {
                return LR_EXIT_USAGE;
            }
            break;
        default: return cli_fail(q->c, LR_EXIT_USAGE, "unknown option (see --help)");
        }
    }
    if ((q->all ? 1 : 0) + (q->reason != NULL ? 1 : 0) + (optind < argc ? 1 : 0) != 1) {
        return cli_fail(q->c, LR_EXIT_USAGE, "give either task/dead-letter IDs, or --all, or --reason R (exactly one)");
    }
    return requeue_ids(q, argc, argv) != 0 ? LR_EXIT_USAGE : 0;
}

/* Selects the dead tasks asked for into q->sel, in a stable order.  Returns
 * 0, or an exit code after printing why (an ID that is not a dead task). */
static int select_dead(requeue_t *q) {
    char *idtxt = cJSON_PrintUnformatted(q->ids);
    const char *p[3] = {q->all ? "true" : "false", q->reason, idtxt};
    int nids = cJSON_GetArraySize(q->ids);
    q->sel =
        cli_exec(q->c, q->db,
                 "SELECT t.id::text, t.queue, t.step, t.agent, t.stop_reason FROM tasks t WHERE t.status = 'dead' AND"
                 " ($1::bool OR ($2::text IS NOT NULL AND t.stop_reason = $2) OR t.id::text IN"
                 "  (SELECT x FROM jsonb_array_elements_text($3::jsonb) x) OR t.id IN (SELECT task_id FROM"
                 "  dead_letters WHERE id::text IN (SELECT x FROM jsonb_array_elements_text($3::jsonb) x)))"
                 " ORDER BY t.id",
                 3, p);
    free(idtxt);
    if (q->sel == NULL) {
        return LR_EXIT_FAIL;
    }
    q->total = PQntuples(q->sel);
    if (nids > 0 && q->total < nids) {
        return cli_fail(q->c, LR_EXIT_USAGE,
                        "%d of the %d ids are not dead tasks (unknown, not dead, or a malformed "
                        "message with no task); nothing was changed",
                        nids - (int)q->total, nids);
    }
    return 0;
}

/* --dry-run: what would be requeued, from which step, with which budgets. */
static void print_dry_run(const requeue_t *q) {
    PGresult *sel = q->sel;
    bool overrides = q->budgets != NULL && strcmp(q->budgets, "{}") != 0;
    if (q->c->json) {
        print_rows_json(sel);
        return;
    }
    for (int i = 0; i < PQntuples(sel); i++) {
        printf("would requeue %s (%s, dead for %s) from step %d%s%s\n", PQgetvalue(sel, i, 0), PQgetvalue(sel, i, 3),
               PQgetvalue(sel, i, 4), atoi(PQgetvalue(sel, i, 2)) + 1, overrides ? " with budgets " : "",
               overrides ? q->budgets : "");
    }
    printf("dry run: %ld task(s) would be requeued; nothing was changed\n", q->total);
}

/* Requeues the selected tasks from start on, at most REQUEUE_BATCH of them,
 * in one statement (one transaction), then publishes their continuations.
 * Returns 0, or -1 on a database error (message printed). */
static int requeue_batch(requeue_t *q, long start) {
    cJSON *batch = cJSON_CreateArray();
    char *btxt;
    PGresult *u;
    int pub = 0;
    for (long i = start; i < q->total && i < start + REQUEUE_BATCH; i++) {
        cJSON_AddItemToArray(batch, cJSON_CreateString(PQgetvalue(q->sel, (int)i, 0)));
    }
    btxt = cJSON_PrintUnformatted(batch);
    cJSON_Delete(batch);
    {
        const char *p[6] = {btxt, q->budgets, q->reset ? "true" : "false", q->deadline, q->model, cli_actor(q->c)};
        u = cli_exec(
            q->c, q->db,
            "WITH u AS (UPDATE tasks t SET status = 'queued', budgets = t.budgets || $2::jsonb,"
            "  attempt = CASE WHEN $3::bool THEN 0 ELSE t.attempt END, claims = 0,"
            "  deadline = coalesce($4::timestamptz, t.deadline),"
            "  metadata = CASE WHEN $5::text IS NULL THEN t.metadata ELSE"
            "   coalesce(t.metadata, '{}'::jsonb) || jsonb_build_object('model_override', $5::text) END,"
            "  stop_reason = NULL, error = NULL, finished_at = NULL, lease_owner = NULL,"
            "  lease_expires_at = NULL, published_at = NULL, updated_at = now()"
            "  WHERE t.status = 'dead' AND t.id::text IN (SELECT x FROM jsonb_array_elements_text($1::jsonb) x)"
            "  RETURNING t.id, t.queue),"
            " d AS (UPDATE dead_letters SET requeued_at = now(), requeued_by = $6"
            "  WHERE task_id IN (SELECT id FROM u) AND requeued_at IS NULL),"
            " e AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor, detail)"
            "  SELECT id, 'dead', 'queued', 'requeued', $6, jsonb_build_object('budgets', $2::jsonb,"
            "  'reset_attempts', $3::bool, 'deadline', $4::text, 'model', $5::text) FROM u)"
            " SELECT id::text, queue FROM u ORDER BY queue",
            6, p);
    }
    free(btxt);
    if (u == NULL) {
        return -1;
    }
    q->done += PQntuples(u);
    (void)cli_publish_continuations(q->c, q->db, u, 0, 1, &pub);
    q->published += pub;
    PQclear(u);
    return 0;
}

/* The progress bar of a requeue of more than one batch, on stderr. */
static void print_progress(const requeue_t *q) {
    int width = 40;
    int filled = (int)(width * q->done / (q->total ? q->total : 1));
    fprintf(stderr, "\r[%.*s%*s] %ld/%ld requeued", filled, "########################################", width - filled,
            "", q->done, q->total);
    if (q->done == q->total) {
        fputc('\n', stderr);
    }
}

/* What was requeued and how much of it was dispatched now. */
static void print_requeued(const requeue_t *q) {
    if (q->c->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddNumberToObject(j, "requeued", (double)q->done);
        cJSON_AddNumberToObject(j, "published", (double)q->published);
        cli_print_json(j);
        cJSON_Delete(j);
    } else {
        printf("requeued %ld task(s); %ld dispatched now%s\n", q->done, q->published,
               q->published < q->done ? ", the rest by the scheduler's outbox sweep" : "");
    }
}

/* Requeues every selected task, batch by batch.  Returns an exit code. */
static int requeue_all(requeue_t *q) {
    for (long start = 0; start < q->total; start += REQUEUE_BATCH) {
        if (requeue_batch(q, start) != 0) {
            return LR_EXIT_FAIL;
        }
        if (!q->c->json && q->total > REQUEUE_BATCH) {
            print_progress(q);
        }
    }
    PQclear(PQexec(q->db, "NOTIFY longrun_wakeup"));
    print_requeued(q);
    return LR_EXIT_OK;
}

static int dlq_requeue(cli_t *c, int argc, char **argv) {
    requeue_t q;
    int rc;

    memset(&q, 0, sizeof(q));
    q.c = c;
    q.ids = cJSON_CreateArray();
    lr_budgets_init(&q.b);
    rc = requeue_options(&q, argc, argv);
    if (rc != 0) {
        rc = rc < 0 ? LR_EXIT_OK : rc;
        goto out;
    }
    q.budgets = lr_budgets_to_json(&q.b);
    q.db = cli_db_connect(c);
    if (q.db == NULL) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    /* validated by the worker against the agent's chain at run time */
    if (q.model != NULL && strlen(q.model) > 200) {
        rc = cli_fail(c, LR_EXIT_USAGE, "--model: too long");
        goto out;
    }
    rc = select_dead(&q);
    if (rc != 0) {
        goto out;
    }
    if (q.dry) {
        print_dry_run(&q);
        rc = LR_EXIT_OK;
        goto out;
    }
    rc = requeue_all(&q);
out:
    cJSON_Delete(q.ids);
    free(q.budgets);
    PQclear(q.sel);
    PQfinish(q.db);
    return rc;
}

/* ------------------------------------------------------------------ purge */

static int dlq_purge(cli_t *c, int argc, char **argv) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"older-than", required_argument, NULL, D_OLDER},
                                         {"dry-run", no_argument, NULL, D_DRY_RUN},
                                         {NULL, 0, NULL, 0}};
    char iv[64] = "";
    bool dry = false;
    int opt;
    PGconn *db;
    PGresult *r;
    while ((opt = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (opt) {
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        case 'h':
            printf("usage: longrun dlq purge --older-than 30d [--dry-run] [--json]\n"
                   "\nDeletes dead-letter records older than the given age (the tasks stay).\n");
            return LR_EXIT_OK;
        case D_OLDER:
            if (cli_duration(optarg, iv, sizeof(iv)) != 0) {
                return cli_fail(c, LR_EXIT_USAGE, "--older-than: '%s' is not a duration like 12h or 30d", optarg);
            }
            break;
        case D_DRY_RUN: dry = true; break;
        default: return cli_fail(c, LR_EXIT_USAGE, "unknown option (see --help)");
        }
    }
    if (iv[0] == '\0') {
        return cli_fail(c, LR_EXIT_USAGE, "--older-than is required");
    }
    db = cli_db_connect(c);
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    {
        const char *p[1] = {iv};
        r = cli_exec(c, db,
                     dry ? "SELECT count(*) FROM dead_letters WHERE created_at < now() - $1::interval"
                         : "WITH d AS (DELETE FROM dead_letters WHERE created_at < now() - $1::interval RETURNING 1)"
                           " SELECT count(*) FROM d",
                     1, p);
    }
    if (r == NULL) {
        PQfinish(db);
        return LR_EXIT_FAIL;
    }
    if (c->json) {
        printf("{\"%s\":%s}\n", dry ? "would_delete" : "deleted", PQgetvalue(r, 0, 0));
    } else {
        printf("%s %s dead letter(s) older than %s\n", dry ? "would delete" : "deleted", PQgetvalue(r, 0, 0), iv);
    }
    PQclear(r);
    PQfinish(db);
    return LR_EXIT_OK;
}

int cmd_dlq(cli_t *c, int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        FILE *f = argc < 2 ? stderr : stdout;
        fprintf(f, "usage: longrun dlq list|show|requeue|purge [options]\n"
                   "\n  list      dead letters (filters: --reason, --agent, --since)\n"
                   "  show      one dead letter with its task and last steps\n"
                   "  requeue   requeue dead tasks with optional budget overrides\n"
                   "  purge     delete old dead-letter records\n");
        return argc < 2 ? LR_EXIT_USAGE : LR_EXIT_OK;
    }
    if (strcmp(argv[1], "list") == 0) {
        return dlq_list(c, argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "show") == 0) {
        return dlq_show(c, argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "requeue") == 0) {
        return dlq_requeue(c, argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "purge") == 0) {
        return dlq_purge(c, argc - 1, argv + 1);
    }
    return cli_fail(c, LR_EXIT_USAGE, "unknown dlq command '%s' (list, show, requeue, purge)", argv[1]);
}

/* ------------------------------------------------------------ stats/workers */

/* The database half of `longrun stats`. */
typedef struct stats_rows {
    PGresult *by_status; /* status, count */
    PGresult *rate;      /* steps per second over 1 and 5 minutes */
    PGresult *by_reason; /* dead letters: reason, count */
    PGresult *queues;    /* the queue names */
} stats_rows_t;

static void stats_rows_clear(stats_rows_t *s) {
    PQclear(s->by_status);
    PQclear(s->rate);
    PQclear(s->by_reason);
    PQclear(s->queues);
}

/* Runs the four queries.  Returns 0, or -1 when one failed (message printed;
 * the caller clears s either way). */
static int stats_query(cli_t *c, PGconn *db, stats_rows_t *s) {
    s->by_status = cli_exec(c, db, "SELECT status, count(*) FROM tasks GROUP BY status ORDER BY status", 0, NULL);
    s->rate = cli_exec(c, db,
                       "SELECT count(*) FILTER (WHERE created_at > now() - interval '1 minute') / 60.0,"
                       " count(*) / 300.0 FROM task_steps WHERE created_at > now() - interval '5 minutes'",
                       0, NULL);
    s->by_reason =
        cli_exec(c, db, "SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY 2 DESC", 0, NULL);
    s->queues = cli_exec(c, db, "SELECT DISTINCT queue FROM tasks UNION SELECT 'default' ORDER BY 1", 0, NULL);
    return s->by_status != NULL && s->rate != NULL && s->by_reason != NULL && s->queues != NULL ? 0 : -1;
}

/* The database numbers of s into o: "tasks", "steps_per_second_1m",
 * "steps_per_second_5m", "dead_letters". */
static void add_stats_rows(cJSON *o, const stats_rows_t *s) {
    cJSON *by = cJSON_AddObjectToObject(o, "tasks");
    for (int i = 0; i < PQntuples(s->by_status); i++) {
        cJSON_AddNumberToObject(by, PQgetvalue(s->by_status, i, 0), atof(PQgetvalue(s->by_status, i, 1)));
    }
    cJSON_AddNumberToObject(o, "steps_per_second_1m", atof(PQgetvalue(s->rate, 0, 0)));
    cJSON_AddNumberToObject(o, "steps_per_second_5m", atof(PQgetvalue(s->rate, 0, 1)));
    by = cJSON_AddObjectToObject(o, "dead_letters");
    for (int i = 0; i < PQntuples(s->by_reason); i++) {
        cJSON_AddNumberToObject(by, PQgetvalue(s->by_reason, i, 0), atof(PQgetvalue(s->by_reason, i, 1)));
    }
}

/* The depth and consumers of each task queue named in names, then of the
 * dead-letter queue, from RabbitMQ into o's "queues"; "queues_error" when
 * RabbitMQ is unreachable. */
static void add_queue_depths(cli_t *c, cJSON *o, PGresult *names) {
    cJSON *queues = cJSON_CreateArray();
    lr_amqp_sync_t *a = NULL;
    char err[256];
    if (lr_amqp_sync_connect(&a, c->cfg.amqp_url, 5000, err, sizeof(err)) == 0) {
        for (int i = 0; i <= PQntuples(names); i++) {
            char name[200];
            uint32_t msgs = 0, cons = 0;
            if (i < PQntuples(names)) {
                snprintf(name, sizeof(name), "%s%s", LR_AMQP_QUEUE_PREFIX, PQgetvalue(names, i, 0));
            } else {
                snprintf(name, sizeof(name), "%s", LR_AMQP_DEAD_QUEUE);
            }
            if (lr_amqp_sync_queue_info(a, name, &msgs, &cons, err, sizeof(err)) == 0) {
                cJSON *q = cJSON_CreateObject();
                cJSON_AddStringToObject(q, "queue", name);
                cJSON_AddNumberToObject(q, "ready", msgs);
                cJSON_AddNumberToObject(q, "consumers", cons);
                cJSON_AddItemToArray(queues, q);
            }
        }
        lr_amqp_sync_close(a);
    } else {
        char masked[1100];
        (void)lr_config_mask_secrets(err, masked, sizeof(masked));
        cJSON_AddStringToObject(o, "queues_error", masked);
    }
    cJSON_AddItemToObject(o, "queues", queues);
}

/* The stats o (and the throughput of s) as four lines of text. */
static void print_stats_text(const cJSON *o, const stats_rows_t *s) {
    const cJSON *x;
    printf("tasks:");
    cJSON_ArrayForEach(x, cJSON_GetObjectItem(o, "tasks")) {
        printf("  %s %.0f", x->string, x->valuedouble);
    }
    printf("\nthroughput: %.1f steps/s (1 min), %.1f steps/s (5 min)\n", atof(PQgetvalue(s->rate, 0, 0)),
           atof(PQgetvalue(s->rate, 0, 1)));
    printf("queues:");
    cJSON_ArrayForEach(x, cJSON_GetObjectItem(o, "queues")) {
        printf("  %s ready=%.0f consumers=%.0f", cJSON_GetStringValue(cJSON_GetObjectItem(x, "queue")),
               cJSON_GetObjectItem(x, "ready")->valuedouble, cJSON_GetObjectItem(x, "consumers")->valuedouble);
    }
    if (cJSON_GetObjectItem(o, "queues_error") != NULL) {
        printf(" (RabbitMQ unreachable: %s)", cJSON_GetStringValue(cJSON_GetObjectItem(o, "queues_error")));
    }
    printf("\ndead letters:");
    cJSON_ArrayForEach(x, cJSON_GetObjectItem(o, "dead_letters")) {
        printf("  %s %.0f", x->string, x->valuedouble);
    }
    printf("\n");
}

static const char stats_usage[] =
    "usage: longrun stats [--json]\n\nTasks by status, queue depths (RabbitMQ), steps per second over\n"
    "the last 1 and 5 minutes, dead letters by reason.\n";

int cmd_stats(cli_t *c, int argc, char **argv) {
    stats_rows_t s = {NULL, NULL, NULL, NULL};
    PGconn *db;
    cJSON *o;
    int rc = cli_no_options(c, argc, argv, stats_usage, CLI_UNKNOWN_SAY_SO);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    db = cli_db_connect(c);
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    if (stats_query(c, db, &s) != 0) {
        stats_rows_clear(&s);
        PQfinish(db);
        return LR_EXIT_FAIL;
    }
    o = cJSON_CreateObject();
    add_stats_rows(o, &s);
    add_queue_depths(c, o, s.queues);
    if (c->json) {
        cli_print_json(o);
    } else {
        print_stats_text(o, &s);
    }
    cJSON_Delete(o);
    stats_rows_clear(&s);
    PQfinish(db);
    return LR_EXIT_OK;
}

static void print_workers(PGresult *r) {
    printf("%-28s %-8s %-12s %9s %8s %s\n", "WORKER", "VERSION", "QUEUES", "IN FLIGHT", "DRAINING", "HEARTBEAT");
    for (int i = 0; i < PQntuples(r); i++) {
        printf("%-28.28s %-8s %-12.12s %4s/%-4s %8s %ss ago\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 3),
               PQgetvalue(r, i, 4), PQgetvalue(r, i, 5), PQgetvalue(r, i, 6),
               PQgetvalue(r, i, 7)[0] == 't' ? "yes" : "no", PQgetvalue(r, i, 9));
    }
}

static const char workers_usage[] =
    "usage: longrun workers [--json]\n\nLive workers (heartbeat in the last 30 s): version, "
    "queues, in-flight tasks, draining, last heartbeat.\n";

int cmd_workers(cli_t *c, int argc, char **argv) {
    static const rows_query_t q =
        {"SELECT id, hostname, pid, version, array_to_string(queues, ',') AS queues, in_flight, max_in_flight,"
         " draining, to_char(heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS heartbeat_at,"
         " round(extract(epoch FROM now() - heartbeat_at)::numeric, 1) AS seconds_ago"
         " FROM workers WHERE heartbeat_at > now() - interval '30 seconds' ORDER BY id",
         0, NULL, print_workers};
    int rc = cli_no_options(c, argc, argv, workers_usage, CLI_UNKNOWN_SAY_SO);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    return show_rows(c, &q);
}

/* ---------------------------------------------------------- kill switches */

/* Parses the options of `tools`/`models` (kind "tool" or "model"): --reason
 * into *reason.  Returns 0 to go on, -1 after --help, or an exit code after
 * printing why. */
static int flag_options(cli_t *c, int argc, char **argv, const char *kind, const char **reason) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"reason", required_argument, NULL, D_REASON},
                                         CLI_ACTOR_OPTION,
                                         {NULL, 0, NULL, 0}};
    int opt;
    while ((opt = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        if (opt == CLI_OPT_INVALID) {
            return LR_EXIT_USAGE;
        }
        if (opt == 'h') {
            printf("usage: longrun %ss disable|enable NAME [--reason TEXT] [--actor NAME]\n"
                   "       longrun %ss list\n"
                   "\nFleet-wide kill switch, effective within seconds (workers are notified).%s\n",
                   kind, kind,
                   strcmp(kind, "tool") == 0 ? "\nNAME '@writes' switches off every tool marked \"writes\": true."
                                             : "");
            return -1;
        }
        if (opt != D_REASON) {
            return cli_fail(c, LR_EXIT_USAGE, "unknown option (see --help)");
        }
        *reason = optarg;
    }
    return 0;
}

static void print_flags(PGresult *r) {
    for (int i = 0; i < PQntuples(r); i++) {
        printf("%-6s %-24s %s  by %s: %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
               PQgetvalue(r, i, 2)[0] == 't' ? "DISABLED" : "enabled ", PQgetvalue(r, i, 4), PQgetvalue(r, i, 3));
    }
}

/* One switch to throw: a tool or model (or, for tools, "@writes": every
 * tool marked "writes") disabled or enabled fleet-wide. */
typedef struct flag_change {
    const char *kind; /* "tool" or "model" */
    const char *name;
    bool disable;
    const char *reason; /* --reason, or NULL */
} flag_change_t;

/* Records the switch and notifies the workers.  Returns an exit code. */
static int flag_set(cli_t *c, const flag_change_t *f) {
    PGconn *db = cli_db_connect(c);
    PGresult *r;
    bool writes = strcmp(f->kind, "tool") == 0 && strcmp(f->name, "@writes") == 0;
    const char *p[5] = {writes ? "writes" : f->kind, writes ? "*" : f->name, f->disable ? "true" : "false", f->reason,
                        cli_actor(c)};
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    r = cli_exec(c, db,
                 "INSERT INTO flags (kind, name, disabled, reason, actor) VALUES ($1, $2, $3::bool, $4, $5)"
                 " ON CONFLICT (kind, name) DO UPDATE SET disabled = EXCLUDED.disabled, reason = EXCLUDED.reason,"
                 " actor = EXCLUDED.actor, updated_at = now()",
                 5, p);
    if (r != NULL) {
        PQclear(PQexec(db, "NOTIFY longrun_flags"));
        printf("%s %s %s\n", f->kind, f->name, f->disable ? "disabled fleet-wide" : "enabled");
    }
    PQclear(r);
    PQfinish(db);
    return r != NULL ? LR_EXIT_OK : LR_EXIT_FAIL;
}

static int flag_cmd(cli_t *c, int argc, char **argv, const char *kind) {
    static const rows_query_t list =
        {"SELECT kind, name, disabled, reason, actor, updated_at::text FROM flags ORDER BY kind, name", 0, NULL,
         print_flags};
    flag_change_t f = {kind, NULL, false, NULL};
    int rc = flag_options(c, argc, argv, kind, &f.reason);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    if (optind < argc && strcmp(argv[optind], "list") == 0 && optind + 1 == argc) {
        return show_rows(c, &list);
    }
    if (optind + 2 != argc || (strcmp(argv[optind], "disable") != 0 && strcmp(argv[optind], "enable") != 0)) {
        return cli_fail(c, LR_EXIT_USAGE, "expected: disable NAME, enable NAME or list");
    }
    f.disable = strcmp(argv[optind], "disable") == 0;
    f.name = argv[optind + 1];
    if (strlen(f.name) == 0 || strlen(f.name) > 200) {
        return cli_fail(c, LR_EXIT_USAGE, "NAME: 1 to 200 characters");
    }
    return flag_set(c, &f);
}

int cmd_tools(cli_t *c, int argc, char **argv) { return flag_cmd(c, argc, argv, "tool"); }
int cmd_models(cli_t *c, int argc, char **argv) { return flag_cmd(c, argc, argv, "model"); }
