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

static int exec_simple(cli_t *c, PGconn *db, const char *sql) {
    PGresult *res = cli_exec(c, db, sql, 0, NULL);
    if (res == NULL) {
        return -1;
    }
    PQclear(res);
    return 0;
}

int cli_migrate_run(cli_t *c, PGconn *db, bool dry_run, bool status_only) {
    PGresult *res = NULL;
    int rc = LR_EXIT_FAIL;
    int applied_max = 0;
    int napplied = 0;
    cJSON *out = c->json ? cJSON_CreateArray() : NULL;
    bool locked = false;

    if (exec_simple(c, db, "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")") != 0) {
        goto out;
    }
    locked = true;
    if (exec_simple(c, db,
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())") != 0) {
        goto out;
    }
    res = cli_exec(c, db, "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version",
                   0, NULL);
    if (res == NULL) {
        goto out;
    }
    for (int r = 0; r < PQntuples(res); r++) {
        int v = atoi(PQgetvalue(res, r, 0));
        bool known = false;
        if (v > applied_max) {
            applied_max = v;
        }
        for (int i = 0; i < lr_migrations_count; i++) {
            if (lr_migrations[i].version != v) {
                continue;
            }
            known = true;
            if (strcmp(lr_migrations[i].sha256, PQgetvalue(res, r, 2)) != 0) {
                rc = cli_fail(c, LR_EXIT_FAIL,
                              "migration %s was changed after it was applied (checksum %.12s... in "
                              "the database, %.12s... in this binary); applied migrations must "
                              "never be edited: add a new migration instead",
                              lr_migrations[i].name, PQgetvalue(res, r, 2), lr_migrations[i].sha256);
                goto out;
            }
        }
        if (!known && v > lr_schema_version_known()) {
            rc = cli_fail(c, LR_EXIT_FAIL,
                          "the database schema is at version %d, newer than this binary knows "
                          "(%d): upgrade longrun before migrating",
                          v, lr_schema_version_known());
            goto out;
        }
    }
    for (int i = 0; i < lr_migrations_count; i++) {
        const lr_migration_t *m = &lr_migrations[i];
        bool done = false;
        const char *when = NULL;
        for (int r = 0; r < PQntuples(res); r++) {
            if (atoi(PQgetvalue(res, r, 0)) == m->version) {
                done = true;
                when = PQgetvalue(res, r, 3);
            }
        }
        if (status_only || (dry_run && !done) || done) {
            if (out != NULL) {
                cJSON *o = cJSON_CreateObject();
                cJSON_AddNumberToObject(o, "version", m->version);
                cJSON_AddStringToObject(o, "name", m->name);
                cJSON_AddStringToObject(o, "state", done ? "applied" : (dry_run ? "would apply" : "pending"));
                if (when != NULL) {
                    cJSON_AddStringToObject(o, "applied_at", when);
                }
                cJSON_AddItemToArray(out, o);
            } else if (status_only || !done) {
                printf("%-28s %s%s\n", m->name, done ? "applied " : (dry_run ? "would apply" : "pending"),
                       when != NULL ? when : "");
            }
            if (done || status_only) {
                continue;
            }
        }
        if (dry_run) {
            continue;
        }
        {
            const char *params[3];
            char ver[16];
            PGresult *r2;
            snprintf(ver, sizeof(ver), "%d", m->version);
            params[0] = ver;
            params[1] = m->name;
            params[2] = m->sha256;
            if (exec_simple(c, db, "BEGIN") != 0) {
                goto out;
            }
            r2 = PQexec(db, m->sql);
            if (PQresultStatus(r2) != PGRES_COMMAND_OK && PQresultStatus(r2) != PGRES_TUPLES_OK) {
                char msg[1024];
                snprintf(msg, sizeof(msg), "%s", PQresultErrorMessage(r2));
                msg[strcspn(msg, "\n")] = '\0';
                PQclear(r2);
                (void)exec_simple(c, db, "ROLLBACK");
                rc = cli_fail(c, LR_EXIT_FAIL, "migration %s failed and was rolled back: %s", m->name, msg);
                goto out;
            }
            PQclear(r2);
            r2 = cli_exec(c, db,
                          "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                          3, params);
            if (r2 == NULL) {
                (void)exec_simple(c, db, "ROLLBACK");
                goto out;
            }
            PQclear(r2);
            if (exec_simple(c, db, "COMMIT") != 0) {
                goto out;
            }
            napplied++;
            if (out != NULL) {
                cJSON *o = cJSON_CreateObject();
                cJSON_AddNumberToObject(o, "version", m->version);
                cJSON_AddStringToObject(o, "name", m->name);
                cJSON_AddStringToObject(o, "state", "applied now");
                cJSON_AddItemToArray(out, o);
            } else {
                printf("applied %s\n", m->name);
            }
        }
    }
    if (out == NULL && !status_only) {
        if (dry_run) {
            printf("dry run: nothing was changed\n");
        } else if (napplied == 0) {
            printf("schema is up to date (version %d)\n",
                   applied_max > lr_schema_version_known() ? applied_max : lr_schema_version_known());
        } else {
            printf("applied %d migration(s); schema is at version %d\n", napplied,
                   lr_schema_version_known());
        }
    }
    rc = LR_EXIT_OK;
out:
    PQclear(res);
    if (locked) {
        PGresult *u = PQexec(db, "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")");
        PQclear(u);
    }
    if (out != NULL) {
        if (rc == LR_EXIT_OK) {
            char *s = cJSON_PrintUnformatted(out);
            printf("%s\n", s);
            free(s);
        }
        cJSON_Delete(out);
    }
    return rc;
}

static void migrate_usage(FILE *f) {
    fprintf(f,
            "usage: longrun migrate [--status] [--dry-run] [--json] [--database-url URL]\n"
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
