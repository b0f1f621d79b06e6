/*
 * spend.c - `longrun spend`: what was spent (the report, from task_steps),
 * the spend caps with their spend and live reservations (`spend caps`),
 * and the operator's changes to the caps (`spend set-cap`).
 *
 * The report reads task_steps joined with tasks: every model call's cost
 * as its step recorded it, capped or not.  The caps read the ledger the
 * workers enforce them with (migration 0011: spend_cap_status).  set-cap
 * is one transaction of lr_spend_set_cap calls (one per period changed):
 * an operator's cap wins over the agents file's, a cleared cap is stored
 * as an operator row without an amount (a worker restart does not bring
 * the file's back), and a cap raised or cleared wakes the tasks of its
 * scope that it suspended (resume_at = now, NOTIFY longrun_wakeup), with a
 * task_events row each; the workers reload their caps on NOTIFY
 * longrun_spend.  Bad input exits 2 before anything is changed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cli.h"
#include "task.h"

#define MAX_CAP_USD 1e9

enum { S_SINCE = OPT_FIRST_COMMAND_OPTION, S_BY, S_AGENT, S_TENANT, S_DAILY, S_MONTHLY, S_CLEAR };

static const char spend_usage[] =
    "usage: longrun spend [--since DURATION] [--by day|agent|tenant|model] [--json]\n"
    "       longrun spend caps [--json]\n"
    "       longrun spend set-cap (--agent NAME | --tenant NAME) [--daily USD|none] [--monthly USD|none]\n"
    "                             [--clear] [--actor NAME] [--json]\n"
    "\n"
    "What model calls cost, and the spend caps that bound it (UTC days and months).\n"
    "\n"
    "  (report)   every step's cost since DURATION ago (default 7d; 30m, 12h, 7d, ...),\n"
    "             grouped by day (default), agent, tenant or model; from task_steps, so\n"
    "             everything spent counts, capped or not\n"
    "  caps       each cap with what its scope spent in the current period, the live\n"
    "             reservations (calls in flight), the tasks it suspended and when it resets\n"
    "  set-cap    set an agent's or a tenant's daily and/or monthly cap (USD), clear one\n"
    "             (none) or both (--clear).  An operator's cap wins over the agents file's.\n"
    "             Raising or clearing a cap resumes the tasks it suspended (spend_cap).\n"
    "\n"
    "Exit codes: 0 ok, 1 the database failed, 2 bad usage or input (nothing changed).\n";

/* "12.5" -> 12.5 in [0, MAX_CAP_USD]; "none" -> NAN (clear).  Returns 0,
 * or an exit code after printing why. */
static int parse_usd(cli_t *c, const char *flag, const char *s, double *out) {
    char *end = NULL;
    double v;
    if (strcmp(s, "none") == 0) {
        *out = NAN;
        return 0;
    }
    v = strtod(s, &end);
    /* a decimal number only (strtod also takes hex, "inf" and leading blanks) */
    if (end == s || *end != '\0' || s[strspn(s, "0123456789.eE+-")] != '\0' || !isfinite(v) || v < 0 ||
        v > MAX_CAP_USD) {
        return cli_fail(c, LR_EXIT_USAGE, "%s: expected an amount in USD from 0 to %.0f, or none; got '%s'", flag,
                        MAX_CAP_USD, s);
    }
    *out = v;
    return 0;
}

/* A numeric column as a JSON number, or null. */
static cJSON *num_or_null(const PGresult *r, int row, int col) {
    return PQgetisnull(r, row, col) ? cJSON_CreateNull() : cJSON_CreateNumber(strtod(PQgetvalue(r, row, col), NULL));
}

/* ---------------------------------------------------------------- report */

static int spend_report(cli_t *c, const char *since, const char *by) {
    char interval[64], sql[1024];
    const char *key;
    PGconn *db;
    PGresult *r = NULL;
    double tot[5] = {0};
    int rc = LR_EXIT_OK;
    if (cli_duration(since, interval, sizeof(interval)) != 0) {
        return cli_fail(c, LR_EXIT_USAGE, "--since: expected a duration like 30m, 12h or 7d; got '%s'", since);
    }
    if (strcmp(by, "day") == 0) {
        key = "to_char(s.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')";
    } else if (strcmp(by, "agent") == 0) {
        key = "t.agent";
    } else if (strcmp(by, "tenant") == 0) {
        key = "t.tenant";
    } else if (strcmp(by, "model") == 0) {
        key = "s.model";
    } else {
        return cli_fail(c, LR_EXIT_USAGE, "--by: expected day, agent, tenant or model; got '%s'", by);
    }
    /* steps that called a model (or cost something); the key is one of the fixed expressions above */
    snprintf(sql, sizeof(sql),
             "SELECT %s AS key, count(DISTINCT s.task_id) AS tasks, count(*) AS steps,"
             " coalesce(sum(s.tokens_in), 0) AS tokens_in, coalesce(sum(s.tokens_out), 0) AS tokens_out,"
             " coalesce(sum(s.tokens_cached), 0) AS tokens_cached, coalesce(sum(s.cost_usd), 0) AS cost_usd"
             " FROM task_steps s JOIN tasks t ON t.id = s.task_id"
             " WHERE s.created_at >= now() - $1::interval AND (s.model IS NOT NULL OR s.cost_usd <> 0)"
             " GROUP BY 1 ORDER BY 1 NULLS FIRST",
             key);
    if ((db = cli_db_connect(c)) == NULL) {
        return LR_EXIT_FAIL;
    }
    r = cli_exec(c, db, sql, 1, (const char *const[]){interval});
    if (r == NULL) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    for (int i = 0; i < PQntuples(r); i++) {
        for (int k = 0; k < 5; k++) {
            tot[k] += strtod(PQgetvalue(r, i, 2 + k), NULL);
        }
    }
    if (c->json) {
        cJSON *o = cJSON_CreateObject(), *rows = cJSON_AddArrayToObject(o, "rows"), *t;
        static const char *const cols[] = {"steps", "tokens_in", "tokens_out", "tokens_cached", "cost_usd"};
        cJSON_AddStringToObject(o, "by", by);
        cJSON_AddStringToObject(o, "since", since);
        for (int i = 0; i < PQntuples(r); i++) {
            cJSON *row = cJSON_CreateObject();
            cJSON_AddItemToObject(row, by,
                                  PQgetisnull(r, i, 0) ? cJSON_CreateNull() : cJSON_CreateString(PQgetvalue(r, i, 0)));
            cJSON_AddItemToObject(row, "tasks", num_or_null(r, i, 1));
            for (int k = 0; k < 5; k++) {
                cJSON_AddItemToObject(row, cols[k], num_or_null(r, i, 2 + k));
            }
            cJSON_AddItemToArray(rows, row);
        }
        t = cJSON_AddObjectToObject(o, "total");
        for (int k = 0; k < 5; k++) {
            cJSON_AddNumberToObject(t, cols[k], tot[k]);
        }
        cli_print_json(o);
        cJSON_Delete(o);
        goto out;
    }
    printf("Spend by %s over the last %s (UTC days; from the step log):\n", by, since);
    printf("%-28s %7s %7s %12s %12s %14s\n", by, "TASKS", "STEPS", "TOKENS IN", "TOKENS OUT", "COST USD");
    for (int i = 0; i < PQntuples(r); i++) {
        printf("%-28.28s %7s %7s %12s %12s %14.6f\n", PQgetisnull(r, i, 0) ? "(none)" : PQgetvalue(r, i, 0),
               PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4),
               strtod(PQgetvalue(r, i, 6), NULL));
    }
    printf("%-28s %7s %7.0f %12.0f %12.0f %14.6f\n", "total", "", tot[0], tot[1], tot[2], tot[4]);
out:
    PQclear(r);
    PQfinish(db);
    return rc;
}

/* ------------------------------------------------------------------ caps */

static int spend_caps(cli_t *c) {
    static const char sql[] =
        "SELECT c.scope, c.name, c.period, c.cap_usd, c.spent_usd, c.reserved_usd, c.reservations,"
        " (SELECT count(*) FROM tasks k WHERE k.status = 'suspended' AND k.suspend_reason = 'spend_cap'"
        "   AND ((c.scope = 'agent' AND k.agent = c.name) OR (c.scope = 'tenant' AND k.tenant = c.name)))"
        "   AS suspended,"
        " to_char(c.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS period_start,"
        " to_char(c.resets_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS resets_at,"
        " c.source, c.updated_by, to_char(c.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        " AS updated_at FROM spend_cap_status c ORDER BY c.scope, c.name, c.period";
    PGconn *db = cli_db_connect(c);
    PGresult *r;
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    r = cli_exec(c, db, sql, 0, NULL);
    if (r == NULL) {
        PQfinish(db);
        return LR_EXIT_FAIL;
    }
    if (c->json) {
        cJSON *arr = cJSON_CreateArray();
        for (int i = 0; i < PQntuples(r); i++) {
            cJSON *o = cJSON_CreateObject();
            for (int col = 0; col < PQnfields(r); col++) {
                bool number = col >= 3 && col <= 7;
                cJSON_AddItemToObject(o, PQfname(r, col),
                                      number                   ? num_or_null(r, i, col)
                                      : PQgetisnull(r, i, col) ? cJSON_CreateNull()
                                                               : cJSON_CreateString(PQgetvalue(r, i, col)));
            }
            cJSON_AddItemToArray(arr, o);
        }
        cli_print_json(arr);
        cJSON_Delete(arr);
    } else if (PQntuples(r) == 0) {
        puts("no spend caps (set them in the agents file or with longrun spend set-cap)");
    } else {
        printf("%-7s %-24s %-6s %12s %12s %12s %6s %9s %-21s %s\n", "SCOPE", "NAME", "PERIOD", "CAP USD", "SPENT USD",
               "RESERVED", "USED", "SUSPENDED", "RESETS AT", "SOURCE");
        for (int i = 0; i < PQntuples(r); i++) {
            double cap = strtod(PQgetvalue(r, i, 3), NULL), spent = strtod(PQgetvalue(r, i, 4), NULL);
            char capbuf[32], used[16];
            bool none = PQgetisnull(r, i, 3);
            snprintf(capbuf, sizeof(capbuf), none ? "none" : "%.6f", cap);
            snprintf(used, sizeof(used), none || cap <= 0 ? "-" : "%.1f%%", 100.0 * spent / (cap > 0 ? cap : 1));
            printf("%-7s %-24.24s %-6s %12s %12.6f %12.6f %6s %9s %-21s %s%s%s\n", PQgetvalue(r, i, 0),
                   PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), capbuf, spent, strtod(PQgetvalue(r, i, 5), NULL), used,
                   PQgetvalue(r, i, 7), PQgetvalue(r, i, 9), PQgetvalue(r, i, 10), PQgetisnull(r, i, 11) ? "" : " by ",
                   PQgetisnull(r, i, 11) ? "" : PQgetvalue(r, i, 11));
        }
    }
    PQclear(r);
    PQfinish(db);
    return LR_EXIT_OK;
}

/* --------------------------------------------------------------- set-cap */

typedef struct cap_change {
    const char *scope, *name;
    bool set[2];     /* day, month */
    double value[2]; /* USD, or NAN: clear */
} cap_change_t;

static void print_change(const char *period, const PGresult *r, bool set) {
    const char *label = strcmp(period, "day") == 0 ? "daily" : "monthly";
    if (!set) {
        printf("  %s cap unchanged\n", label);
        return;
    }
    if (PQgetvalue(r, 0, 2)[0] != 't') {
        printf("  %s cap %s%s (unchanged)\n", label, PQgetisnull(r, 0, 1) ? "" : "$",
               PQgetisnull(r, 0, 1) ? "none" : PQgetvalue(r, 0, 1));
        return;
    }
    printf("  %s cap %s%s -> %s%s", label, PQgetisnull(r, 0, 0) ? "" : "$",
           PQgetisnull(r, 0, 0) ? "none" : PQgetvalue(r, 0, 0), PQgetisnull(r, 0, 1) ? "" : "$",
           PQgetisnull(r, 0, 1) ? "none" : PQgetvalue(r, 0, 1));
    if (atoi(PQgetvalue(r, 0, 3)) > 0) {
        printf("; resumed %s task(s) it had suspended", PQgetvalue(r, 0, 3));
    }
    putchar('\n');
}

static int set_cap(cli_t *c, const cap_change_t *ch) {
    static const char *const periods[2] = {"day", "month"};
    PGconn *db = cli_db_connect(c);
    PGresult *res[2] = {NULL, NULL};
    cJSON *o = NULL, *arr = NULL;
    int rc = LR_EXIT_FAIL, woken = 0;
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    if (cli_exec_simple(c, db, "BEGIN") != 0) {
        goto out;
    }
    for (int p = 0; p < 2; p++) {
        char v[48];
        const char *params[5];
        if (!ch->set[p]) {
            continue;
        }
        snprintf(v, sizeof(v), "%.12g", ch->value[p]);
        params[0] = ch->scope;
        params[1] = ch->name;
        params[2] = periods[p];
        params[3] = isnan(ch->value[p]) ? NULL : v;
        params[4] = cli_actor(c);
        res[p] = cli_exec(c, db,
                          "SELECT old_cap, new_cap, changed, woken FROM lr_spend_set_cap($1, $2, $3, $4::numeric,"
                          " 'operator', $5)",
                          5, params);
        if (res[p] == NULL) {
            goto out;
        }
        woken += atoi(PQgetvalue(res[p], 0, 3));
    }
    if (cli_exec_simple(c, db, "COMMIT") != 0) {
        goto out;
    }
    rc = LR_EXIT_OK;
    if (c->json) {
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "scope", ch->scope);
        cJSON_AddStringToObject(o, "name", ch->name);
        arr = cJSON_AddArrayToObject(o, "changes");
        for (int p = 0; p < 2; p++) {
            cJSON *e;
            if (res[p] == NULL) {
                continue;
            }
            e = cJSON_CreateObject();
            cJSON_AddStringToObject(e, "period", periods[p]);
            cJSON_AddItemToObject(e, "old_cap_usd", num_or_null(res[p], 0, 0));
            cJSON_AddItemToObject(e, "cap_usd", num_or_null(res[p], 0, 1));
            cJSON_AddNumberToObject(e, "resumed", atoi(PQgetvalue(res[p], 0, 3)));
            cJSON_AddItemToArray(arr, e);
        }
        cJSON_AddNumberToObject(o, "resumed", woken);
        cli_print_json(o);
        cJSON_Delete(o);
    } else {
        printf("%s %s:\n", ch->scope, ch->name);
        for (int p = 0; p < 2; p++) {
            print_change(periods[p], res[p], ch->set[p]);
        }
    }
out:
    if (rc != LR_EXIT_OK) {
        PQclear(PQexec(db, "ROLLBACK"));
    }
    PQclear(res[0]);
    PQclear(res[1]);
    PQfinish(db);
    return rc;
}

static int cmd_set_cap(cli_t *c, int argc, char **argv) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         CLI_ACTOR_OPTION,
                                         {"agent", required_argument, NULL, S_AGENT},
                                         {"tenant", required_argument, NULL, S_TENANT},
                                         {"daily", required_argument, NULL, S_DAILY},
                                         {"monthly", required_argument, NULL, S_MONTHLY},
                                         {"clear", no_argument, NULL, S_CLEAR},
                                         {NULL, 0, NULL, 0}};
    cap_change_t ch = {0};
    bool clear = false;
    int o;
    while ((o = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (o) {
        case 'h': fputs(spend_usage, stdout); return LR_EXIT_OK;
        case S_AGENT:
        case S_TENANT:
            if (ch.scope != NULL) {
                return cli_fail(c, LR_EXIT_USAGE, "give one of --agent NAME or --tenant NAME, once");
            }
            ch.scope = o == S_AGENT ? "agent" : "tenant";
            ch.name = optarg;
            break;
        case S_DAILY:
        case S_MONTHLY: {
            int p = o == S_DAILY ? 0 : 1;
            const char *flag = p == 0 ? "--daily" : "--monthly";
            if (ch.set[p]) {
                return cli_fail(c, LR_EXIT_USAGE, "%s given twice", flag);
            }
            if (parse_usd(c, flag, optarg, &ch.value[p]) != 0) {
                return LR_EXIT_USAGE;
            }
            ch.set[p] = true;
            break;
        }
        case S_CLEAR: clear = true; break;
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        default: fputs(spend_usage, stderr); return LR_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        return cli_fail(c, LR_EXIT_USAGE, "unexpected argument '%s'", argv[optind]);
    }
    if (ch.scope == NULL) {
        return cli_fail(c, LR_EXIT_USAGE, "one of --agent NAME or --tenant NAME is required");
    }
    if (strcmp(ch.scope, "agent") == 0 && !lr_name_valid(ch.name)) {
        return cli_fail(c, LR_EXIT_USAGE, "--agent: '%s' is not an agent name (^[a-z0-9][a-z0-9_.-]{0,63}$)", ch.name);
    }
    if (strcmp(ch.scope, "tenant") == 0 && !lr_tenant_valid(ch.name)) {
        return cli_fail(c, LR_EXIT_USAGE, "--tenant: '%s' is not a tenant name (1-64 characters of [A-Za-z0-9_.:-])",
                        ch.name);
    }
    if (clear && (ch.set[0] || ch.set[1])) {
        return cli_fail(c, LR_EXIT_USAGE,
                        "--clear removes both caps; it cannot be combined with --daily or --monthly "
                        "(--daily none clears only the daily cap)");
    }
    if (clear) {
        ch.set[0] = ch.set[1] = true;
        ch.value[0] = ch.value[1] = NAN;
    }
    if (!ch.set[0] && !ch.set[1]) {
        return cli_fail(c, LR_EXIT_USAGE, "nothing to change: give --daily, --monthly or --clear");
    }
    return set_cap(c, &ch);
}

int cmd_spend(cli_t *c, int argc, char **argv) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"since", required_argument, NULL, S_SINCE},
                                         {"by", required_argument, NULL, S_BY},
                                         {NULL, 0, NULL, 0}};
    const char *since = "7d", *by = "day";
    int o;
    if (argc >= 2 && strcmp(argv[1], "set-cap") == 0) {
        c->prog = "longrun spend set-cap";
        return cmd_set_cap(c, argc - 1, argv + 1);
    }
    if (argc >= 2 && strcmp(argv[1], "caps") == 0) {
        int rc = cli_no_options(c, argc - 1, argv + 1, spend_usage, CLI_UNKNOWN_SAY_SO);
        if (rc != 0) {
            return rc < 0 ? LR_EXIT_OK : rc;
        }
        if (optind < argc - 1) {
            return cli_fail(c, LR_EXIT_USAGE, "caps: unexpected argument '%s'", argv[optind + 1]);
        }
        return spend_caps(c);
    }
    if (argc >= 2 && strcmp(argv[1], "report") == 0) {
        argc--;
        argv++;
    }
    while ((o = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (o) {
        case 'h': fputs(spend_usage, stdout); return LR_EXIT_OK;
        case S_SINCE: since = optarg; break;
        case S_BY: by = optarg; break;
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        default: fputs(spend_usage, stderr); return LR_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        return cli_fail(c, LR_EXIT_USAGE, "unknown subcommand '%s' (expected caps, set-cap, or the report's options)",
                        argv[optind]);
    }
    return spend_report(c, since, by);
}
