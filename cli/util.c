/* util.c - helpers shared by the CLI commands; see cli.h. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

int cli_fail(cli_t *c, int code, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "%s: ", c->prog != NULL ? c->prog : "longrun");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return code;
}

int cli_common_option(cli_t *c, int opt, const char *arg) {
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
    case OPT_JSON:
        c->json = true;
        return 1;
    default:
        return 0;
    }
}

PGconn *cli_db_connect(cli_t *c) {
    const char *keys[] = {"dbname", "connect_timeout", "application_name", NULL};
    const char *vals[] = {c->cfg.database_url, "10", "longrun-cli", NULL};
    PGconn *db = PQconnectdbParams(keys, vals, 1);
    if (db == NULL || PQstatus(db) != CONNECTION_OK) {
        char masked[1100];
        char msg[512];
        lr_config_mask_url(c->cfg.database_url[0] ? c->cfg.database_url : "(PG* defaults)", masked,
                           sizeof(masked));
        snprintf(msg, sizeof(msg), "%s", db != NULL ? PQerrorMessage(db) : "out of memory");
        msg[strcspn(msg, "\n")] = '\0';
        cli_fail(c, LR_EXIT_FAIL, "cannot connect to PostgreSQL at %s: %s (is it running? try 'scripts/dev up')",
                 masked, msg);
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
