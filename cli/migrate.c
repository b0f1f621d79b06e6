/*
 * migrate.c - `longrun migrate [--status] [--dry-run]`.
 *
 * Applies the migrations compiled into the binary (common/migrations.h), in
 * order, each in its own transaction, under a session advisory lock so that
 * concurrent migrators serialize: the second waits, then finds nothing to do.
 * Each applied migration is recorded in schema_migrations with its checksum;
 * a changed checksum or a database newer than the binary is refused.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cli.h"
#include "migrations.h"

/* Arbitrary but fixed: the advisory lock key of all migrators. */
#define MIGRATE_LOCK_KEY "7283947201"

/* One run of the migrator. */
typedef struct migrate_run {
    cli_t *c;
    PGconn *db;
    bool dry_run, status_only;
    cJSON *out; /* --json: the migrations reported so far (printed at the end), else NULL */
} migrate_run_t;

/* Checks the applied migrations (rows of schema_migrations: version, name,
 * checksum, applied_at) against this binary: none changed, none newer than
 * it knows.  Returns 0 with *applied_max set, or -1 after printing why. */
static int check_applied(const migrate_run_t *mr, PGresult *res, int *applied_max) {
    *applied_max = 0;
    for (int r = 0; r < PQntuples(res); r++) {
        int v = atoi(PQgetvalue(res, r, 0));
        bool known = false;
        if (v > *applied_max) {
            *applied_max = v;
        }
        for (int i = 0; i < lr_migrations_count; i++) {
            if (lr_migrations[i].version != v) {
                continue;
            }
            known = true;
            if (strcmp(lr_migrations[i].sha256, PQgetvalue(res, r, 2)) != 0) {
                return cli_fail(mr->c, -1,
                                "migration %s was changed after it was applied (checksum %.12s... in "
                                "the database, %.12s... in this binary); applied migrations must "
                                "never be edited: add a new migration instead",
                                lr_migrations[i].name, PQgetvalue(res, r, 2), lr_migrations[i].sha256);
            }
        }
        if (!known && v > lr_schema_version_known()) {
            return cli_fail(mr->c, -1,
                            "the database schema is at version %d, newer than this binary knows "
                            "(%d): upgrade longrun before migrating",
                            v, lr_schema_version_known());
        }
    }
    return 0;
}

/* When migration version was applied (a row of res), or NULL when it was not. */
static const char *applied_at(PGresult *res, int version) {
    const char *when = NULL;
    for (int r = 0; r < PQntuples(res); r++) {
        if (atoi(PQgetvalue(res, r, 0)) == version) {
            when = PQgetvalue(res, r, 3);
        }
    }
    return when;
}

/* Reports migration m as it stands: applied (when), pending, or would apply
 * (--dry-run).  The text lists applied ones only with --status. */
static void report_state(const migrate_run_t *mr, const lr_migration_t *m, const char *when) {
    bool done = when != NULL;
    if (mr->out != NULL) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "version", m->version);
        cJSON_AddStringToObject(o, "name", m->name);
        cJSON_AddStringToObject(o, "state", done ? "applied" : (mr->dry_run ? "would apply" : "pending"));
        if (when != NULL) {
            cJSON_AddStringToObject(o, "applied_at", when);
        }
        cJSON_AddItemToArray(mr->out, o);
    } else if (mr->status_only || !done) {
        printf("%-28s %s%s\n", m->name, done ? "applied " : (mr->dry_run ? "would apply" : "pending"),
               when != NULL ? when : "");
    }
}

/* Applies migration m in its own transaction and records it.  Returns 0, or
 * -1 after printing why (the transaction rolled back). */
static int apply_migration(const migrate_run_t *mr, const lr_migration_t *m) {
    char ver[16];
    const char *params[3] = {ver, m->name, m->sha256};
    PGresult *r;
    snprintf(ver, sizeof(ver), "%d", m->version);
    if (cli_exec_simple(mr->c, mr->db, "BEGIN") != 0) {
        return -1;
    }
    r = PQexec(mr->db, m->sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
        char msg[1024];
        snprintf(msg, sizeof(msg), "%s", PQresultErrorMessage(r));
        msg[strcspn(msg, "\n")] = '\0';
        PQclear(r);
        (void)cli_exec_simple(mr->c, mr->db, "ROLLBACK");
        return cli_fail(mr->c, -1, "migration %s failed and was rolled back: %s", m->name, msg);
    }
    PQclear(r);
    r = cli_exec(mr->c, mr->db, "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)", 3,
                 params);
    if (r == NULL) {
        (void)cli_exec_simple(mr->c, mr->db, "ROLLBACK");
        return -1;
    }
    PQclear(r);
    return cli_exec_simple(mr->c, mr->db, "COMMIT");
}

/* Reports migration m as applied by this run. */
static void report_applied(const migrate_run_t *mr, const lr_migration_t *m) {
    if (mr->out != NULL) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "version", m->version);
        cJSON_AddStringToObject(o, "name", m->name);
        cJSON_AddStringToObject(o, "state", "applied now");
        cJSON_AddItemToArray(mr->out, o);
    } else {
        printf("applied %s\n", m->name);
    }
}

/* The last line of the text output (none with --status or --json). */
static void print_summary(const migrate_run_t *mr, int applied_max, int napplied) {
    if (mr->out != NULL || mr->status_only) {
        return;
    }
    if (mr->dry_run) {
        printf("dry run: nothing was changed\n");
    } else if (napplied == 0) {
        printf("schema is up to date (version %d)\n",
               applied_max > lr_schema_version_known() ? applied_max : lr_schema_version_known());
    } else {
        printf("applied %d migration(s); schema is at version %d\n", napplied, lr_schema_version_known());
    }
}

int cli_migrate_run(cli_t *c, PGconn *db, bool dry_run, bool status_only) {
    const migrate_run_t mr = {c, db, dry_run, status_only, c->json ? cJSON_CreateArray() : NULL};
    PGresult *res = NULL;
    int rc = LR_EXIT_FAIL;
    int applied_max = 0;
    int napplied = 0;
    bool locked = false;

    if (cli_exec_simple(c, db, "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")") != 0) {
        goto out;
    }
    locked = true;
    if (cli_exec_simple(c, db,
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        " version integer PRIMARY KEY, name text NOT NULL,"
                        " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())") != 0) {
        goto out;
    }
    res =
        cli_exec(c, db, "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version", 0, NULL);
    if (res == NULL || check_applied(&mr, res, &applied_max) != 0) {
        goto out;
    }
    for (int i = 0; i < lr_migrations_count; i++) {
        const lr_migration_t *m = &lr_migrations[i];
        const char *when = applied_at(res, m->version);
        if (status_only || dry_run || when != NULL) {
            report_state(&mr, m, when);
            continue;
        }
        if (apply_migration(&mr, m) != 0) {
            goto out;
        }
        napplied++;
        report_applied(&mr, m);
    }
    print_summary(&mr, applied_max, napplied);
    rc = LR_EXIT_OK;
out:
    PQclear(res);
    if (locked) {
        PGresult *u = PQexec(db, "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")");
        PQclear(u);
    }
    if (mr.out != NULL) {
        if (rc == LR_EXIT_OK) {
            cli_print_json(mr.out);
        }
        cJSON_Delete(mr.out);
    }
    return rc;
}

static void migrate_usage(FILE *f) {
    fprintf(f, "usage: longrun migrate [--status] [--dry-run] [--json] [--database-url URL]\n"
               "\n"
               "Applies pending schema migrations in order, each in its own transaction, under\n"
               "an advisory lock (concurrent runs wait for each other; running twice is a no-op).\n"
               "\n"
               "  --status    list every migration and whether it is applied; change nothing\n"
               "  --dry-run   list what would be applied; change nothing\n");
}

int cmd_migrate(cli_t *c, int argc, char **argv) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"status", no_argument, NULL, 's'},
                                         {"dry-run", no_argument, NULL, 'n'},
                                         {NULL, 0, NULL, 0}};
    bool status = false, dry = false;
    int opt;
    PGconn *db;
    int rc;

    while ((opt = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (opt) {
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        case 's': status = true; break;
        case 'n': dry = true; break;
        case 'h': migrate_usage(stdout); return LR_EXIT_OK;
        default: migrate_usage(stderr); return LR_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        return cli_fail(c, LR_EXIT_USAGE, "unexpected argument '%s'", argv[optind]);
    }
    if (status && dry) {
        return cli_fail(c, LR_EXIT_USAGE, "--status and --dry-run cannot be combined");
    }
    db = cli_db_connect(c);
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    rc = cli_migrate_run(c, db, dry, status);
    PQfinish(db);
    return rc;
}
