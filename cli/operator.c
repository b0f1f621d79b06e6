/*
 * operator.c - the operator commands of `longrun`: log, approve, deny,
 * signal, cancel, replay, dlq (list, show, requeue, purge), stats, workers,
 * tools/models (kill switches).
 *
 * Every action that changes a task is one transaction that also appends a
 * task_events row with the actor (--actor, default the login name) and the
 * reason, then NOTIFYs longrun_wakeup so the scheduler reacts at once.  An
 * immediate cancel of a running task also NOTIFYs longrun_cancel inside its
 * transaction, for the worker that runs it (worker/cancel.c).
 * Bad input (unknown id, invalid override, conflicting flags) exits 2 with a
 * precise message before anything is changed.
 */
#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "amqp.h"
#include "cli.h"
#include "task.h"

enum {
    O_COMMENT = OPT_FIRST_COMMAND_OPTION,
    O_REASON,
    O_PAYLOAD,
    O_FOLLOW,
    O_FROM_STEP,
    O_FORK,
    O_AFTER_STEP,
};

static int commit(cli_t *c, PGconn *db) {
    PGresult *r;
    if (cli_exec_simple(c, db, "COMMIT") != 0) {
        return -1;
    }
    r = PQexec(db, "NOTIFY longrun_wakeup");
    PQclear(r);
    return 0;
}

static void rollback(PGconn *db) {
    PGresult *r = PQexec(db, "ROLLBACK");
    PQclear(r);
}

/* Looks up a task's status (and whether it exists).  Returns 0 and fills
 * status, or an exit code after printing why. */
static int task_status(cli_t *c, PGconn *db, const char *id, char *status, size_t len, bool lock) {
    PGresult *r;
    if (!lr_uuid_valid(id)) {
        return cli_fail(c, LR_EXIT_USAGE, "'%s' is not a task id (a UUID)", id);
    }
    r = cli_exec(c, db,
                 lock ? "SELECT status FROM tasks WHERE id = $1 FOR UPDATE" : "SELECT status FROM tasks WHERE id = $1",
                 1, &id);
    if (r == NULL) {
        return LR_EXIT_FAIL;
    }
    if (PQntuples(r) == 0) {
        PQclear(r);
        return cli_fail(c, LR_EXIT_USAGE, "no task with id %s", id);
    }
    snprintf(status, len, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return 0;
}

/* A transaction that changes one task: its own connection, the task's row
 * locked (lock_task()), ended by end_task_txn(). */
typedef struct task_txn {
    PGconn *db;
    const char *id;  /* borrowed */
    char status[32]; /* the task's status when it was locked */
} task_txn_t;

/* Connects, begins a transaction and locks task t->id, reading its status.
 * Returns 0, or an exit code after printing why (with nothing left open). */
static int lock_task(cli_t *c, task_txn_t *t) {
    int rc;
    t->db = cli_db_connect(c);
    if (t->db == NULL) {
        return LR_EXIT_FAIL;
    }
    if (cli_exec_simple(c, t->db, "BEGIN") != 0) {
        PQfinish(t->db);
        t->db = NULL;
        return LR_EXIT_FAIL;
    }
    rc = task_status(c, t->db, t->id, t->status, sizeof(t->status), true);
    if (rc != 0) {
        rollback(t->db);
        PQfinish(t->db);
        t->db = NULL;
    }
    return rc;
}

/* Ends a locked task's transaction: rolled back unless rc is LR_EXIT_OK (it
 * was committed), then closed. */
static void end_task_txn(task_txn_t *t, int rc) {
    if (rc != LR_EXIT_OK) {
        rollback(t->db);
    }
    PQfinish(t->db);
}

/* Common option parsing for the simple task actions. */
typedef struct act_opts {
    const char *actor;
    const char *comment;
    const char *reason;
    const char *payload;
    bool follow;
    long from_step;
    bool fork;
    bool after_step;
} act_opts_t;

static int parse_act(cli_t *c, int argc, char **argv, const char *usage, act_opts_t *o, int min_args, int max_args) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         CLI_ACTOR_OPTION,
                                         {"comment", required_argument, NULL, O_COMMENT},
                                         {"reason", required_argument, NULL, O_REASON},
                                         {"payload", required_argument, NULL, O_PAYLOAD},
                                         {"follow", no_argument, NULL, O_FOLLOW},
                                         {"from-step", required_argument, NULL, O_FROM_STEP},
                                         {"fork", no_argument, NULL, O_FORK},
                                         {"after-step", no_argument, NULL, O_AFTER_STEP},
                                         {NULL, 0, NULL, 0}};
    int opt;
    memset(o, 0, sizeof(*o));
    o->from_step = -1;
    while ((opt = cli_next_option(c, argc, argv, "hf", opts)) != -1) {
        switch (opt) {
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        case 'h': printf("%s", usage); return -1;
        case O_COMMENT: o->comment = optarg; break;
        case O_REASON: o->reason = optarg; break;
        case O_PAYLOAD: o->payload = optarg; break;
        case 'f':
        case O_FOLLOW: o->follow = true; break;
        case O_FORK: o->fork = true; break;
        case O_AFTER_STEP: o->after_step = true; break;
        case O_FROM_STEP:
            if (cli_parse_long(c, "--from-step", optarg, 1, 1000000, &o->from_step) != 0) {
                return LR_EXIT_USAGE;
            }
            break;
        default: fprintf(stderr, "%s", usage); return LR_EXIT_USAGE;
        }
    }
    if (argc - optind < min_args || argc - optind > max_args) {
        fprintf(stderr, "%s", usage);
        return cli_fail(c, LR_EXIT_USAGE, "expected %d%s argument(s), got %d", min_args,
                        max_args > min_args ? " or more" : "", argc - optind);
    }
    o->actor = cli_actor(c);
    if (strlen(o->actor) == 0 || strlen(o->actor) > 128) {
        return cli_fail(c, LR_EXIT_USAGE, "--actor: 1 to 128 characters");
    }
    return 0;
}

/* ------------------------------------------------------ approve/deny/signal */

/* A signal for a task: an approval or denial, or an external event. */
typedef struct signal_req {
    const char *id;           /* the task */
    const char *name;         /* "approval" or "event:NAME" */
    const cJSON *payload;     /* recorded with the signal and in the task event */
    const char *waits_for;    /* the suspend_reason it resumes: "approval" or "event" */
    const char *event_reason; /* the task event's reason: approved, denied or signal */
    const char *actor;
} signal_req_t;

/* Records s in the transaction of db, then marks the task to resume now if
 * it waits for s.  Returns 0 with *woke set, or -1 (message printed). */
static int record_signal(cli_t *c, PGconn *db, const signal_req_t *s, bool *woke) {
    char *ptxt = cJSON_PrintUnformatted(s->payload);
    const char *params[4] = {s->id, s->name, ptxt, s->actor};
    PGresult *r;
    int rc = -1;

    r = cli_exec(c, db, "INSERT INTO task_signals (task_id, name, payload, actor) VALUES ($1, $2, $3::jsonb, $4)", 4,
                 params);
    if (r == NULL) {
        goto out;
    }
    PQclear(r);
    /* Wake the task now if it waits for this (the scheduler resumes it). */
    r = cli_exec(c, db,
                 "WITH u AS (UPDATE tasks SET resume_at = now(), updated_at = now() WHERE id = $1"
                 " AND status = 'suspended' AND suspend_reason = $2 AND ($3::text IS NULL OR wait_event = $3)"
                 " RETURNING id)"
                 " INSERT INTO task_events (task_id, from_status, to_status, reason, actor, detail)"
                 " SELECT $1, 'suspended', 'suspended', $4, $5, $6::jsonb FROM (SELECT 1) x",
                 6,
                 (const char *const[]){s->id, s->waits_for, strcmp(s->waits_for, "event") == 0 ? s->name + 6 : NULL,
                                       s->event_reason, s->actor, ptxt});
    if (r == NULL) {
        goto out;
    }
    PQclear(r);
    r = cli_exec(c, db, "SELECT resume_at IS NOT NULL AND status = 'suspended' FROM tasks WHERE id = $1", 1, &s->id);
    *woke = r != NULL && PQntuples(r) > 0 && PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    rc = 0;
out:
    free(ptxt);
    return rc;
}

/* Delivers s to its task unless the task has ended.  Returns an exit code. */
static int deliver_signal(cli_t *c, const signal_req_t *s) {
    task_txn_t t = {NULL, s->id, ""};
    bool woke = false;
    int rc = lock_task(c, &t);

    if (rc != 0) {
        return rc;
    }
    if (cli_status_final(t.status)) {
        rc = cli_fail(c, LR_EXIT_USAGE, "task %s is %s: nothing waits for a %s", s->id, t.status, s->name);
        goto out;
    }
    if (record_signal(c, t.db, s, &woke) != 0 || commit(c, t.db) != 0) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    if (c->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "id", s->id);
        cJSON_AddStringToObject(o, "signal", s->name);
        cJSON_AddBoolToObject(o, "resumed", woke);
        cli_print_json(o);
        cJSON_Delete(o);
    } else {
        printf("%s: %s recorded%s\n", s->id, s->name,
               woke ? "; the task resumes now" : " (the task is not waiting for it yet; it will see it when it does)");
    }
    rc = LR_EXIT_OK;
out:
    end_task_txn(&t, rc);
    return rc;
}

static int cmd_approve_deny(cli_t *c, int argc, char **argv, bool approve) {
    static const char *usage_a = "usage: longrun approve ID [--comment TEXT] [--actor NAME] [--json]\n"
                                 "\nApproves what a suspended task waits for (request_approval, or a tool marked\n"
                                 "requires_approval); the task resumes within about a second.\n";
    static const char *usage_d = "usage: longrun deny ID [--reason TEXT] [--actor NAME] [--json]\n"
                                 "\nDenies the approval a task waits for: the model receives the denial as the\n"
                                 "tool's result (an error) and decides what to do next.\n";
    act_opts_t o;
    cJSON *p;
    int rc = parse_act(c, argc, argv, approve ? usage_a : usage_d, &o, 1, 1);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    if ((approve && o.reason != NULL) || (!approve && o.comment != NULL)) {
        return cli_fail(c, LR_EXIT_USAGE,
                        approve ? "--reason belongs to deny; use --comment"
                                : "--comment belongs to approve; use --reason");
    }
    p = cJSON_CreateObject();
    cJSON_AddBoolToObject(p, "approved", approve);
    cJSON_AddStringToObject(p, "by", o.actor);
    if (approve && o.comment != NULL) {
        cJSON_AddStringToObject(p, "comment", o.comment);
    }
    if (!approve && o.reason != NULL) {
        cJSON_AddStringToObject(p, "reason", o.reason);
    }
    {
        const signal_req_t s = {argv[optind], "approval", p, "approval", approve ? "approved" : "denied", o.actor};
        rc = deliver_signal(c, &s);
    }
    cJSON_Delete(p);
    return rc;
}

int cmd_approve(cli_t *c, int argc, char **argv) { return cmd_approve_deny(c, argc, argv, true); }
int cmd_deny(cli_t *c, int argc, char **argv) { return cmd_approve_deny(c, argc, argv, false); }

int cmd_signal(cli_t *c, int argc, char **argv) {
    static const char *usage = "usage: longrun signal ID EVENT [--payload JSON] [--actor NAME] [--json]\n"
                               "\nDelivers an external event to a task; a task waiting in wait_for_event(EVENT)\n"
                               "resumes with the payload as the tool's result.\n";
    act_opts_t o;
    cJSON *p;
    char name[160];
    int rc = parse_act(c, argc, argv, usage, &o, 2, 2);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    if (strlen(argv[optind + 1]) == 0 || strlen(argv[optind + 1]) > 120) {
        return cli_fail(c, LR_EXIT_USAGE, "EVENT: 1 to 120 characters");
    }
    p = o.payload != NULL ? cJSON_Parse(o.payload) : cJSON_CreateNull();
    if (p == NULL) {
        return cli_fail(c, LR_EXIT_USAGE, "--payload: not valid JSON");
    }
    snprintf(name, sizeof(name), "event:%s", argv[optind + 1]);
    {
        const signal_req_t s = {argv[optind], name, p, "event", "signal", o.actor};
        rc = deliver_signal(c, &s);
    }
    cJSON_Delete(p);
    return rc;
}

/* ------------------------------------------------------------------ cancel */

/* The outcome of a task cancelled by the operator, to its reply_to (columns
 * of r: status, reply_to, correlation_id, step, tokens_in, tokens_out,
 * cost_usd), mandatory.  A reply_to that is not an allowed queue
 * (lr_amqp_reply_allowed) gets nothing: the refusal is recorded on the task
 * (LR_SQL_REPLY_REFUSED, by actor, on db) and LR_EPERM returned.  Returns 0
 * when the broker confirmed it; else warns. */
static int send_cancel_outcome(cli_t *c, PGconn *db, const char *actor, const char *id, PGresult *r,
                               const char *reason) {
    lr_amqp_sync_t *a = NULL;
    lr_amqp_msg_t msg;
    char err[512] = "";
    const char *reply_to = PQgetvalue(r, 0, 1);
    char *body = NULL;
    int rc = lr_amqp_reply_allowed(reply_to, c->cfg.reply_to_prefix, err, sizeof(err));
    if (rc != 0) {
        const char *params[4] = {id, actor, reply_to, err};
        (void)cli_fail(c, 0, "warning: %s is cancelled, but its outcome is not sent: %s", id, err);
        PQclear(cli_exec(c, db, LR_SQL_REPLY_REFUSED, 4, params));
        return rc;
    }
    body = lr_outcome_json(id, "cancelled", NULL, reason, "cancelled", atol(PQgetvalue(r, 0, 3)),
                           atol(PQgetvalue(r, 0, 4)), atol(PQgetvalue(r, 0, 5)), atof(PQgetvalue(r, 0, 6)));
    if (body == NULL) {
        return LR_ENOMEM;
    }
    memset(&msg, 0, sizeof(msg));
    msg.body = body;
    msg.body_len = strlen(body);
    msg.message_id = id;
    msg.correlation_id = PQgetisnull(r, 0, 2) ? NULL : PQgetvalue(r, 0, 2);
    msg.content_type = "application/json";
    msg.persistent = true;
    msg.mandatory = !lr_amqp_reply_direct(reply_to); /* no such queue: returned, reported below */
    rc = lr_amqp_sync_connect(&a, c->cfg.amqp_url, 5000, err, sizeof(err));
    if (rc == 0) {
        rc = lr_amqp_sync_publish(a, "", reply_to, &msg, 5000, err, sizeof(err));
        lr_amqp_sync_close(a);
    }
    if (rc != 0) {
        (void)cli_fail(c, 0, "warning: %s is cancelled, but its outcome could not be sent to reply_to %s: %s", id,
                       reply_to, err);
    }
    free(body);
    return rc;
}

/* Cancels the locked task t, or for a running one asks it to stop (now, or
 * at its next step boundary with --after-step), with its task event (the
 * mode in its detail).  Returns the row of the task as it now is (status,
 * reply_to, correlation_id, step, tokens_in, tokens_out, cost_usd), or NULL
 * (message printed). */
static PGresult *mark_cancelled(cli_t *c, const task_txn_t *t, const act_opts_t *o) {
    const char *params[5] = {t->id, o->actor, o->reason != NULL ? o->reason : "cancelled by operator", t->status,
                             o->after_step ? "after_step" : "immediate"};
    return cli_exec(c, t->db,
                    "WITH u AS (UPDATE tasks SET cancel_requested = true,"
                    "  status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,"
                    "  stop_reason = CASE WHEN status = 'running' THEN stop_reason ELSE 'cancelled' END,"
                    "  error = $3, finished_at = CASE WHEN status = 'running' THEN NULL ELSE now() END,"
                    "  lease_owner = CASE WHEN status = 'running' THEN lease_owner ELSE NULL END,"
                    "  updated_at = now() WHERE id = $1 RETURNING status, reply_to, correlation_id, step,"
                    "  tokens_in, tokens_out, cost_usd::float8 AS cost_usd),"
                    " ev AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor, detail)"
                    " SELECT $1, $4, u.status, CASE WHEN u.status = 'running' THEN 'cancel_requested'"
                    "  ELSE 'cancelled' END, $2, jsonb_build_object('reason', $3::text) ||"
                    "  CASE WHEN u.status = 'running' THEN jsonb_build_object('mode', $5::text)"
                    "  ELSE '{}'::jsonb END FROM u)"
                    " SELECT status, reply_to, correlation_id, step, tokens_in, tokens_out, cost_usd FROM u",
                    5, params);
}

/* Immediate cancellation of a running task: the worker that holds it
 * LISTENs on longrun_cancel (worker/cancel.c) and aborts the step in flight.
 * Sent inside the transaction, so that it is delivered only when the cancel
 * is committed (a worker that gets it sees cancel_requested).  Returns 0 or
 * -1 (message printed). */
static int notify_cancel(cli_t *c, const task_txn_t *t) {
    PGresult *r = cli_exec(c, t->db, "SELECT pg_notify('longrun_cancel', $1)", 1, &t->id);
    if (r == NULL) {
        return -1;
    }
    PQclear(r);
    return 0;
}

int cmd_cancel(cli_t *c, int argc, char **argv) {
    static const char *usage = "usage: longrun cancel ID [--after-step] [--reason TEXT] [--actor NAME] [--json]\n"
                               "\nCancels a task.  A queued, suspended or waiting task is cancelled at once.  A\n"
                               "running one is stopped now: its worker aborts the model or tool calls in flight\n"
                               "and the task is cancelled within about a second (the step in flight is not\n"
                               "recorded).  --after-step lets the current step finish and stops the task at its\n"
                               "next step boundary instead.  cancelled is terminal.\n";
    act_opts_t o;
    task_txn_t t = {NULL, NULL, ""};
    PGresult *r = NULL;
    bool reply_tried = false, reply_sent = false, running = false;
    int rc = parse_act(c, argc, argv, usage, &o, 1, 1);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    t.id = argv[optind];
    rc = lock_task(c, &t);
    if (rc != 0) {
        return rc;
    }
    if (strcmp(t.status, "succeeded") == 0 || strcmp(t.status, "failed") == 0 || strcmp(t.status, "cancelled") == 0) {
        rc = cli_fail(c, LR_EXIT_USAGE, "task %s is already %s", t.id, t.status);
        goto out;
    }
    r = mark_cancelled(c, &t, &o);
    running = r != NULL && strcmp(PQgetvalue(r, 0, 0), "running") == 0;
    if (r == NULL || (running && !o.after_step && notify_cancel(c, &t) != 0) || commit(c, t.db) != 0) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    /* A task cancelled here (not running) gets no outcome from a worker:
     * send it to its reply_to, as a worker would (best effort). */
    if (strcmp(PQgetvalue(r, 0, 0), "cancelled") == 0 && !PQgetisnull(r, 0, 1) && PQgetvalue(r, 0, 1)[0] != '\0') {
        reply_sent =
            send_cancel_outcome(c, t.db, o.actor, t.id, r, o.reason != NULL ? o.reason : "cancelled by operator") == 0;
        reply_tried = true;
    }
    if (c->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "id", t.id);
        cJSON_AddStringToObject(j, "status", PQgetvalue(r, 0, 0));
        if (reply_tried) {
            cJSON_AddBoolToObject(j, "outcome_sent", reply_sent);
        }
        if (running) {
            cJSON_AddStringToObject(j, "mode", o.after_step ? "after_step" : "immediate");
        }
        cli_print_json(j);
        cJSON_Delete(j);
    } else if (running && o.after_step) {
        printf("%s: cancel requested; the task stops at its next step boundary\n", t.id);
    } else if (running) {
        printf("%s: cancel requested; its worker aborts the step in flight and the task stops now\n", t.id);
    } else {
        printf("%s: cancelled\n", t.id);
    }
    rc = LR_EXIT_OK;
out:
    end_task_txn(&t, rc);
    PQclear(r);
    return rc;
}

/* --------------------------------------------------------------------- log */

static void print_step_row(cli_t *c, PGresult *r, int i, cJSON *arr) {
    if (arr != NULL) {
        cJSON *o = cJSON_CreateObject();
        cJSON *tc = cJSON_Parse(PQgetvalue(r, i, 5));
        cJSON_AddStringToObject(o, "type", "step");
        cJSON_AddStringToObject(o, "at", PQgetvalue(r, i, 0));
        cJSON_AddNumberToObject(o, "step", atof(PQgetvalue(r, i, 1)));
        cJSON_AddStringToObject(o, "model", PQgetvalue(r, i, 2));
        cJSON_AddNumberToObject(o, "tokens_in", atof(PQgetvalue(r, i, 3)));
        cJSON_AddNumberToObject(o, "tokens_out", atof(PQgetvalue(r, i, 4)));
        cJSON_AddItemToObject(o, "tool_calls", tc != NULL ? tc : cJSON_CreateNull());
        cJSON_AddNumberToObject(o, "cost_usd", atof(PQgetvalue(r, i, 6)));
        cJSON_AddNumberToObject(o, "latency_ms", atof(PQgetvalue(r, i, 7)));
        cJSON_AddStringToObject(o, "worker", PQgetvalue(r, i, 8));
        cJSON_AddNumberToObject(o, "epoch", atof(PQgetvalue(r, i, 9)));
        cJSON_AddItemToArray(arr, o);
        return;
    }
    {
        cJSON *tc = cJSON_Parse(PQgetvalue(r, i, 5));
        const cJSON *t;
        char tools[400] = "";
        size_t n = 0;
        cJSON_ArrayForEach(t, tc) {
            n += (size_t)snprintf(tools + n, n < sizeof(tools) ? sizeof(tools) - n : 0, "%s%s(%s)", n ? " " : "",
                                  cJSON_GetStringValue(cJSON_GetObjectItem(t, "name")) ?: "?",
                                  cJSON_GetStringValue(cJSON_GetObjectItem(t, "status")) ?: "?");
        }
        cJSON_Delete(tc);
        (void)c;
        printf("%s  step %-4s %-22.22s tokens %5s/%-5s $%-9s %6s ms  %s%s%s\n", PQgetvalue(r, i, 0),
               PQgetvalue(r, i, 1), PQgetvalue(r, i, 2)[0] ? PQgetvalue(r, i, 2) : "-", PQgetvalue(r, i, 3),
               PQgetvalue(r, i, 4), PQgetvalue(r, i, 6), PQgetvalue(r, i, 7), tools[0] ? "tools: " : "", tools,
               n >= sizeof(tools) ? "..." : "");
    }
}

static void print_event_row(PGresult *r, int i, cJSON *arr) {
    if (arr != NULL) {
        cJSON *o = cJSON_CreateObject();
        cJSON *d = PQgetisnull(r, i, 6) ? NULL : cJSON_Parse(PQgetvalue(r, i, 6));
        cJSON_AddStringToObject(o, "type", "event");
        cJSON_AddStringToObject(o, "at", PQgetvalue(r, i, 0));
        cJSON_AddNumberToObject(o, "id", atof(PQgetvalue(r, i, 1)));
        cJSON_AddStringToObject(o, "from", PQgetvalue(r, i, 2));
        cJSON_AddStringToObject(o, "to", PQgetvalue(r, i, 3));
        cJSON_AddStringToObject(o, "reason", PQgetvalue(r, i, 4));
        cJSON_AddStringToObject(o, "actor", PQgetvalue(r, i, 5));
        cJSON_AddItemToObject(o, "detail", d != NULL ? d : cJSON_CreateNull());
        cJSON_AddItemToArray(arr, o);
        return;
    }
    printf("%s  %-9s -> %-10s %-24s by %s%s%s\n", PQgetvalue(r, i, 0),
           PQgetvalue(r, i, 2)[0] ? PQgetvalue(r, i, 2) : "(new)", PQgetvalue(r, i, 3), PQgetvalue(r, i, 4),
           PQgetvalue(r, i, 5), PQgetisnull(r, i, 6) ? "" : "  ", PQgetisnull(r, i, 6) ? "" : PQgetvalue(r, i, 6));
}

#define TS "to_char(%s AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* How far `log` has printed a task's audit log, and how it prints. */
typedef struct log_cursor {
    const char *id;
    long last_step;  /* the last step printed */
    long last_event; /* the id of the last event printed */
    bool jsonl;      /* --json --follow: one JSON object per line */
} log_cursor_t;

/* The steps and events after the cursor, read in one snapshot so that a step
 * and the transition committed with it are seen together. */
typedef struct log_page {
    PGresult *steps;
    PGresult *events;
} log_page_t;

/* Reads the next page of the log.  Returns 0, or -1 (message printed; the
 * caller clears the page either way). */
static int read_log_page(cli_t *c, PGconn *db, const log_cursor_t *lc, log_page_t *pg) {
    char ls[24], le[24];
    const char *params[2] = {lc->id, ls};
    snprintf(ls, sizeof(ls), "%ld", lc->last_step);
    snprintf(le, sizeof(le), "%ld", lc->last_event);
    PQclear(PQexec(db, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"));
    pg->steps = cli_exec(c, db,
                         "SELECT "
                         "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
                         ", step_no, coalesce(model, ''), tokens_in, tokens_out,"
                         " coalesce(tool_calls::text, '[]'), cost_usd, latency_ms, coalesce(worker, ''), epoch,"
                         " created_at FROM task_steps WHERE task_id = $1 AND step_no > $2::int ORDER BY step_no",
                         2, params);
    params[1] = le;
    pg->events = cli_exec(c, db,
                          "SELECT "
                          "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
                          ", id, coalesce(from_status, ''), coalesce(to_status, ''), coalesce(reason, ''), actor,"
                          " detail::text, at FROM task_events WHERE task_id = $1 AND id > $2::bigint ORDER BY id",
                          2, params);
    PQclear(PQexec(db, "COMMIT"));
    return pg->steps != NULL && pg->events != NULL ? 0 : -1;
}

/* Prints a page, steps and events merged by time, and moves the cursor past
 * it: as text, as one JSON array (--json), or as JSON lines. */
static void print_log_page(cli_t *c, log_cursor_t *lc, const log_page_t *pg) {
    PGresult *steps = pg->steps, *events = pg->events;
    cJSON *arr = c->json && !lc->jsonl ? cJSON_CreateArray() : NULL;
    int si = 0, ei = 0;
    /* ISO timestamps sort as text */
    while (si < PQntuples(steps) || ei < PQntuples(events)) {
        bool take_step = ei >= PQntuples(events) ||
                         (si < PQntuples(steps) && strcmp(PQgetvalue(steps, si, 0), PQgetvalue(events, ei, 0)) <= 0);
        cJSON *line = lc->jsonl ? cJSON_CreateArray() : NULL;
        if (take_step) {
            print_step_row(c, steps, si, arr != NULL ? arr : line);
            lc->last_step = atol(PQgetvalue(steps, si, 1));
            si++;
        } else {
            print_event_row(events, ei, arr != NULL ? arr : line);
            lc->last_event = atol(PQgetvalue(events, ei, 1));
            ei++;
        }
        if (line != NULL) {
            cli_print_json(cJSON_GetArrayItem(line, 0));
            cJSON_Delete(line);
        }
    }
    if (arr != NULL) {
        cli_print_json(arr);
        cJSON_Delete(arr);
    }
}

int cmd_log(cli_t *c, int argc, char **argv) {
    static const char *usage = "usage: longrun log ID [--follow] [--json]\n"
                               "\nThe audit log of a task: every step (model that answered, tool calls, tokens, cost,\n"
                               "latency) and every status transition (who and why), in order.  --follow keeps\n"
                               "printing new entries as the task writes them, until it ends (Ctrl-C to stop).\n";
    act_opts_t o;
    log_cursor_t lc = {NULL, 0, 0, false};
    PGconn *db;
    char status[32];
    int rc = parse_act(c, argc, argv, usage, &o, 1, 1);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    lc.id = argv[optind];
    lc.jsonl = c->json && o.follow;
    db = cli_db_connect(c);
    if (db == NULL) {
        return LR_EXIT_FAIL;
    }
    rc = task_status(c, db, lc.id, status, sizeof(status), false);
    if (rc != 0) {
        PQfinish(db);
        return rc;
    }
    for (;;) {
        log_page_t pg = {NULL, NULL};
        rc = read_log_page(c, db, &lc, &pg);
        if (rc == 0) {
            print_log_page(c, &lc, &pg);
        }
        PQclear(pg.steps);
        PQclear(pg.events);
        if (rc != 0) {
            PQfinish(db);
            return LR_EXIT_FAIL;
        }
        fflush(stdout);
        if (!o.follow || task_status(c, db, lc.id, status, sizeof(status), false) != 0) {
            break;
        }
        if (cli_status_final(status)) {
            /* one last read to catch the final rows */
            o.follow = false;
            continue;
        }
        usleep(300000);
    }
    PQfinish(db);
    return LR_EXIT_OK;
}

/* ------------------------------------------------------------------ replay */

/* Forks task t at step o->from_step: a new task (new_id) with the steps
 * before it copied and its own "forked" event; t itself is left as it is.
 * Returns the new task's row (id, queue), or NULL (message printed). */
static PGresult *replay_fork(cli_t *c, const task_txn_t *t, const act_opts_t *o) {
    char keep_s[24], new_id[LR_UUID_LEN + 1];
    const char *p[4] = {t->id, new_id, keep_s, o->actor};
    snprintf(keep_s, sizeof(keep_s), "%ld", o->from_step - 1);
    if (lr_uuid_v4(new_id) != 0) {
        cli_fail(c, LR_EXIT_FAIL, "cannot generate an id");
        return NULL;
    }
    return cli_exec(
        c, t->db,
        "WITH t AS (INSERT INTO tasks (id, queue, agent, input, budgets, max_attempts, deadline, tenant,"
        "  metadata, step, status)"
        " SELECT $2::uuid, queue, agent, input, budgets, max_attempts, deadline, tenant,"
        "  coalesce(metadata, '{}'::jsonb) || jsonb_build_object('forked_from', $1::text,"
        "  'forked_at_step', $3::int), $3::int, 'queued' FROM tasks WHERE id = $1::uuid RETURNING id, queue),"
        " s AS (INSERT INTO task_steps (task_id, step_no, epoch, worker, state_version, kind, model,"
        "  messages, tool_calls, tokens_in, tokens_out, tokens_cached, cost_usd, latency_ms, fallback)"
        " SELECT $2::uuid, step_no, 0, worker, state_version, kind, model, messages, tool_calls,"
        "  tokens_in, tokens_out, tokens_cached, cost_usd, latency_ms, fallback FROM task_steps"
        "  WHERE task_id = $1::uuid AND step_no <= $3::int),"
        " e AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor, detail)"
        " SELECT $2::uuid, NULL, 'queued', 'forked', $4, jsonb_build_object('from', $1::text,"
        "  'from_step', $3::int + 1))"
        " SELECT id::text, queue FROM t",
        4, p);
}

/* Replays task t in place from step o->from_step: the later steps deleted,
 * the task queued again with its lease epoch bumped (fencing out a worker
 * still running it).  Returns the task's row (id, queue), or NULL (message
 * printed). */
static PGresult *replay_in_place(cli_t *c, const task_txn_t *t, const act_opts_t *o) {
    char step_s[24], keep_s[24];
    const char *p[4] = {t->id, step_s, keep_s, o->actor};
    snprintf(step_s, sizeof(step_s), "%ld", o->from_step);
    snprintf(keep_s, sizeof(keep_s), "%ld", o->from_step - 1);
    PQclear(cli_exec(c, t->db, "DELETE FROM task_steps WHERE task_id = $1 AND step_no >= $2::int", 2, p));
    return cli_exec(c, t->db,
                    "WITH u AS (UPDATE tasks SET step = $3::int, status = 'queued', lease_epoch = lease_epoch + 1,"
                    "  lease_owner = NULL, lease_expires_at = NULL, result = NULL, error = NULL, stop_reason = NULL,"
                    "  finished_at = NULL, cancel_requested = false, attempt = 0, claims = 0, resume_at = NULL,"
                    "  suspend_reason = NULL, published_at = NULL, updated_at = now() WHERE id = $1::uuid"
                    "  RETURNING id, queue),"
                    " e AS (INSERT INTO task_events (task_id, from_status, to_status, reason, actor, detail)"
                    " SELECT $1::uuid, NULL, 'queued', 'replay', $4, jsonb_build_object('from_step', $2::int) FROM u)"
                    " SELECT id::text, queue FROM u",
                    4, p);
}

/* The last step task t checkpointed (0 when it cannot be read). */
static long task_step(cli_t *c, const task_txn_t *t) {
    PGresult *r = cli_exec(c, t->db, "SELECT step FROM tasks WHERE id = $1", 1, &t->id);
    long step = r != NULL ? atol(PQgetvalue(r, 0, 0)) : 0;
    PQclear(r);
    return step;
}

int cmd_replay(cli_t *c, int argc, char **argv) {
    static const char *usage =
        "usage: longrun replay ID --from-step N [--fork] [--actor NAME] [--json]\n"
        "\nRuns a task again from step N: steps before N are kept, step N and later run again.\n"
        "In place (the default) the later steps are deleted and the task's epoch is bumped, so a\n"
        "worker still running it is fenced out.  With --fork, a new task is created with the\n"
        "history up to step N-1 copied, and the original is left untouched.\n";
    act_opts_t o;
    task_txn_t t = {NULL, NULL, ""};
    PGresult *r = NULL;
    int pub = 0;
    long step;
    int rc = parse_act(c, argc, argv, usage, &o, 1, 1);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    if (o.from_step < 1) {
        return cli_fail(c, LR_EXIT_USAGE, "--from-step N is required (N >= 1)");
    }
    t.id = argv[optind];
    rc = lock_task(c, &t);
    if (rc != 0) {
        return rc;
    }
    step = task_step(c, &t);
    if (o.from_step > step + 1) {
        rc = cli_fail(c, LR_EXIT_USAGE, "--from-step %ld: the task has only %ld step(s); use 1..%ld", o.from_step, step,
                      step + 1);
        goto out;
    }
    r = o.fork ? replay_fork(c, &t, &o) : replay_in_place(c, &t, &o);
    if (r == NULL || commit(c, t.db) != 0) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    (void)cli_publish_continuations(c, t.db, r, 0, 1, &pub);
    if (c->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "id", PQgetvalue(r, 0, 0));
        cJSON_AddNumberToObject(j, "from_step", (double)o.from_step);
        cJSON_AddBoolToObject(j, "forked", o.fork);
        cJSON_AddBoolToObject(j, "published", pub == 1);
        cli_print_json(j);
        cJSON_Delete(j);
    } else {
        printf("%s: replaying from step %ld%s\n", PQgetvalue(r, 0, 0), o.from_step, o.fork ? " (fork)" : "");
    }
    rc = LR_EXIT_OK;
out:
    end_task_txn(&t, rc);
    PQclear(r);
    return rc;
}
