/*
 * watch.c - `longrun watch ID`: follows one task's events live, from the
 * RabbitMQ stream longrun.events (worker/events.h, docs/task-contract.md
 * "Events"), and exits with the task's outcome.
 *
 * Design.  The task's row gives its creation time and tasks.event_seq (the
 * number of events it has been given).  The stream is consumed from a
 * timestamp just before the creation (x-stream-offset), with a prefetch,
 * filtered on the x-longrun-task-id header.  Events are printed strictly in
 * sequence order: an older sequence number than the next one wanted is a
 * duplicate (skipped); a newer one waits in a bounded window for the ones
 * before it.  The stream is the live view, PostgreSQL the truth, so a gap
 * that does not fill within GAP_MS (an event lost between a commit and its
 * publish, or events gone from the stream by retention) is filled from the
 * step log (task_steps), said on stderr.  A poll of the row every POLL_MS
 * ends the watch when the task is final and every event it was given is
 * printed (or, after FINAL_MS, filled from the step log).  A lost
 * connection is opened again at the same offset: the sequence numbers drop
 * what was already printed.  Blocking, like every CLI command.
 *
 * Exit codes: those of `longrun wait` (cli/wait.c): 0 succeeded, 4 dead or
 * failed, 5 cancelled; 2 bad usage, an unknown id or a --from-seq past the
 * end; 1 a server failed.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "amqp.h"
#include "cli.h"
#include "task.h"

#define WINDOW 4096   /* events held while an earlier one is missing */
#define GAP_MS 2000   /* how long a gap may stay open before the step log fills it */
#define POLL_MS 1000  /* how often the task's row is read */
#define FINAL_MS 3000 /* a final task's missing events: waited for that long */
#define PREFETCH 200  /* the consumer's credit */
#define RECONNECTS 10 /* connections opened again in a row before giving up */

static const char watch_usage[] =
    "usage: longrun watch ID [--from-seq N] [--json]\n"
    "\n"
    "Follows one task live from its event stream (RabbitMQ stream longrun.events): prints each\n"
    "step as it finishes, its tool calls, suspensions and the outcome; --json: one event per\n"
    "line, as the stream holds it (docs/task-contract.md, \"Events\").  Events come in sequence\n"
    "order without gaps or duplicates; what the stream lost or no longer holds is filled from\n"
    "the step log in PostgreSQL (said on stderr).\n"
    "\n"
    "  --from-seq N  start at the task's event N (default 1: from the start)\n"
    "\n"
    "Exit codes (as longrun wait): 0 the task succeeded, 4 it ended dead or failed, 5 it was\n"
    "cancelled, 2 bad usage, an unknown id or a --from-seq past the end, 1 a server failed.\n";

typedef struct watch {
    cli_t *c;
    PGconn *db;
    const char *id;
    lr_amqp_sync_t *amqp;
    int64_t start_ts;    /* stream offset: seconds since the epoch */
    int64_t want;        /* next sequence number to print */
    int last_step;       /* the last step printed (finished, or filled from the step log) */
    cJSON *ring[WINDOW]; /* held events, at seq % WINDOW */
    uint64_t gap_since;  /* a newer event waits for a missing one since then (0: none) */
    uint64_t final_since;
    bool from_first; /* consume from "first": the broker refused the timestamp offset */
    bool done;
    int code;
} watch_t;

static const char *str(const cJSON *o, const char *k) {
    const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, k));
    return s != NULL ? s : "";
}

static double num(const cJSON *o, const char *k) {
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(n) ? n->valuedouble : 0;
}

/* Whether an event of this type belongs to a step in flight (its "step" is
 * that step, not the last checkpointed one). */
static bool step_event(const char *type) {
    return strncmp(type, "step_", 5) == 0 || strstr(type, "tool_call_") == type;
}

static void print_step(const watch_t *w, int step, const char *model, double tin, double tout, double cost, double ms,
                       int tools, bool from_log) {
    printf("step %d: %s, %.0f in / %.0f out tokens, $%.6f, %.0f ms, %d tool call%s%s\n", step,
           model[0] != '\0' ? model : "no model", tin, tout, cost, ms, tools, tools == 1 ? "" : "s",
           from_log ? " (from the step log)" : "");
    (void)w;
}

/* Prints one event (JSON: as the stream holds it). */
static void emit(watch_t *w, const cJSON *e) {
    const char *type = str(e, "type");
    int step = (int)num(e, "step");
    if (w->last_step < 0) {
        /* --from-seq: the first event printed */
        w->last_step = step_event(type) ? step - 1 : step;
    }
    if (w->c->json) {
        cli_print_json(e);
    } else if (strcmp(type, "claimed") == 0 || strcmp(type, "resumed") == 0) {
        printf("%s by %s (epoch %.0f)%s\n", type, str(e, "worker"), num(e, "epoch"),
               strcmp(type, "resumed") == 0 ? " after a checkpoint" : "");
    } else if (strcmp(type, "tool_call_finished") == 0) {
        printf("  tool %s: %s (%.0f ms)\n", str(e, "name"), str(e, "status"), num(e, "ms"));
    } else if (strcmp(type, "step_finished") == 0) {
        const cJSON *u = cJSON_GetObjectItemCaseSensitive(e, "usage");
        print_step(w, step, str(e, "model"), num(u, "tokens_in"), num(u, "tokens_out"), num(u, "cost_usd"),
                   num(e, "latency_ms"), (int)num(e, "tool_calls"), false);
    } else if (strcmp(type, "suspended") == 0 || strcmp(type, "released") == 0) {
        printf("%s after step %d: %s\n", type, step, str(e, "reason"));
    } else if (strcmp(type, "outcome") == 0) {
        const cJSON *stop = cJSON_GetObjectItemCaseSensitive(e, "stop_reason");
        printf("%s after %d step%s%s%s%s\n", str(e, "status"), step, step == 1 ? "" : "s",
               cJSON_IsString(stop) ? " (" : "", cJSON_IsString(stop) ? stop->valuestring : "",
               cJSON_IsString(stop) ? ")" : "");
    }
    fflush(stdout);
    if (strcmp(type, "step_finished") == 0 && step > w->last_step) {
        w->last_step = step;
    }
    if (strcmp(type, "outcome") == 0) {
        w->done = true;
        w->code = cli_status_exit(str(e, "status"));
    }
}

/* Prints the steps after w->last_step up to upto from the step log (the
 * stream lost or no longer holds their events).  Returns 0 or -1. */
static int fill_from_log(watch_t *w, int upto) {
    char from[16], to[16];
    const char *p[3] = {w->id, from, to};
    PGresult *res;
    if (w->last_step < 0) {
        w->last_step = upto; /* --from-seq: the steps before it are not wanted */
        return 0;
    }
    if (upto <= w->last_step) {
        return 0;
    }
    snprintf(from, sizeof(from), "%d", w->last_step);
    snprintf(to, sizeof(to), "%d", upto);
    res = cli_exec(w->c, w->db,
                   "SELECT step_no, coalesce(model, ''), tokens_in, tokens_out, tokens_cached, cost_usd, latency_ms,"
                   " CASE WHEN jsonb_typeof(tool_calls) = 'array' THEN jsonb_array_length(tool_calls) ELSE 0 END"
                   " FROM task_steps WHERE task_id = $1 AND step_no > $2::int AND step_no <= $3::int"
                   " ORDER BY step_no",
                   3, p);
    if (res == NULL) {
        return -1;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        int step = atoi(PQgetvalue(res, i, 0));
        if (w->c->json) {
            cJSON *o = cJSON_CreateObject(), *u;
            cJSON_AddNumberToObject(o, "v", 1);
            cJSON_AddStringToObject(o, "task_id", w->id);
            cJSON_AddNullToObject(o, "seq");
            cJSON_AddNumberToObject(o, "step", step);
            cJSON_AddStringToObject(o, "type", "step_finished");
            cJSON_AddBoolToObject(o, "reconciled", true);
            u = cJSON_AddObjectToObject(o, "usage");
            cJSON_AddNumberToObject(u, "tokens_in", atof(PQgetvalue(res, i, 2)));
            cJSON_AddNumberToObject(u, "tokens_out", atof(PQgetvalue(res, i, 3)));
            cJSON_AddNumberToObject(u, "tokens_cached", atof(PQgetvalue(res, i, 4)));
            cJSON_AddNumberToObject(u, "cost_usd", atof(PQgetvalue(res, i, 5)));
            if (PQgetvalue(res, i, 1)[0] != '\0') {
                cJSON_AddStringToObject(o, "model", PQgetvalue(res, i, 1));
            } else {
                cJSON_AddNullToObject(o, "model");
            }
            cJSON_AddNumberToObject(o, "latency_ms", atof(PQgetvalue(res, i, 6)));
            cJSON_AddNumberToObject(o, "tool_calls", atof(PQgetvalue(res, i, 7)));
            cli_print_json(o);
            cJSON_Delete(o);
        } else {
            print_step(w, step, PQgetvalue(res, i, 1), atof(PQgetvalue(res, i, 2)), atof(PQgetvalue(res, i, 3)),
                       atof(PQgetvalue(res, i, 5)), atof(PQgetvalue(res, i, 6)), atoi(PQgetvalue(res, i, 7)), true);
        }
        w->last_step = step;
    }
    fflush(stdout);
    PQclear(res);
    return 0;
}

/* Prints the held events from w->want on, in order. */
static void drain_ring(watch_t *w) {
    cJSON *e;
    while (!w->done && (e = w->ring[w->want % WINDOW]) != NULL && (int64_t)num(e, "seq") == w->want) {
        w->ring[w->want % WINDOW] = NULL;
        emit(w, e);
        cJSON_Delete(e);
        w->want++;
    }
}

/* The earliest held event (the gap ends before it), or NULL. */
static const cJSON *first_held(const watch_t *w) {
    for (int64_t s = w->want + 1; s < w->want + WINDOW; s++) {
        const cJSON *e = w->ring[s % WINDOW];
        if (e != NULL && (int64_t)num(e, "seq") == s) {
            return e;
        }
    }
    return NULL;
}

/* Drops held events older than w->want (left behind by a gap closed past them). */
static void drop_stale(watch_t *w) {
    for (int i = 0; i < WINDOW; i++) {
        if (w->ring[i] != NULL && (int64_t)num(w->ring[i], "seq") < w->want) {
            cJSON_Delete(w->ring[i]);
            w->ring[i] = NULL;
        }
    }
}

/* Closes the gap before event e: its events are not coming. */
static int close_gap(watch_t *w, const cJSON *e) {
    int64_t seq = (int64_t)num(e, "seq");
    const char *type = str(e, "type");
    int step = (int)num(e, "step");
    (void)cli_fail(w->c, 0, "events %lld..%lld of task %s are not in %s (%s); filling in from the step log",
                   (long long)w->want, (long long)seq - 1, w->id, LR_AMQP_EVENTS_STREAM,
                   w->want == 1 ? "the stream's retention dropped them, or they were lost"
                                : "lost between a commit and its publish");
    if (fill_from_log(w, step_event(type) ? step - 1 : step) != 0) {
        return -1;
    }
    w->want = seq;
    w->gap_since = 0;
    drop_stale(w);
    drain_ring(w);
    return 0;
}

/* Takes one message of the stream. */
static int take(watch_t *w, char *body) {
    cJSON *e = cJSON_Parse(body);
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(e, "seq");
    int64_t seq;
    if (e == NULL || !cJSON_IsNumber(s) || strcmp(str(e, "task_id"), w->id) != 0) {
        cJSON_Delete(e);
        return 0; /* not one of ours, or not an event */
    }
    seq = (int64_t)s->valuedouble;
    if (seq < w->want) {
        cJSON_Delete(e); /* printed already */
        return 0;
    }
    if (seq >= w->want + WINDOW) {
        /* too far ahead to hold: the events before it are not coming */
        int rc = close_gap(w, e);
        if (rc != 0) {
            cJSON_Delete(e);
            return rc;
        }
    }
    cJSON_Delete(w->ring[seq % WINDOW]);
    w->ring[seq % WINDOW] = e;
    drain_ring(w);
    if (!w->done && w->ring[w->want % WINDOW] == NULL && first_held(w) != NULL && w->gap_since == 0) {
        w->gap_since = cli_mono_ms();
    }
    return 0;
}

/* The outcome as the task's row has it (no outcome event came): status,
 * stop_reason and step in res columns 0, 3 and 2. */
static void print_db_outcome(const watch_t *w, const PGresult *res) {
    const char *status = PQgetvalue(res, 0, 0);
    bool stop = !PQgetisnull(res, 0, 3);
    if (w->c->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "v", 1);
        cJSON_AddStringToObject(o, "task_id", w->id);
        cJSON_AddNullToObject(o, "seq");
        cJSON_AddNumberToObject(o, "step", atoi(PQgetvalue(res, 0, 2)));
        cJSON_AddStringToObject(o, "type", "outcome");
        cJSON_AddBoolToObject(o, "reconciled", true);
        cJSON_AddStringToObject(o, "status", status);
        if (stop) {
            cJSON_AddStringToObject(o, "stop_reason", PQgetvalue(res, 0, 3));
        } else {
            cJSON_AddNullToObject(o, "stop_reason");
        }
        cli_print_json(o);
        cJSON_Delete(o);
    } else {
        printf("%s%s%s%s (from the database)\n", status, stop ? " (" : "", stop ? PQgetvalue(res, 0, 3) : "",
               stop ? ")" : "");
    }
    fflush(stdout);
}

/* Reads the task's row: done when it is final and nothing more is coming.
 * Returns 0 or -1. */
static int poll_row(watch_t *w) {
    PGresult *res =
        cli_exec(w->c, w->db, "SELECT status, event_seq, step, stop_reason FROM tasks WHERE id = $1", 1, &w->id);
    const char *status;
    int64_t last;
    if (res == NULL) {
        return -1;
    }
    if (PQntuples(res) == 0) {
        PQclear(res);
        return cli_fail(w->c, -1, "task %s is gone (deleted?)", w->id);
    }
    status = PQgetvalue(res, 0, 0);
    last = atoll(PQgetvalue(res, 0, 1));
    if (cli_status_final(status)) {
        uint64_t now = cli_mono_ms();
        if (w->final_since == 0) {
            w->final_since = now;
        }
        if (last < w->want || now - w->final_since >= FINAL_MS) {
            if (last >= w->want) {
                (void)cli_fail(w->c, 0, "events %lld..%lld of task %s are not in %s (%s); filling in from the step log",
                               (long long)w->want, (long long)last, w->id, LR_AMQP_EVENTS_STREAM,
                               w->want == 1 ? "the stream's retention dropped them, or they were never published"
                                            : "lost between a commit and its publish, or never published");
            }
            if (fill_from_log(w, atoi(PQgetvalue(res, 0, 2))) != 0) {
                PQclear(res);
                return -1;
            }
            print_db_outcome(w, res);
            w->done = true;
            w->code = cli_status_exit(status);
        }
    }
    PQclear(res);
    return 0;
}

static int connect_stream(watch_t *w) {
    char err[512];
    bool refused = false; /* connected, and the consume failed */
    int rc;
    lr_amqp_sync_close(w->amqp);
    w->amqp = NULL;
    rc = lr_amqp_sync_connect(&w->amqp, w->c->cfg.amqp_url, 10000, err, sizeof(err));
    if (rc == 0) {
        rc = lr_amqp_sync_stream_consume(w->amqp, LR_AMQP_EVENTS_STREAM, w->from_first ? "first" : NULL, w->start_ts,
                                         PREFETCH, err, sizeof(err));
        refused = rc != 0 && rc != LR_ENOTFOUND;
    }
    if (refused && !w->from_first) {
        /* RabbitMQ 3.10 can refuse a timestamp offset (INTERNAL_ERROR, which closes the
         * connection) once retention removed the segments around it: read from the first
         * event the stream still holds. */
        (void)cli_fail(w->c, 0,
                       "the broker refused the stream offset of the task's creation (%s); reading from the "
                       "stream's first event",
                       err);
        w->from_first = true;
        return connect_stream(w);
    }
    if (rc != 0) {
        (void)cli_fail(w->c, 0, "cannot consume %s at %s: %s", LR_AMQP_EVENTS_STREAM, w->c->cfg.amqp_url, err);
    }
    return rc;
}

static int follow(watch_t *w) {
    uint64_t polled = 0;
    int lost = 0;
    if (connect_stream(w) != 0) {
        return LR_EXIT_FAIL;
    }
    while (!w->done) {
        char *body = NULL, *tid = NULL, err[512];
        int rc = lr_amqp_sync_next(w->amqp, 250, LR_AMQP_EVENTS_TASK_HEADER, &body, &tid, err, sizeof(err));
        uint64_t now;
        if (rc == 0) {
            lost = 0;
            if (tid != NULL && strcmp(tid, w->id) == 0 && take(w, body) != 0) {
                free(body);
                free(tid);
                return LR_EXIT_FAIL;
            }
        } else if (rc == LR_ECONN || rc == LR_EAMQP) {
            if (++lost > RECONNECTS) {
                return cli_fail(w->c, LR_EXIT_FAIL, "lost the stream %d times in a row: %s", lost, err);
            }
            (void)cli_fail(w->c, 0, "lost the stream (%s); consuming again", err);
            struct timespec ts = {.tv_sec = 0, .tv_nsec = 500000000L};
            nanosleep(&ts, NULL);
            (void)connect_stream(w); /* a failure shows at the next read */
        }
        free(body);
        free(tid);
        now = cli_mono_ms();
        if (!w->done && w->gap_since != 0 && now - w->gap_since >= GAP_MS) {
            const cJSON *e = first_held(w);
            if (e != NULL && close_gap(w, e) != 0) {
                return LR_EXIT_FAIL;
            }
            w->gap_since = 0;
        }
        if (!w->done && now - polled >= POLL_MS) {
            polled = now;
            if (poll_row(w) != 0) {
                return LR_EXIT_FAIL;
            }
        }
    }
    return w->code;
}

int cmd_watch(cli_t *c, int argc, char **argv) {
    enum { OPT_FROM_SEQ = OPT_FIRST_COMMAND_OPTION };
    static const struct option opts[] = {CLI_COMMON_OPTIONS, {"from-seq", required_argument, NULL, OPT_FROM_SEQ}, {0}};
    watch_t *w = NULL;
    PGresult *res = NULL;
    long from = 1;
    const char *id;
    int o, rc;
    while ((o = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (o) {
        case 'h': fputs(watch_usage, stdout); return LR_EXIT_OK;
        case OPT_FROM_SEQ:
            if (cli_parse_long(c, "--from-seq", optarg, 1, 1L << 40, &from) != 0) {
                return LR_EXIT_USAGE;
            }
            break;
        default: fputs(watch_usage, stderr); return LR_EXIT_USAGE;
        }
    }
    if ((rc = cli_task_id_operand(c, argc, argv, &id)) != 0) {
        return rc;
    }
    if ((w = calloc(1, sizeof(*w))) == NULL) {
        return cli_fail(c, LR_EXIT_FAIL, "out of memory");
    }
    w->c = c;
    w->id = id;
    w->want = from;
    if ((w->db = cli_db_connect(c)) == NULL) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    res = cli_exec(c, w->db,
                   "SELECT status, event_seq, extract(epoch FROM created_at)::bigint, step FROM tasks WHERE id = $1", 1,
                   &w->id);
    if (res == NULL) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    if (PQntuples(res) == 0) {
        rc = cli_fail(c, LR_EXIT_USAGE, "no task with id %s", w->id);
        goto out;
    }
    {
        int64_t last = atoll(PQgetvalue(res, 0, 1));
        bool final = cli_status_final(PQgetvalue(res, 0, 0));
        if (from > last + (final ? 0 : 1)) {
            rc = cli_fail(c, LR_EXIT_USAGE, "--from-seq %ld is past the end: task %s (%s) has %lld event%s so far",
                          from, w->id, PQgetvalue(res, 0, 0), (long long)last, last == 1 ? "" : "s");
            goto out;
        }
        /* a little before the creation: the broker's and the database's clocks may differ */
        w->start_ts = atoll(PQgetvalue(res, 0, 2)) - 5;
    }
    if (from > 1) {
        /* the steps before the first event wanted are not printed */
        w->last_step = -1;
    }
    rc = follow(w);
out:
    PQclear(res);
    if (w != NULL) {
        for (int i = 0; i < WINDOW; i++) {
            cJSON_Delete(w->ring[i]);
        }
        lr_amqp_sync_close(w->amqp);
        PQfinish(w->db);
        free(w);
    }
    return rc;
}
