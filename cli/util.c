/* util.c - helpers shared by the CLI commands; see cli.h. */
#include <errno.h>

#include <cjson/cJSON.h>
#include <pwd.h>
#include <time.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp.h"
#include "cli.h"
#include "task.h"

int cli_fail(cli_t *c, int code, const char *fmt, ...) {
    va_list ap;
    char *raw = NULL, *masked = NULL;
    int n;
    va_start(ap, fmt);
    n = vasprintf(&raw, fmt, ap);
    va_end(ap);
    /* Messages name DSNs and URLs and quote library errors: masked, like
     * every log line (room for each secret to become "***"). */
    if (n >= 0) {
        size_t cap = (size_t)n * 2 + 64;
        masked = malloc(cap);
        if (masked != NULL) {
            (void)lr_config_mask_secrets(raw, masked, cap);
        }
    }
    fprintf(stderr, "%s: %s\n", c->prog != NULL ? c->prog : "longrun",
            masked != NULL ? masked : "(out of memory formatting the message)");
    free(masked);
    free(raw);
    return code;
}

/* Handles a common option (or --actor): 1 if handled, 0 if not one of them,
 * -1 when its value is invalid (message printed). */
static int common_option(cli_t *c, int opt, const char *arg) {
    char err[512];
    switch (opt) {
    case OPT_DATABASE_URL:
        if (lr_config_set(&c->cfg, "LONGRUN_DATABASE_URL", arg, err, sizeof(err)) != 0) {
            cli_fail(c, LR_EXIT_USAGE, "--database-url: %s", err);
            return -1;
        }
        return 1;
    case OPT_AMQP_URL:
        if (lr_config_set(&c->cfg, "LONGRUN_AMQP_URL", arg, err, sizeof(err)) != 0) {
            cli_fail(c, LR_EXIT_USAGE, "--amqp-url: %s", err);
            return -1;
        }
        return 1;
    case OPT_JSON: c->json = true; return 1;
    case OPT_ACTOR: c->actor = arg; return 1;
    default: return 0;
    }
}

int cli_next_option(cli_t *c, int argc, char **argv, const char *shortopts, const struct option *opts) {
    int opt, h;
    if (c->opt_argv != argv) {
        c->opt_argv = argv;
        optind = 1;
    }
    do {
        opt = getopt_long(argc, argv, shortopts, opts, NULL);
        if (opt == -1) {
            return -1;
        }
        h = common_option(c, opt, optarg);
    } while (h > 0);
    return h < 0 ? CLI_OPT_INVALID : opt;
}

int cli_no_options(cli_t *c, int argc, char **argv, const char *usage, cli_on_unknown_t on_unknown) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS, {NULL, 0, NULL, 0}};
    int opt = cli_next_option(c, argc, argv, "h", opts);
    if (opt == -1) {
        return 0;
    }
    if (opt == CLI_OPT_INVALID) {
        return LR_EXIT_USAGE;
    }
    if (opt == 'h') {
        fputs(usage, stdout);
        return -1;
    }
    if (on_unknown == CLI_UNKNOWN_USAGE) {
        fputs(usage, stderr);
        return LR_EXIT_USAGE;
    }
    return cli_fail(c, LR_EXIT_USAGE, "unknown option (see --help)");
}

/* clang-format off */
static const cli_budget_flag_t budget_flags[] = {
    {OPT_MAX_STEPS, "--max-steps", "max_steps"},
    {OPT_MAX_TOOL_CALLS, "--max-tool-calls", "max_tool_calls"},
    {OPT_MAX_TOKENS, "--max-tokens", "max_tokens"},
    {OPT_MAX_COST, "--max-cost", "max_cost_usd"},
    {OPT_MAX_SECONDS, "--max-seconds", "max_seconds"},
};
/* clang-format on */

const cli_budget_flag_t *cli_budget_option(cli_t *c, int opt, const char *arg, double *value) {
    for (size_t i = 0; i < sizeof(budget_flags) / sizeof(budget_flags[0]); i++) {
        char *end = NULL;
        if (budget_flags[i].opt != opt) {
            continue;
        }
        *value = strtod(arg, &end);
        if (end == arg || *end != '\0') {
            cli_fail(c, LR_EXIT_USAGE, "%s: '%s' is not a number", budget_flags[i].flag, arg);
            return NULL;
        }
        return &budget_flags[i];
    }
    cli_fail(c, LR_EXIT_USAGE, "option %d is not a budget flag", opt);
    return NULL;
}

PGconn *cli_db_connect(cli_t *c) {
    const char *keys[] = {"dbname", "connect_timeout", "application_name", NULL};
    const char *vals[] = {c->cfg.database_url, "10", "longrun-cli", NULL};
    PGconn *db = PQconnectdbParams(keys, vals, 1);
    if (db == NULL || PQstatus(db) != CONNECTION_OK) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", db != NULL ? PQerrorMessage(db) : "out of memory");
        msg[strcspn(msg, "\n")] = '\0';
        /* cli_fail masks the password in the URL */
        cli_fail(c, LR_EXIT_FAIL, "cannot connect to PostgreSQL at %s: %s (is it running? try 'scripts/dev up')",
                 c->cfg.database_url[0] ? c->cfg.database_url : "(PG* defaults)", msg);
        PQfinish(db);
        return NULL;
    }
    PQsetNoticeProcessor(db, NULL, NULL);
    return db;
}

static void quiet_notice(void *arg, const char *msg) {
    (void)arg;
    (void)msg;
}

PGresult *cli_exec(cli_t *c, PGconn *db, const char *sql, int n, const char *const *params) {
    PGresult *res;
    ExecStatusType st;
    PQsetNoticeProcessor(db, quiet_notice, NULL);
    res = PQexecParams(db, sql, n, NULL, params, NULL, NULL, 0);
    st = PQresultStatus(res);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        char msg[1024];
        snprintf(msg, sizeof(msg), "%s", PQresultErrorMessage(res));
        msg[strcspn(msg, "\n")] = '\0';
        cli_fail(c, LR_EXIT_FAIL, "database error: %s", msg);
        PQclear(res);
        return NULL;
    }
    return res;
}

int cli_exec_simple(cli_t *c, PGconn *db, const char *sql) {
    PGresult *res = cli_exec(c, db, sql, 0, NULL);
    if (res == NULL) {
        return -1;
    }
    PQclear(res);
    return 0;
}

bool cli_status_final(const char *status) {
    return strcmp(status, "succeeded") == 0 || strcmp(status, "failed") == 0 || strcmp(status, "dead") == 0 ||
           strcmp(status, "cancelled") == 0;
}

uint64_t cli_mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int cli_task_id_operand(cli_t *c, int argc, char **argv, const char **id) {
    if (optind + 1 != argc) {
        return cli_fail(c, LR_EXIT_USAGE, optind >= argc ? "a task ID is required" : "exactly one task ID is expected");
    }
    if (!lr_uuid_valid(argv[optind])) {
        return cli_fail(c, LR_EXIT_USAGE, "'%s' is not a task id (a UUID)", argv[optind]);
    }
    *id = argv[optind];
    return 0;
}

int cli_parse_long(cli_t *c, const char *name, const char *s, long min, long max, long *out) {
    char *end = NULL;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0') {
        cli_fail(c, LR_EXIT_USAGE, "%s: '%s' is not an integer", name, s);
        return -1;
    }
    if (v < min || v > max) {
        cli_fail(c, LR_EXIT_USAGE, "%s: %ld is out of range [%ld, %ld]", name, v, min, max);
        return -1;
    }
    *out = v;
    return 0;
}

char *cli_read_arg_or_file(cli_t *c, const char *name, const char *arg, size_t max) {
    FILE *f = NULL;
    char *buf = NULL;
    size_t len = 0;
    if (arg[0] != '@' && strcmp(arg, "-") != 0) {
        if (strlen(arg) > max) {
            cli_fail(c, LR_EXIT_USAGE, "%s: %zu bytes, over the limit of %zu", name, strlen(arg), max);
            return NULL;
        }
        return strdup(arg);
    }
    f = strcmp(arg, "-") == 0 ? stdin : fopen(arg + 1, "rb");
    if (f == NULL) {
        cli_fail(c, LR_EXIT_USAGE, "%s: cannot open %s: %s", name, arg + 1, strerror(errno));
        return NULL;
    }
    buf = malloc(max + 2);
    if (buf != NULL) {
        len = fread(buf, 1, max + 1, f);
        buf[len] = '\0';
    }
    if (f != stdin) {
        fclose(f);
    }
    if (buf == NULL) {
        cli_fail(c, LR_EXIT_FAIL, "out of memory");
        return NULL;
    }
    if (len > max) {
        cli_fail(c, LR_EXIT_USAGE, "%s: file is over the limit of %zu bytes", name, max);
        free(buf);
        return NULL;
    }
    return buf;
}

int cli_publish_continuations(cli_t *c, PGconn *db, PGresult *ids, int col_id, int col_queue, int *published) {
    lr_amqp_sync_t *a = NULL;
    char err[512];
    *published = 0;
    if (PQntuples(ids) == 0) {
        return 0;
    }
    if (lr_amqp_sync_connect(&a, c->cfg.amqp_url, 10000, err, sizeof(err)) != 0) {
        (void)cli_fail(c, 0,
                       "RabbitMQ unreachable (%s): the scheduler's outbox sweep will dispatch the "
                       "requeued tasks once it is back",
                       err);
        return -1;
    }
    for (int i = 0; i < PQntuples(ids); i++) {
        const char *id = PQgetvalue(ids, i, col_id);
        const char *queue = PQgetvalue(ids, i, col_queue);
        const char *queues[] = {queue, NULL};
        char body[64];
        lr_amqp_msg_t m;
        snprintf(body, sizeof(body), "{\"id\":\"%s\"}", id);
        memset(&m, 0, sizeof(m));
        m.body = body;
        m.body_len = strlen(body);
        m.message_id = id;
        m.content_type = "application/json";
        m.persistent = true;
        m.mandatory = true;
        if (i == 0 || strcmp(queue, PQgetvalue(ids, i - 1, col_queue)) != 0) {
            if (lr_amqp_sync_declare(a, queues, c->cfg.delivery_limit, c->cfg.queue_max_length, err, sizeof(err)) !=
                0) {
                (void)cli_fail(c, 0, "%s", err);
            }
        }
        if (lr_amqp_sync_publish(a, LR_AMQP_EXCHANGE, queue, &m, 10000, err, sizeof(err)) == 0) {
            PGresult *r = PQexecParams(db, "UPDATE tasks SET published_at = now() WHERE id = $1 AND status = 'queued'",
                                       1, NULL, &id, NULL, NULL, 0);
            PQclear(r);
            (*published)++;
        }
    }
    lr_amqp_sync_close(a);
    return 0;
}

static char actor_buf[160];

const char *cli_actor(const cli_t *c) {
    const char *u = getenv("LONGRUN_ACTOR");
    struct passwd *pw;
    if (c->actor != NULL) {
        return c->actor;
    }
    if (u != NULL && u[0] != '\0') {
        return u;
    }
    u = getlogin();
    if (u == NULL) {
        pw = getpwuid(getuid());
        u = pw != NULL ? pw->pw_name : "unknown";
    }
    snprintf(actor_buf, sizeof(actor_buf), "%s", u);
    return actor_buf;
}

void cli_print_json(const cJSON *j) {
    /* Values are task data, printed as they are; a DSN or URL must be
     * masked (lr_config_mask_secrets) before it goes into j. */
    char *s = cJSON_PrintUnformatted(j);
    printf("%s\n", s != NULL ? s : "null");
    free(s);
}

int cli_duration(const char *s, char *out, size_t outlen) {
    char *end = NULL;
    long v = strtol(s, &end, 10);
    const char *unit;
    if (end == s || v <= 0 || end[0] == '\0' || end[1] != '\0') {
        return -1;
    }
    switch (end[0]) {
    case 's': unit = "seconds"; break;
    case 'm': unit = "minutes"; break;
    case 'h': unit = "hours"; break;
    case 'd': unit = "days"; break;
    default: return -1;
    }
    snprintf(out, outlen, "%ld %s", v, unit);
    return 0;
}
