/* inspect.c - `longrun status ID` and `longrun list`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cli.h"
#include "task.h"

/* Columns shown by status (and in JSON, typed). */
static const char *const status_cols =
    "id, queue, agent, status, step, attempt, max_attempts, claims_total, lease_epoch, lease_owner,"
    " to_char(lease_expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS lease_expires_at,"
    " suspend_reason, wait_event,"
    " to_char(resume_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS resume_at,"
    " stop_reason, result::text AS result, error, tenant, budgets::text AS budgets,"
    " tokens_in, tokens_out, tokens_cached, tool_calls, cost_usd, active_ms,"
    " to_char(deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS deadline,"
    " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at,"
    " to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS updated_at,"
    " to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS finished_at";

static bool numeric_col(const char *name) {
    static const char *const nums[] = {"step",        "attempt",   "max_attempts", "claims_total",
                                       "lease_epoch", "tokens_in", "tokens_out",   "tokens_cached",
                                       "tool_calls",  "cost_usd",  "active_ms",    "count",
                                       NULL};
    for (int i = 0; nums[i] != NULL; i++) {
        if (strcmp(name, nums[i]) == 0) {
            return true;
        }
    }
    return false;
}

/* Row r of res as a JSON object (jsonb columns embedded as JSON). */
static cJSON *row_json(const PGresult *res, int r) {
    cJSON *o = cJSON_CreateObject();
    for (int col = 0; col < PQnfields(res); col++) {
        const char *name = PQfname(res, col);
        const char *v = PQgetisnull(res, r, col) ? NULL : PQgetvalue(res, r, col);
        if (v == NULL) {
            cJSON_AddNullToObject(o, name);
        } else if (numeric_col(name)) {
            cJSON_AddNumberToObject(o, name, strtod(v, NULL));
        } else if (strcmp(name, "result") == 0 || strcmp(name, "budgets") == 0) {
            cJSON *j = cJSON_Parse(v);
            if (j != NULL) {
                cJSON_AddItemToObject(o, name, j);
            } else {
                cJSON_AddStringToObject(o, name, v);
            }
        } else {
            cJSON_AddStringToObject(o, name, v);
        }
    }
    return o;
}

static const char status_usage[] =
    "usage: longrun status ID [--json]\n"
    "\n"
    "Shows one task: status, step, attempts, lease, budgets and usage, result or error.\n"
    "Exit code 2 when the id is malformed or unknown.\n";

int cmd_status(cli_t *c, int argc, char **argv) {
    int rc = cli_no_options(c, argc, argv, status_usage, CLI_UNKNOWN_USAGE);
    PGconn *db = NULL;
    PGresult *res = NULL;
    char sql[4096];
    const char *id;

    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    if ((rc = cli_task_id_operand(c, argc, argv, &id)) != 0) {
        return rc;
    }
    db = cli_db_connect(c);
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    snprintf(sql, sizeof(sql), "SELECT %s FROM tasks WHERE id = $1", status_cols);
    res = cli_exec(c, db, sql, 1, &id);
    if (res == NULL) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    if (PQntuples(res) == 0) {
        rc = cli_fail(c, LR_EXIT_USAGE, "no task with id %s", id);
        goto out;
    }
    if (c->json) {
        cJSON *o = row_json(res, 0);
        cli_print_json(o);
        cJSON_Delete(o);
    } else {
        for (int col = 0; col < PQnfields(res); col++) {
            if (!PQgetisnull(res, 0, col)) {
                printf("%-17s %s\n", PQfname(res, col), PQgetvalue(res, 0, col));
            }
        }
    }
    rc = LR_EXIT_OK;
out:
    PQclear(res);
    PQfinish(db);
    return rc;
}

static void list_usage(FILE *f) {
    fprintf(f, "usage: longrun list [--status S] [--queue Q] [--agent A] [--tenant T]\n"
               "                    [--since DURATION|RFC3339] [--limit N] [--offset N] [--json]\n"
               "\n"
               "Lists tasks, newest first.\n"
               "  --status S   queued, running, suspended, retry_wait, succeeded, failed, dead, cancelled\n"
               "  --since D    created within D (e.g. 15m, 2h, 7d) or after an RFC 3339 time\n"
               "  --limit N    rows to show (1..10000, default 50); --offset N skips rows (paging)\n");
}

static bool valid_status(const char *s) {
    static const char *const st[] = {"queued", "running", "suspended", "retry_wait", "succeeded",
                                     "failed", "dead",    "cancelled", NULL};
    for (int i = 0; st[i] != NULL; i++) {
        if (strcmp(s, st[i]) == 0) {
            return true;
        }
    }
    return false;
}

/* "15m" -> "@interval:15 minutes"; RFC 3339 passes through.  0 ok, -1 invalid. */
static int since_param(const char *s, char *out, size_t outlen) {
    char iv[64];
    if (lr_rfc3339_valid(s)) {
        snprintf(out, outlen, "%s", s);
        return 0;
    }
    if (cli_duration(s, iv, sizeof(iv)) != 0) {
        return -1;
    }
    snprintf(out, outlen, "@interval:%s", iv);
    return 0;
}

/* The parameters of the list query: the filters, then the page. */
typedef struct list_query {
    const char *params[8]; /* status, queue, agent, tenant, since (time), since (interval), limit, offset */
    char since[128];       /* --since as since_param() gives it */
    char lim[16];
    char off[16];
} list_query_t;

/* Parses the options of `longrun list` into q.  Returns 0 to go on, -1 after
 * --help, or an exit code after printing why. */
static int list_options(cli_t *c, int argc, char **argv, list_query_t *q) {
    enum { L_STATUS = OPT_FIRST_COMMAND_OPTION, L_QUEUE, L_AGENT, L_TENANT, L_SINCE, L_LIMIT, L_OFFSET };
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"status", required_argument, NULL, L_STATUS},
                                         {"queue", required_argument, NULL, L_QUEUE},
                                         {"agent", required_argument, NULL, L_AGENT},
                                         {"tenant", required_argument, NULL, L_TENANT},
                                         {"since", required_argument, NULL, L_SINCE},
                                         {"limit", required_argument, NULL, L_LIMIT},
                                         {"offset", required_argument, NULL, L_OFFSET},
                                         {NULL, 0, NULL, 0}};
    long v;
    int opt;
    while ((opt = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (opt) {
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        case 'h': list_usage(stdout); return -1;
        case L_STATUS:
            if (!valid_status(optarg)) {
                return cli_fail(c, LR_EXIT_USAGE,
                                "--status: '%s' is not a status (queued, running, suspended, retry_wait, "
                                "succeeded, failed, dead, cancelled)",
                                optarg);
            }
            q->params[0] = optarg;
            break;
        case L_QUEUE: q->params[1] = optarg; break;
        case L_AGENT: q->params[2] = optarg; break;
        case L_TENANT: q->params[3] = optarg; break;
        case L_SINCE:
            if (since_param(optarg, q->since, sizeof(q->since)) != 0) {
                return cli_fail(c, LR_EXIT_USAGE,
                                "--since: '%s' is neither a duration (30s, 15m, 2h, 7d) nor an RFC 3339 time", optarg);
            }
            break;
        case L_LIMIT:
            if (cli_parse_long(c, "--limit", optarg, 1, 10000, &v) != 0) {
                return LR_EXIT_USAGE;
            }
            snprintf(q->lim, sizeof(q->lim), "%ld", v);
            break;
        case L_OFFSET:
            if (cli_parse_long(c, "--offset", optarg, 0, 100000000, &v) != 0) {
                return LR_EXIT_USAGE;
            }
            snprintf(q->off, sizeof(q->off), "%ld", v);
            break;
        default: list_usage(stderr); return LR_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        return cli_fail(c, LR_EXIT_USAGE, "unexpected argument '%s'", argv[optind]);
    }
    return 0;
}

/* The page of tasks res as JSON or as a table (with a hint when there may be
 * more rows). */
static void print_task_list(cli_t *c, PGresult *res, const list_query_t *q) {
    if (c->json) {
        cJSON *arr = cJSON_CreateArray();
        for (int r = 0; r < PQntuples(res); r++) {
            cJSON_AddItemToArray(arr, row_json(res, r));
        }
        cli_print_json(arr);
        cJSON_Delete(arr);
        return;
    }
    printf("%-36s  %-10s  %-16s  %-10s  %5s  %s\n", "ID", "QUEUE", "AGENT", "STATUS", "STEP", "UPDATED");
    for (int r = 0; r < PQntuples(res); r++) {
        printf("%-36s  %-10.10s  %-16.16s  %-10s  %5s  %s\n", PQgetvalue(res, r, 0), PQgetvalue(res, r, 1),
               PQgetvalue(res, r, 2), PQgetvalue(res, r, 3), PQgetvalue(res, r, 4), PQgetvalue(res, r, 9));
    }
    if (PQntuples(res) == atoi(q->lim)) {
        printf("(more rows: use --offset %d)\n", atoi(q->off) + atoi(q->lim));
    }
}

int cmd_list(cli_t *c, int argc, char **argv) {
    list_query_t q = {{NULL}, "", "50", "0"};
    PGconn *db;
    PGresult *res;
    int rc = list_options(c, argc, argv, &q);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    if (strncmp(q.since, "@interval:", 10) == 0) {
        q.params[4] = NULL;
        q.params[5] = q.since + 10;
    } else if (q.since[0] != '\0') {
        q.params[4] = q.since;
    }
    q.params[6] = q.lim;
    q.params[7] = q.off;
    db = cli_db_connect(c);
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    res = cli_exec(c, db,
                   "SELECT id, queue, agent, status, step, attempt, tenant, stop_reason,"
                   " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS created_at,"
                   " to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS updated_at"
                   " FROM tasks WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR queue = $2)"
                   " AND ($3::text IS NULL OR agent = $3) AND ($4::text IS NULL OR tenant = $4)"
                   " AND ($5::timestamptz IS NULL OR created_at >= $5::timestamptz)"
                   " AND ($6::interval IS NULL OR created_at >= now() - $6::interval)"
                   " ORDER BY created_at DESC, id LIMIT $7::int OFFSET $8::int",
                   8, q.params);
    if (res != NULL) {
        print_task_list(c, res, &q);
        rc = LR_EXIT_OK;
    } else {
        rc = LR_EXIT_FAIL;
    }
    PQclear(res);
    PQfinish(db);
    return rc;
}
