/*
 * enqueue.c - `longrun enqueue`: record tasks in PostgreSQL and publish them.
 *
 * Order of operations, per task:
 *   1. validate the body with lr_task_parse (the one contract validator);
 *   2. INSERT the row (status queued, published_at NULL) with ON CONFLICT DO
 *      NOTHING: an id that exists is reported and never published again;
 *   3. publish with confirms to longrun.tasks / <queue>;
 *   4. mark published_at.
 * Both servers are connected to before anything is written, so an
 * unreachable broker records nothing.  If the publish fails after the row was
 * written, the row stays queued with published_at NULL and the scheduler's
 * outbox sweep dispatches it after LONGRUN_OUTBOX_GRACE_SECONDS; the command
 * says so and exits 1.
 *
 * Backpressure: a task queue at its x-max-length (LONGRUN_QUEUE_MAX_LENGTH)
 * nacks the publish (x-overflow=reject-publish; lr_amqp_sync_publish tries 4
 * times for a transient nack, then returns LR_EBUSY).  The task is then not
 * enqueued: its row is deleted again (it was never published, so nothing
 * else can have seen it run), the command reports "queue full" and exits 75
 * (EX_TEMPFAIL) when that was the only kind of failure.  --wait-for-room N
 * retries the publish with a doubling pause (250 ms .. 5 s) for up to N
 * seconds first.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "amqp.h"
#include "cli.h"
#include "task.h"

#define MAX_LINE (LR_TASK_MAX_BODY + 2)
#define EXIT_TEMPFAIL 75 /* sysexits.h EX_TEMPFAIL: a queue was full, try again later */
#define ROOM_PAUSE_MIN_MS 250
#define ROOM_PAUSE_MAX_MS 5000

static void enqueue_usage(FILE *f) {
    fprintf(f, "usage: longrun enqueue --agent NAME --input JSON|@FILE [options]\n"
               "       longrun enqueue [--queue Q] < tasks.jsonl\n"
               "\n"
               "Records tasks (status queued) and publishes them with publisher confirms.\n"
               "Without --agent, reads one task body per line from stdin (the message format of\n"
               "docs/task-contract.md).  Prints each task id (--json: one object per task).\n"
               "The same id enqueued twice is reported as existing and never runs twice.\n"
               "\n"
               "  --agent NAME           agent to run (^[a-z0-9][a-z0-9_.-]{0,63}$)\n"
               "  --input JSON|@FILE|-   task input (object, array or string)\n"
               "  --id UUID              task id (default: a random UUID); also the idempotency key\n"
               "  --queue Q              task queue (default 'default')\n"
               "  --max-steps N          budget: steps (1..10000)\n"
               "  --max-tool-calls N     budget: tool calls (0..100000)\n"
               "  --max-tokens N         budget: input + output tokens\n"
               "  --max-cost USD         budget: cost in US dollars\n"
               "  --max-seconds N        budget: active seconds\n"
               "  --max-attempts N       transient failures before dead-lettering (1..100)\n"
               "  --deadline RFC3339     dead-letter the task if not finished by then\n"
               "  --tenant T             tenant name (fair sharing)\n"
               "  --metadata JSON        free-form object, stored with the task\n"
               "  --callback-url URL     receives the outcome as a POST when the task ends\n"
               "  --wait-for-room N      when the queue is full, retry for up to N seconds (0..86400)\n"
               "  --wait                 then block until every task enqueued is final (longrun wait)\n"
               "  --timeout S            with --wait: give up after S seconds\n"
               "\n"
               "Exit codes: 0 ok; 1 failed; 2 usage or every line invalid; 3 some lines failed;\n"
               "75 the queue was full (LONGRUN_QUEUE_MAX_LENGTH): those tasks were not enqueued,\n"
               "try again later (or with --wait-for-room).  With --wait, once every task was\n"
               "enqueued: those of longrun wait (4 dead or failed, 5 cancelled, 6 timeout).\n");
}

enum {
    O_AGENT = OPT_FIRST_COMMAND_OPTION,
    O_INPUT,
    O_ID,
    O_QUEUE,
    O_MAX_ATTEMPTS,
    O_DEADLINE,
    O_TENANT,
    O_METADATA,
    O_CALLBACK,
    O_WAIT_FOR_ROOM,
    O_WAIT,
    O_TIMEOUT
};

typedef struct enq {
    cli_t *c;
    PGconn *db;
    lr_amqp_sync_t *amqp;
    const char *queue;
    int ok, exists, failed;
    int full;          /* of failed: refused because the queue was full */
    long wait_room_ms; /* --wait-for-room, in ms; 0: report a full queue at once */
    cJSON *out;        /* --json array */
    bool quiet;        /* producer sessions of other commands print nothing but errors */
    bool wait;         /* --wait: then wait for the tasks (ids) */
    long wait_timeout; /* --timeout, s; 0: none */
    char **ids;        /* --wait: the ids enqueued (or existing), owned */
    int nids, capids;
    bool ids_lost; /* --wait: out of memory keeping an id (waiting would miss it) */
} enq_t;

/* --wait: remembers id to wait for. */
static void keep_id(enq_t *e, const char *id) {
    if (e->nids == e->capids) {
        int cap = e->capids > 0 ? e->capids * 2 : 64;
        char **n = realloc(e->ids, (size_t)cap * sizeof(char *));
        if (n == NULL) {
            e->ids_lost = true;
            return;
        }
        e->ids = n;
        e->capids = cap;
    }
    if ((e->ids[e->nids] = strdup(id)) != NULL) {
        e->nids++;
    } else {
        e->ids_lost = true;
    }
}

static void report(enq_t *e, const char *id, const char *state, const char *error) {
    if (e->wait && id != NULL && (strcmp(state, "queued") == 0 || strcmp(state, "exists") == 0)) {
        keep_id(e, id);
    }
    if (e->out != NULL) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "id", id != NULL ? id : "");
        cJSON_AddStringToObject(o, "state", state);
        cJSON_AddStringToObject(o, "queue", e->queue);
        if (error != NULL) {
            cJSON_AddStringToObject(o, "error", error);
        }
        cJSON_AddItemToArray(e->out, o);
    } else if (e->quiet) {
        /* nothing */
    } else if (strcmp(state, "queued") == 0) {
        printf("%s\n", id);
    } else if (strcmp(state, "exists") == 0) {
        printf("%s (already exists; not enqueued again)\n", id);
    }
    if (error != NULL) {
        cli_fail(e->c, LR_EXIT_FAIL, "%s%s%s", id != NULL ? id : "", id != NULL ? ": " : "", error);
    }
}

/* Inserts the row of a validated task and its "enqueued" event, unless its id
 * exists.  Returns 1 when recorded, 0 when the id exists, -1 when it failed
 * (each reported). */
static int record_task(enq_t *e, const lr_task_msg_t *m) {
    char *input = cJSON_PrintUnformatted(m->input);
    char *budgets = lr_budgets_to_json(&m->budgets);
    char *metadata = m->metadata != NULL ? cJSON_PrintUnformatted(m->metadata) : NULL;
    char attempts[16];
    const char *params[11];
    PGresult *res = NULL;
    int rc = -1;

    snprintf(attempts, sizeof(attempts), "%d", m->max_attempts > 0 ? m->max_attempts : e->c->cfg.max_attempts);
    params[0] = m->id;
    params[1] = e->queue;
    params[2] = m->agent;
    params[3] = input;
    params[4] = budgets;
    params[5] = attempts;
    params[6] = m->deadline;
    params[7] = m->tenant;
    params[8] = metadata;
    params[9] = m->callback_url;
    params[10] = cli_actor(e->c);
    if (input == NULL || budgets == NULL) {
        report(e, m->id, "error", "out of memory");
        goto out;
    }
    res = cli_exec(e->c, e->db,
                   "WITH ins AS ("
                   " INSERT INTO tasks (id, queue, agent, input, budgets, max_attempts, deadline,"
                   "  tenant, metadata, callback_url)"
                   " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::int, $7::timestamptz, $8,"
                   "  $9::jsonb, $10)"
                   " ON CONFLICT (id) DO NOTHING RETURNING id)"
                   " INSERT INTO task_events (task_id, from_status, to_status, reason, actor)"
                   " SELECT id, NULL, 'queued', 'enqueued', $11 FROM ins RETURNING task_id",
                   11, params);
    if (res == NULL) {
        e->failed++;
        report(e, m->id, "error", "could not record the task (see above)");
        goto out;
    }
    if (PQntuples(res) == 0) {
        e->exists++;
        report(e, m->id, "exists", NULL);
        rc = 0;
        goto out;
    }
    rc = 1;
out:
    PQclear(res);
    free(input);
    free(budgets);
    free(metadata);
    return rc;
}

static void pause_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* The publish of one task; with --wait-for-room, a full queue is tried again
 * with a doubling pause until the wait is over.  Returns
 * lr_amqp_sync_publish's code (LR_EBUSY: still full). */
static int publish_with_room(enq_t *e, const lr_amqp_msg_t *msg, char *err, size_t errlen) {
    uint64_t until = cli_mono_ms() + (uint64_t)e->wait_room_ms;
    long pause = ROOM_PAUSE_MIN_MS;
    for (;;) {
        int rc = lr_amqp_sync_publish(e->amqp, LR_AMQP_EXCHANGE, e->queue, msg, 10000, err, errlen);
        uint64_t now = cli_mono_ms();
        if (rc != LR_EBUSY || now >= until) {
            return rc;
        }
        pause_ms((long)(now + (uint64_t)pause < until ? (uint64_t)pause : until - now));
        pause = pause * 2 > ROOM_PAUSE_MAX_MS ? ROOM_PAUSE_MAX_MS : pause * 2;
    }
}

/* Publishes a recorded task (confirmed) and marks it published.  Returns 0,
 * or -1 when the publish failed (reported: the outbox sweep sends it later,
 * or, when the queue was full, the row is taken back: not enqueued). */
static int publish_task(enq_t *e, const lr_task_msg_t *m, const char *body) {
    const char *id = m->id;
    char err[512];
    lr_amqp_msg_t msg;
    int rc;

    memset(&msg, 0, sizeof(msg));
    msg.body = body;
    msg.body_len = strlen(body);
    msg.message_id = m->id;
    msg.content_type = "application/json";
    msg.persistent = true;
    msg.mandatory = true;
    rc = publish_with_room(e, &msg, err, sizeof(err));
    if (rc == LR_EBUSY) {
        char why[768];
        /* Never published, so never claimed: take the row back (its events
         * go with it), so that "queue full" means "not enqueued". */
        PQclear(cli_exec(e->c, e->db,
                         "DELETE FROM tasks WHERE id = $1 AND status = 'queued' AND"
                         " published_at IS NULL AND step = 0",
                         1, &id));
        e->failed++;
        e->full++;
        snprintf(why, sizeof(why),
                 "queue full: %s%s is at its maximum length (LONGRUN_QUEUE_MAX_LENGTH) and refused the task%s; "
                 "not enqueued, try again later%s",
                 LR_AMQP_QUEUE_PREFIX, e->queue, e->wait_room_ms > 0 ? " for the whole --wait-for-room" : "",
                 e->wait_room_ms > 0 ? "" : " or use --wait-for-room SECONDS");
        report(e, m->id, "queue_full", why);
        return -1;
    }
    if (rc != 0) {
        char why[768];
        e->failed++;
        snprintf(why, sizeof(why),
                 "recorded, but publishing failed (%s); the scheduler's outbox sweep will dispatch it "
                 "after LONGRUN_OUTBOX_GRACE_SECONDS",
                 err);
        report(e, m->id, "unpublished", why);
        return -1;
    }
    PQclear(
        cli_exec(e->c, e->db, "UPDATE tasks SET published_at = now() WHERE id = $1 AND published_at IS NULL", 1, &id));
    e->ok++;
    report(e, m->id, "queued", NULL);
    return 0;
}

/* Records and publishes one validated task.  body: the message body to send
 * (with the id filled in).  Returns 0 ok/exists, -1 failed. */
static int enqueue_one(enq_t *e, const lr_task_msg_t *m, const char *body) {
    int rc = record_task(e, m);
    if (rc <= 0) {
        return rc;
    }
    return publish_task(e, m, body);
}

/* Validates a body; fills the id when missing and returns the body to send
 * (malloc'd) or NULL with err set. */
static char *prepare(const char *text, lr_task_msg_t *m, char *err, size_t errlen) {
    char *body;
    if (lr_task_parse(text, strlen(text), m, err, errlen) != 0) {
        return NULL;
    }
    if (m->continuation) {
        lr_task_msg_free(m);
        snprintf(err, errlen, "a body with only an id is a continuation, not a new task");
        return NULL;
    }
    if (!m->has_id) {
        if (lr_uuid_v4(m->id) != 0) {
            lr_task_msg_free(m);
            snprintf(err, errlen, "cannot generate a task id");
            return NULL;
        }
        m->has_id = true;
    }
    cJSON_DeleteItemFromObjectCaseSensitive(m->root, "id");
    cJSON_AddStringToObject(m->root, "id", m->id);
    body = cJSON_PrintUnformatted(m->root);
    /* the tree changed: re-borrow the pointers (the id item moved) */
    return body;
}

static int connect_all(enq_t *e) {
    char err[512];
    const char *queues[] = {e->queue, NULL};
    e->db = cli_db_connect(e->c);
    if (e->db == NULL) {
        return -1;
    }
    if (lr_amqp_sync_connect(&e->amqp, e->c->cfg.amqp_url, 10000, err, sizeof(err)) != 0) {
        /* cli_fail masks the password in the URL */
        cli_fail(e->c, LR_EXIT_FAIL,
                 "cannot connect to RabbitMQ at %s: %s (nothing was enqueued; is it running? try "
                 "'scripts/dev up')",
                 e->c->cfg.amqp_url, err);
        return -1;
    }
    if (lr_amqp_sync_declare(e->amqp, queues, e->c->cfg.delivery_limit, e->c->cfg.queue_max_length, err, sizeof(err)) !=
        0) {
        cli_fail(e->c, LR_EXIT_FAIL, "cannot declare the queue topology: %s", err);
        return -1;
    }
    return 0;
}

struct cli_producer {
    enq_t e;
};

cli_producer_t *cli_producer_open(cli_t *c, const char *queue) {
    cli_producer_t *p = calloc(1, sizeof(*p));
    if (p == NULL) {
        return NULL;
    }
    p->e.c = c;
    p->e.queue = queue;
    p->e.quiet = true;
    if (connect_all(&p->e) != 0) {
        cli_producer_close(p);
        return NULL;
    }
    return p;
}

int cli_producer_send(cli_producer_t *p, const char *text, char id_out[LR_UUID_LEN + 1]) {
    lr_task_msg_t m;
    char err[512];
    char *body = prepare(text, &m, err, sizeof(err));
    int rc;
    if (body == NULL) {
        cli_fail(p->e.c, LR_EXIT_USAGE, "invalid task: %s", err);
        return -1;
    }
    snprintf(id_out, LR_UUID_LEN + 1, "%s", m.id);
    rc = enqueue_one(&p->e, &m, body);
    free(body);
    lr_task_msg_free(&m);
    return rc;
}

PGconn *cli_producer_db(cli_producer_t *p) { return p->e.db; }

void cli_producer_close(cli_producer_t *p) {
    if (p == NULL) {
        return;
    }
    if (p->e.amqp != NULL) {
        lr_amqp_sync_close(p->e.amqp);
    }
    PQfinish(p->e.db);
    free(p);
}

/* What the options of `longrun enqueue` describe.  Owns task and budgets. */
typedef struct enq_args {
    cJSON *task;       /* the body being built from the task options */
    cJSON *budgets;    /* the budget flags; moved into task when any is set */
    const char *agent; /* --agent, or NULL: the bodies come from stdin */
} enq_args_t;

/* --input: JSON text, @FILE or - (stdin), parsed and added to task.  Returns
 * 0, or -1 after printing why. */
static int add_input(cli_t *c, cJSON *task, const char *arg) {
    char *text = cli_read_arg_or_file(c, "--input", arg, LR_TASK_MAX_BODY);
    cJSON *in;
    if (text == NULL) {
        return -1;
    }
    in = cJSON_Parse(text);
    free(text);
    if (in == NULL) {
        return cli_fail(c, -1, "--input: not valid JSON (a string input must be quoted: '\"text\"')");
    }
    cJSON_AddItemToObject(task, "input", in);
    return 0;
}

/* A budget flag, added to budgets (checked with the whole task by
 * lr_task_parse()).  Returns 0, or -1 after printing why. */
static int add_budget(cli_t *c, cJSON *budgets, int opt, const char *arg) {
    double v;
    const cli_budget_flag_t *f = cli_budget_option(c, opt, arg, &v);
    if (f == NULL) {
        return -1;
    }
    cJSON_AddNumberToObject(budgets, f->budget, v);
    return 0;
}

/* --metadata JSON, added to task.  Returns 0, or -1 after printing why. */
static int add_metadata(cli_t *c, cJSON *task, const char *arg) {
    cJSON *md = cJSON_Parse(arg);
    if (md == NULL) {
        return cli_fail(c, -1, "--metadata: not valid JSON");
    }
    cJSON_AddItemToObject(task, "metadata", md);
    return 0;
}

/* Parses the options into a (and --queue into e).  Returns 0 to go on, -1
 * after --help, or an exit code after printing why.
 * Long on purpose: one flat switch over the options. */
static int enqueue_options(enq_t *e, enq_args_t *a, int argc, char **argv) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"agent", required_argument, NULL, O_AGENT},
                                         {"input", required_argument, NULL, O_INPUT},
                                         {"id", required_argument, NULL, O_ID},
                                         {"queue", required_argument, NULL, O_QUEUE},
                                         CLI_BUDGET_OPTIONS,
                                         {"max-attempts", required_argument, NULL, O_MAX_ATTEMPTS},
                                         {"deadline", required_argument, NULL, O_DEADLINE},
                                         {"tenant", required_argument, NULL, O_TENANT},
                                         {"metadata", required_argument, NULL, O_METADATA},
                                         {"callback-url", required_argument, NULL, O_CALLBACK},
                                         {"wait-for-room", required_argument, NULL, O_WAIT_FOR_ROOM},
                                         {"wait", no_argument, NULL, O_WAIT},
                                         {"timeout", required_argument, NULL, O_TIMEOUT},
                                         {NULL, 0, NULL, 0}};
    cli_t *c = e->c;
    int opt;
    long v;
    while ((opt = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (opt) {
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        case 'h': enqueue_usage(stdout); return -1;
        case O_AGENT:
            a->agent = optarg;
            cJSON_AddStringToObject(a->task, "agent", optarg);
            break;
        case O_INPUT:
            if (add_input(c, a->task, optarg) != 0) {
                return LR_EXIT_USAGE;
            }
            break;
        case O_ID: cJSON_AddStringToObject(a->task, "id", optarg); break;
        case O_QUEUE:
            if (!lr_name_valid(optarg)) {
                return cli_fail(c, LR_EXIT_USAGE, "--queue: '%s' must match ^[a-z0-9][a-z0-9_.-]{0,63}$", optarg);
            }
            e->queue = optarg;
            break;
        case OPT_MAX_STEPS:
        case OPT_MAX_TOOL_CALLS:
        case OPT_MAX_TOKENS:
        case OPT_MAX_COST:
        case OPT_MAX_SECONDS:
            if (add_budget(c, a->budgets, opt, optarg) != 0) {
                return LR_EXIT_USAGE;
            }
            break;
        case O_MAX_ATTEMPTS:
            if (cli_parse_long(c, "--max-attempts", optarg, 1, 100, &v) != 0) {
                return LR_EXIT_USAGE;
            }
            cJSON_AddNumberToObject(a->task, "max_attempts", (double)v);
            break;
        case O_DEADLINE: cJSON_AddStringToObject(a->task, "deadline", optarg); break;
        case O_TENANT: cJSON_AddStringToObject(a->task, "tenant", optarg); break;
        case O_METADATA:
            if (add_metadata(c, a->task, optarg) != 0) {
                return LR_EXIT_USAGE;
            }
            break;
        case O_CALLBACK: cJSON_AddStringToObject(a->task, "callback_url", optarg); break;
        case O_WAIT_FOR_ROOM:
            if (cli_parse_long(c, "--wait-for-room", optarg, 0, 86400, &v) != 0) {
                return LR_EXIT_USAGE;
            }
            e->wait_room_ms = v * 1000;
            break;
        case O_WAIT: e->wait = true; break;
        case O_TIMEOUT:
            if (cli_parse_long(c, "--timeout", optarg, 1, 30L * 86400, &e->wait_timeout) != 0) {
                return LR_EXIT_USAGE;
            }
            break;
        default: enqueue_usage(stderr); return LR_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        return cli_fail(c, LR_EXIT_USAGE, "unexpected argument '%s'", argv[optind]);
    }
    if (e->wait_timeout > 0 && !e->wait) {
        return cli_fail(c, LR_EXIT_USAGE, "--timeout goes with --wait");
    }
    return 0;
}

/* Prints the --json array of what was enqueued, when there is one. */
static void print_results(const enq_t *e) {
    if (e->out != NULL) {
        cli_print_json(e->out);
    }
}

/* --agent: the one task the options describe.  Returns an exit code. */
static int enqueue_single(enq_t *e, enq_args_t *a) {
    lr_task_msg_t m;
    char err[512];
    char *text, *body;
    int rc;
    if (cJSON_GetObjectItem(a->task, "input") == NULL) {
        return cli_fail(e->c, LR_EXIT_USAGE, "--input is required with --agent");
    }
    if (a->budgets->child != NULL) {
        cJSON_AddItemToObject(a->task, "budgets", a->budgets);
        a->budgets = NULL;
    }
    text = cJSON_PrintUnformatted(a->task);
    body = text != NULL ? prepare(text, &m, err, sizeof(err)) : NULL;
    free(text);
    if (body == NULL) {
        return cli_fail(e->c, LR_EXIT_USAGE, "invalid task: %s (nothing was enqueued)", err);
    }
    if (connect_all(e) != 0) {
        rc = LR_EXIT_FAIL;
    } else {
        rc = enqueue_one(e, &m, body) == 0 ? LR_EXIT_OK : e->full > 0 ? EXIT_TEMPFAIL : LR_EXIT_FAIL;
        print_results(e);
    }
    free(body);
    lr_task_msg_free(&m);
    return rc;
}

/* One line of stdin (line lineno, its end of line not yet stripped):
 * validated, recorded and published.  Returns 1 when it is not a valid task
 * (reported), else 0. */
static int enqueue_line(enq_t *e, char *line, size_t lineno) {
    lr_task_msg_t m;
    char err[512];
    char msg[600];
    char *body;
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) {
        line[--n] = '\0';
    }
    if (n == 0) {
        return 0;
    }
    body = prepare(line, &m, err, sizeof(err));
    if (body == NULL) {
        snprintf(msg, sizeof(msg), "line %zu: invalid task: %s", lineno, err);
        report(e, NULL, "invalid", msg);
        return 1;
    }
    (void)enqueue_one(e, &m, body);
    free(body);
    lr_task_msg_free(&m);
    return 0;
}

/* Reads stdin to its end, a task body per line, into line (MAX_LINE + 1
 * bytes).  Returns the number of invalid lines (each reported). */
static int enqueue_lines(enq_t *e, char *line) {
    size_t lineno = 0;
    int invalid = 0;
    while (fgets(line, MAX_LINE + 1, stdin) != NULL) {
        size_t n = strlen(line);
        lineno++;
        if (n == MAX_LINE && line[n - 1] != '\n') {
            char err[512];
            int ch;
            while ((ch = getchar()) != EOF && ch != '\n') {
            }
            invalid++;
            snprintf(err, sizeof(err), "line %zu: over the limit of %d bytes", lineno, LR_TASK_MAX_BODY);
            report(e, NULL, "invalid", err);
            continue;
        }
        invalid += enqueue_line(e, line, lineno);
    }
    return invalid;
}

/* No --agent: one task body per line of stdin.  Returns an exit code: 2 when
 * every line was invalid, 3 when some line was invalid or failed. */
static int enqueue_stdin(enq_t *e, const enq_args_t *a) {
    char *line;
    int invalid, rc;
    if (a->budgets->child != NULL || cJSON_GetObjectItem(a->task, "input") != NULL || a->task->child != NULL) {
        return cli_fail(e->c, LR_EXIT_USAGE,
                        "task options need --agent; without --agent, task bodies are read from stdin");
    }
    if (isatty(STDIN_FILENO)) {
        return cli_fail(e->c, LR_EXIT_USAGE, "--agent is required (or pipe one JSON task per line to stdin)");
    }
    if (connect_all(e) != 0) {
        return LR_EXIT_FAIL;
    }
    line = malloc(MAX_LINE + 1);
    if (line == NULL) {
        return cli_fail(e->c, LR_EXIT_FAIL, "out of memory");
    }
    invalid = enqueue_lines(e, line);
    free(line);
    if (invalid > 0 && e->ok == 0 && e->exists == 0 && e->failed == 0) {
        rc = LR_EXIT_USAGE;
    } else if (invalid == 0 && e->full > 0 && e->full == e->failed) {
        rc = EXIT_TEMPFAIL; /* only full queues: every refused task can be sent again as it is */
    } else if (invalid > 0 || e->failed > 0) {
        rc = LR_EXIT_PARTIAL;
    } else {
        rc = LR_EXIT_OK;
    }
    if (e->out == NULL) {
        fprintf(stderr, "enqueued %d, already existing %d, failed %d (queue full %d), invalid %d\n", e->ok, e->exists,
                e->failed, e->full, invalid);
    }
    print_results(e);
    return rc;
}

int cmd_enqueue(cli_t *c, int argc, char **argv) {
    enq_t e;
    enq_args_t a;
    int rc;

    memset(&e, 0, sizeof(e));
    e.c = c;
    e.queue = "default";
    a.task = cJSON_CreateObject();
    a.budgets = cJSON_CreateObject();
    a.agent = NULL;
    rc = enqueue_options(&e, &a, argc, argv);
    if (rc == 0) {
        if (c->json) {
            e.out = cJSON_CreateArray();
        }
        rc = a.agent != NULL ? enqueue_single(&e, &a) : enqueue_stdin(&e, &a);
        if (rc == LR_EXIT_OK && e.wait && e.ids_lost) {
            rc = cli_fail(c, LR_EXIT_FAIL, "out of memory keeping the ids to wait for (the tasks were enqueued)");
        } else if (rc == LR_EXIT_OK && e.wait && e.nids > 0) {
            fflush(stdout);
            rc = cli_wait_tasks(c, e.db, e.ids, e.nids, e.wait_timeout);
        }
    } else if (rc < 0) {
        rc = LR_EXIT_OK;
    }
    for (int i = 0; i < e.nids; i++) {
        free(e.ids[i]);
    }
    free(e.ids);
    cJSON_Delete(e.out);
    cJSON_Delete(a.task);
    cJSON_Delete(a.budgets);
    if (e.amqp != NULL) {
        lr_amqp_sync_close(e.amqp);
    }
    PQfinish(e.db);
    return rc;
}
