/*
 * wait.c - `longrun wait ID...` and `longrun result ID`: results without
 * polling loops.
 *
 * wait LISTENs on longrun_task_done (migration 0009: a trigger notifies
 * '<id> <status>' when a task becomes final, whoever made it so), then reads
 * the tasks it waits for; each notification, and a poll every POLL_MS as a
 * fallback for a notification lost with a connection, reads the ones still
 * open again.  Blocking, like every CLI command.
 *
 * Exit codes (docs/cli.md): 0 every task succeeded; 4 some task ended dead
 * or failed; 5 some task was cancelled (and none dead or failed); 6 the
 * timeout passed before every task was final; 2 bad usage or an unknown id;
 * 1 the database failed.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "cli.h"
#include "task.h"

enum { EXIT_DEAD = 4, EXIT_CANCELLED = 5, EXIT_TIMEOUT = 6 };

#define POLL_MS 2000
#define MAX_IDS 10000

static const char wait_usage[] =
    "usage: longrun wait ID... [--timeout SECONDS] [--json]\n"
    "       longrun wait - [--timeout SECONDS] < ids.txt\n"
    "\n"
    "Blocks until every task is final (succeeded, failed, dead or cancelled), printing each\n"
    "one as it ends (--json: one object per task: id, status, stop_reason, error).  Woken by\n"
    "PostgreSQL notifications (LISTEN longrun_task_done), with a poll every 2 s as a fallback.\n"
    "\n"
    "  --timeout SECONDS  give up after this long (default: wait as long as it takes)\n"
    "\n"
    "Exit codes: 0 every task succeeded, 4 some task ended dead or failed, 5 some task was\n"
    "cancelled (none dead or failed), 6 the timeout passed first, 2 bad usage or an unknown\n"
    "id, 1 the database failed.\n";

static const char result_usage[] =
    "usage: longrun result ID [--json]\n"
    "\n"
    "Prints a finished task's output: the answer text (or the result JSON when it has no\n"
    "text answer); --json: {id, status, result, error, stop_reason, usage}.\n"
    "\n"
    "Exit codes: 0 succeeded, 4 dead or failed (the error on stderr), 5 cancelled, 6 not\n"
    "final yet (see longrun wait), 2 bad usage or an unknown id, 1 the database failed.\n";

/* The exit code of one final status. */
static int status_code(const char *status) {
    if (strcmp(status, "succeeded") == 0) {
        return LR_EXIT_OK;
    }
    return strcmp(status, "cancelled") == 0 ? EXIT_CANCELLED : EXIT_DEAD;
}

int cli_status_exit(const char *status) { return status_code(status); }

/* The worse of two exit codes (dead or failed over cancelled over ok). */
static int worse(int a, int b) {
    if (a == EXIT_DEAD || b == EXIT_DEAD) {
        return EXIT_DEAD;
    }
    return a == EXIT_CANCELLED || b == EXIT_CANCELLED ? EXIT_CANCELLED : LR_EXIT_OK;
}

/* "{id1,id2,...}" for the ids still open (a uuid[] literal).  NULL: none. */
static char *ids_literal(char **ids, const bool *done, int n) {
    size_t len = 3;
    char *s, *p;
    int open = 0;
    for (int i = 0; i < n; i++) {
        if (!done[i]) {
            len += strlen(ids[i]) + 1;
            open++;
        }
    }
    if (open == 0 || (s = malloc(len)) == NULL) {
        return NULL;
    }
    p = s;
    *p++ = '{';
    for (int i = 0; i < n; i++) {
        if (!done[i]) {
            p += sprintf(p, "%s%s", p == s + 1 ? "" : ",", ids[i]);
        }
    }
    *p++ = '}';
    *p = '\0';
    return s;
}

static void print_final(cli_t *c, const PGresult *res, int r) {
    const char *id = PQgetvalue(res, r, 0), *status = PQgetvalue(res, r, 1);
    const char *stop = PQgetisnull(res, r, 2) ? NULL : PQgetvalue(res, r, 2);
    const char *error = PQgetisnull(res, r, 3) ? NULL : PQgetvalue(res, r, 3);
    if (c->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "id", id);
        cJSON_AddStringToObject(o, "status", status);
        if (stop != NULL) {
            cJSON_AddStringToObject(o, "stop_reason", stop);
        } else {
            cJSON_AddNullToObject(o, "stop_reason");
        }
        if (error != NULL) {
            cJSON_AddStringToObject(o, "error", error);
        } else {
            cJSON_AddNullToObject(o, "error");
        }
        cli_print_json(o);
        cJSON_Delete(o);
    } else {
        printf("%s %s%s%s%s\n", id, status, stop != NULL ? " (" : "", stop != NULL ? stop : "",
               stop != NULL ? ")" : "");
        if (error != NULL && strcmp(status, "succeeded") != 0) {
            printf("  %s\n", error);
        }
    }
    fflush(stdout);
}

/* Reads the open tasks; prints and marks those that are final.  Returns
 * the number still open, or -1 (message printed).  first: unknown ids are
 * an error (LR_EXIT_USAGE through *code). */
static int check_tasks(cli_t *c, PGconn *db, char **ids, bool *done, int n, bool first, int *code) {
    char *lit = ids_literal(ids, done, n);
    const char *p[1];
    PGresult *res;
    int open = 0, found;
    if (lit == NULL) {
        return 0;
    }
    p[0] = lit;
    res = cli_exec(c, db, "SELECT id, status, stop_reason, error FROM tasks WHERE id = ANY($1::uuid[])", 1, p);
    free(lit);
    if (res == NULL) {
        return -1;
    }
    found = PQntuples(res);
    if (first) {
        for (int i = 0; i < n; i++) {
            bool seen = false;
            for (int r = 0; r < found && !seen; r++) {
                seen = strcmp(PQgetvalue(res, r, 0), ids[i]) == 0;
            }
            if (!seen) {
                PQclear(res);
                *code = cli_fail(c, LR_EXIT_USAGE, "no task with id %s", ids[i]);
                return -1;
            }
        }
    }
    for (int i = 0; i < n; i++) {
        for (int r = 0; r < found && !done[i]; r++) {
            if (strcmp(PQgetvalue(res, r, 0), ids[i]) == 0 && cli_status_final(PQgetvalue(res, r, 1))) {
                done[i] = true;
                *code = worse(*code, status_code(PQgetvalue(res, r, 1)));
                print_final(c, res, r);
            }
        }
        open += done[i] ? 0 : 1;
    }
    PQclear(res);
    return open;
}

/* Waits up to ms for a notification on db (0: just drain).  Returns 0, or -1
 * when the connection failed (message printed). */
static int await_notify(cli_t *c, PGconn *db, long ms) {
    int fd = PQsocket(db);
    fd_set rd;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    PGnotify *nt;
    FD_ZERO(&rd);
    FD_SET(fd, &rd);
    if (select(fd + 1, &rd, NULL, NULL, &tv) < 0 && errno != EINTR) {
        return cli_fail(c, -1, "waiting for notifications: %s", strerror(errno));
    }
    if (PQconsumeInput(db) == 0) {
        return cli_fail(c, -1, "the database connection failed: %s", PQerrorMessage(db));
    }
    while ((nt = PQnotifies(db)) != NULL) {
        PQfreemem(nt); /* which task it was does not matter: the open ones are read again */
    }
    return 0;
}

/* Ids from argv[from..], or one per line on stdin for "-".  Returns the
 * count (malloc'd strings in *out), or -1 after printing why. */
static int read_ids(cli_t *c, int argc, char **argv, int from, char ***out) {
    char **ids = calloc(MAX_IDS, sizeof(char *));
    int n = 0;
    char line[128];
    if (ids == NULL) {
        return cli_fail(c, -1, "out of memory");
    }
    *out = ids;
    for (int i = from; i < argc; i++) {
        if (strcmp(argv[i], "-") == 0) {
            while (fgets(line, sizeof(line), stdin) != NULL) {
                line[strcspn(line, " \t\r\n")] = '\0';
                if (line[0] == '\0') {
                    continue;
                }
                if (n == MAX_IDS) {
                    return cli_fail(c, -1, "more than %d ids", MAX_IDS);
                }
                if (!lr_uuid_valid(line)) {
                    return cli_fail(c, -1, "'%s' is not a task id (a UUID)", line);
                }
                ids[n++] = strdup(line);
            }
            continue;
        }
        if (n == MAX_IDS) {
            return cli_fail(c, -1, "more than %d ids", MAX_IDS);
        }
        if (!lr_uuid_valid(argv[i])) {
            return cli_fail(c, -1, "'%s' is not a task id (a UUID)", argv[i]);
        }
        ids[n++] = strdup(argv[i]);
    }
    for (int i = 0; i < n; i++) {
        if (ids[i] == NULL) {
            return cli_fail(c, -1, "out of memory");
        }
    }
    return n;
}

int cli_wait_tasks(cli_t *c, PGconn *db, char **ids, int n, long timeout_s) {
    bool *done = calloc((size_t)n + 1, sizeof(bool));
    uint64_t deadline = timeout_s > 0 ? cli_mono_ms() + (uint64_t)timeout_s * 1000u : 0;
    int code = LR_EXIT_OK, open;
    if (done == NULL) {
        return cli_fail(c, LR_EXIT_FAIL, "out of memory");
    }
    if (cli_exec_simple(c, db, "LISTEN longrun_task_done") != 0) {
        free(done);
        return LR_EXIT_FAIL;
    }
    open = check_tasks(c, db, ids, done, n, true, &code);
    while (open > 0) {
        long wait = POLL_MS;
        if (deadline != 0) {
            uint64_t now = cli_mono_ms();
            if (now >= deadline) {
                break;
            }
            wait = deadline - now < (uint64_t)POLL_MS ? (long)(deadline - now) : POLL_MS;
        }
        if (await_notify(c, db, wait) != 0) {
            open = -1;
            code = LR_EXIT_FAIL;
            break;
        }
        open = check_tasks(c, db, ids, done, n, false, &code);
        if (open < 0) {
            code = LR_EXIT_FAIL;
        }
    }
    if (open > 0) {
        (void)cli_fail(c, 0, "timed out after %ld s: %d of %d task(s) not final", timeout_s, open, n);
        code = EXIT_TIMEOUT;
    }
    free(done);
    return open < 0 && code == LR_EXIT_OK ? LR_EXIT_FAIL : code;
}

int cmd_wait(cli_t *c, int argc, char **argv) {
    enum { OPT_TIMEOUT = OPT_FIRST_COMMAND_OPTION };
    static const struct option opts[] = {CLI_COMMON_OPTIONS, {"timeout", required_argument, NULL, OPT_TIMEOUT}, {0}};
    long timeout = 0;
    char **ids = NULL;
    int o, n, rc;
    PGconn *db;
    while ((o = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (o) {
        case 'h': fputs(wait_usage, stdout); return LR_EXIT_OK;
        case OPT_TIMEOUT:
            if (cli_parse_long(c, "--timeout", optarg, 1, 30L * 86400, &timeout) != 0) {
                return LR_EXIT_USAGE;
            }
            break;
        default: fputs(wait_usage, stderr); return LR_EXIT_USAGE;
        }
    }
    if (optind >= argc) {
        return cli_fail(c, LR_EXIT_USAGE, "at least one task ID (or - for stdin) is required");
    }
    n = read_ids(c, argc, argv, optind, &ids);
    if (n <= 0) {
        rc = n == 0 ? cli_fail(c, LR_EXIT_USAGE, "no task ids on stdin") : LR_EXIT_USAGE;
        goto out;
    }
    db = cli_db_connect(c);
    if (db == NULL) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    rc = cli_wait_tasks(c, db, ids, n, timeout);
    PQfinish(db);
out:
    for (int i = 0; ids != NULL && i < MAX_IDS; i++) { /* (a failed strdup may leave a hole) */
        free(ids[i]);
    }
    free(ids);
    return rc;
}

int cmd_result(cli_t *c, int argc, char **argv) {
    int rc = cli_no_options(c, argc, argv, result_usage, CLI_UNKNOWN_USAGE);
    PGconn *db = NULL;
    PGresult *res = NULL;
    const char *id, *status;
    cJSON *result = NULL;
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    if ((rc = cli_task_id_operand(c, argc, argv, &id)) != 0) {
        return rc;
    }
    if ((db = cli_db_connect(c)) == NULL) {
        return LR_EXIT_FAIL;
    }
    res = cli_exec(c, db,
                   "SELECT status, result::text, error, stop_reason, step, tokens_in, tokens_out, tokens_cached,"
                   " cost_usd, tool_calls, active_ms FROM tasks WHERE id = $1",
                   1, &id);
    if (res == NULL) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    if (PQntuples(res) == 0) {
        rc = cli_fail(c, LR_EXIT_USAGE, "no task with id %s", id);
        goto out;
    }
    status = PQgetvalue(res, 0, 0);
    result = PQgetisnull(res, 0, 1) ? NULL : cJSON_Parse(PQgetvalue(res, 0, 1));
    rc = cli_status_final(status) ? status_code(status) : EXIT_TIMEOUT;
    if (c->json) {
        static const char *const usage_cols[] = {"steps",    "tokens_in",  "tokens_out", "tokens_cached",
                                                 "cost_usd", "tool_calls", "active_ms"};
        cJSON *o = cJSON_CreateObject(), *u;
        cJSON_AddStringToObject(o, "id", id);
        cJSON_AddStringToObject(o, "status", status);
        cJSON_AddItemToObject(o, "result", result != NULL ? result : cJSON_CreateNull());
        result = NULL;
        for (int col = 2; col <= 3; col++) {
            cJSON_AddItemToObject(o, PQfname(res, col),
                                  PQgetisnull(res, 0, col) ? cJSON_CreateNull()
                                                           : cJSON_CreateString(PQgetvalue(res, 0, col)));
        }
        u = cJSON_AddObjectToObject(o, "usage");
        for (int col = 4; col <= 10; col++) {
            cJSON_AddNumberToObject(u, usage_cols[col - 4], strtod(PQgetvalue(res, 0, col), NULL));
        }
        cli_print_json(o);
        cJSON_Delete(o);
    } else if (rc == LR_EXIT_OK) {
        const char *answer = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(result, "answer"));
        if (answer != NULL) {
            fputs(answer, stdout);
            if (answer[0] != '\0' && answer[strlen(answer) - 1] != '\n') {
                putchar('\n');
            }
        } else {
            puts(PQgetisnull(res, 0, 1) ? "null" : PQgetvalue(res, 0, 1));
        }
    }
    if (rc == EXIT_TIMEOUT) {
        (void)cli_fail(c, 0, "task %s is %s, not final yet (longrun wait %s)", id, status, id);
    } else if (rc != LR_EXIT_OK) {
        bool stop = !PQgetisnull(res, 0, 3), err = !PQgetisnull(res, 0, 2);
        (void)cli_fail(c, 0, "task %s is %s%s%s%s%s%s", id, status, stop ? " (" : "", stop ? PQgetvalue(res, 0, 3) : "",
                       stop ? ")" : "", err ? ": " : "", err ? PQgetvalue(res, 0, 2) : "");
    }
out:
    cJSON_Delete(result);
    PQclear(res);
    PQfinish(db);
    return rc;
}
