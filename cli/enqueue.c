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
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "amqp.h"
#include "cli.h"
#include "task.h"

#define MAX_LINE (LR_TASK_MAX_BODY + 2)

static void enqueue_usage(FILE *f) {
    fprintf(f,
            "usage: longrun enqueue --agent NAME --input JSON|@FILE [options]\n"
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
            "  --callback-url URL     receives the outcome as a POST when the task ends\n");
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
    O_CALLBACK
};

typedef struct enq {
    cli_t *c;
    PGconn *db;
    lr_amqp_sync_t *amqp;
    const char *queue;
    int ok, exists, failed;
    cJSON *out; /* --json array */
    bool quiet; /* producer sessions of other commands print nothing but errors */
} enq_t;

static void report(enq_t *e, const char *id, const char *state, const char *error) {
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

/* Records and publishes one validated task.  body: the message body to send
 * (with the id filled in).  Returns 0 ok/exists, -1 failed. */
static int enqueue_one(enq_t *e, const lr_task_msg_t *m, const char *body) {
    char *input = cJSON_PrintUnformatted(m->input);
    char *budgets = lr_budgets_to_json(&m->budgets);
    char *metadata = m->metadata != NULL ? cJSON_PrintUnformatted(m->metadata) : NULL;
    char attempts[16];
    char err[512];
    const char *params[11];
    PGresult *res = NULL;
    int rc = -1;
    lr_amqp_msg_t msg;

    snprintf(attempts, sizeof(attempts), "%d",
             m->max_attempts > 0 ? m->max_attempts : e->c->cfg.max_attempts);
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
    PQclear(res);
    res = NULL;

    memset(&msg, 0, sizeof(msg));
    msg.body = body;
    msg.body_len = strlen(body);
    msg.message_id = m->id;
    msg.content_type = "application/json";
    msg.persistent = true;
    msg.mandatory = true;
    if (lr_amqp_sync_publish(e->amqp, LR_AMQP_EXCHANGE, e->queue, &msg, 10000, err, sizeof(err)) != 0) {
        char why[768];
        e->failed++;
        snprintf(why, sizeof(why),
                 "recorded, but publishing failed (%s); the scheduler's outbox sweep will dispatch it "
                 "after LONGRUN_OUTBOX_GRACE_SECONDS",
                 err);
        report(e, m->id, "unpublished", why);
        goto out;
    }
    res = cli_exec(e->c, e->db,
                   "UPDATE tasks SET published_at = now() WHERE id = $1 AND published_at IS NULL",
                   1, params);
    e->ok++;
    report(e, m->id, "queued", NULL);
    rc = 0;
out:
    PQclear(res);
    free(input);
    free(budgets);
    free(metadata);
    return rc;
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
    if (lr_amqp_sync_declare(e->amqp, queues, e->c->cfg.delivery_limit, err, sizeof(err)) != 0) {
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

int cmd_enqueue(cli_t *c, int argc, char **argv) {
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
                                         {NULL, 0, NULL, 0}};
    enq_t e;
    cJSON *task = NULL;
    cJSON *budgets = NULL;
    char *input_text = NULL;
    char *line = NULL;
    int opt, rc = LR_EXIT_USAGE;
    const char *agent = NULL;

    memset(&e, 0, sizeof(e));
    e.c = c;
    e.queue = "default";
    task = cJSON_CreateObject();
    budgets = cJSON_CreateObject();
    while ((opt = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        switch (opt) {
        case CLI_OPT_INVALID: goto out;
        case 'h':
            enqueue_usage(stdout);
            rc = LR_EXIT_OK;
            goto out;
        case O_AGENT:
            agent = optarg;
            cJSON_AddStringToObject(task, "agent", optarg);
            break;
        case O_INPUT: {
            cJSON *in;
            input_text = cli_read_arg_or_file(c, "--input", optarg, LR_TASK_MAX_BODY);
            if (input_text == NULL) {
                goto out;
            }
            in = cJSON_Parse(input_text);
            if (in == NULL) {
                rc = cli_fail(c, LR_EXIT_USAGE, "--input: not valid JSON (a string input must be quoted: '\"text\"')");
                goto out;
            }
            cJSON_AddItemToObject(task, "input", in);
            break;
        }
        case O_ID:
            cJSON_AddStringToObject(task, "id", optarg);
            break;
        case O_QUEUE:
            if (!lr_name_valid(optarg)) {
                rc = cli_fail(c, LR_EXIT_USAGE, "--queue: '%s' must match ^[a-z0-9][a-z0-9_.-]{0,63}$", optarg);
                goto out;
            }
            e.queue = optarg;
            break;
        case OPT_MAX_STEPS:
        case OPT_MAX_TOOL_CALLS:
        case OPT_MAX_TOKENS:
        case OPT_MAX_COST:
        case OPT_MAX_SECONDS: {
            /* checked with the whole task by lr_task_parse() */
            double v;
            const cli_budget_flag_t *f = cli_budget_option(c, opt, optarg, &v);
            if (f == NULL) {
                goto out;
            }
            cJSON_AddNumberToObject(budgets, f->budget, v);
            break;
        }
        case O_MAX_ATTEMPTS: {
            long v;
            if (cli_parse_long(c, "--max-attempts", optarg, 1, 100, &v) != 0) {
                goto out;
            }
            cJSON_AddNumberToObject(task, "max_attempts", (double)v);
            break;
        }
        case O_DEADLINE:
            cJSON_AddStringToObject(task, "deadline", optarg);
            break;
        case O_TENANT:
            cJSON_AddStringToObject(task, "tenant", optarg);
            break;
        case O_METADATA: {
            cJSON *md = cJSON_Parse(optarg);
            if (md == NULL) {
                rc = cli_fail(c, LR_EXIT_USAGE, "--metadata: not valid JSON");
                goto out;
            }
            cJSON_AddItemToObject(task, "metadata", md);
            break;
        }
        case O_CALLBACK:
            cJSON_AddStringToObject(task, "callback_url", optarg);
            break;
        default:
            enqueue_usage(stderr);
            goto out;
        }
    }
    if (optind < argc) {
        rc = cli_fail(c, LR_EXIT_USAGE, "unexpected argument '%s'", argv[optind]);
        goto out;
    }
    if (c->json) {
        e.out = cJSON_CreateArray();
    }
    if (agent != NULL) {
        lr_task_msg_t m;
        char err[512];
        char *text, *body;
        if (cJSON_GetObjectItem(task, "input") == NULL) {
            rc = cli_fail(c, LR_EXIT_USAGE, "--input is required with --agent");
            goto out;
        }
        if (budgets->child != NULL) {
            cJSON_AddItemToObject(task, "budgets", budgets);
            budgets = NULL;
        }
        text = cJSON_PrintUnformatted(task);
        body = text != NULL ? prepare(text, &m, err, sizeof(err)) : NULL;
        free(text);
        if (body == NULL) {
            rc = cli_fail(c, LR_EXIT_USAGE, "invalid task: %s (nothing was enqueued)", err);
            goto out;
        }
        if (connect_all(&e) != 0) {
            rc = LR_EXIT_FAIL;
            free(body);
            lr_task_msg_free(&m);
            goto out;
        }
        rc = enqueue_one(&e, &m, body) == 0 ? LR_EXIT_OK : LR_EXIT_FAIL;
        free(body);
        lr_task_msg_free(&m);
    } else {
        size_t lineno = 0;
        int invalid = 0;
        if (budgets->child != NULL || cJSON_GetObjectItem(task, "input") != NULL || task->child != NULL) {
            rc = cli_fail(c, LR_EXIT_USAGE,
                          "task options need --agent; without --agent, task bodies are read from stdin");
            goto out;
        }
        if (isatty(STDIN_FILENO)) {
            rc = cli_fail(c, LR_EXIT_USAGE, "--agent is required (or pipe one JSON task per line to stdin)");
            goto out;
        }
        if (connect_all(&e) != 0) {
            rc = LR_EXIT_FAIL;
            goto out;
        }
        line = malloc(MAX_LINE + 1);
        if (line == NULL) {
            rc = cli_fail(c, LR_EXIT_FAIL, "out of memory");
            goto out;
        }
        while (fgets(line, MAX_LINE + 1, stdin) != NULL) {
            lr_task_msg_t m;
            char err[512];
            char *body;
            size_t n = strlen(line);
            lineno++;
            if (n == MAX_LINE && line[n - 1] != '\n') {
                int ch;
                while ((ch = getchar()) != EOF && ch != '\n') {
                }
                invalid++;
                snprintf(err, sizeof(err), "line %zu: over the limit of %d bytes", lineno, LR_TASK_MAX_BODY);
                report(&e, NULL, "invalid", err);
                continue;
            }
            while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) {
                line[--n] = '\0';
            }
            if (n == 0) {
                continue;
            }
            body = prepare(line, &m, err, sizeof(err));
            if (body == NULL) {
                char msg[600];
                invalid++;
                snprintf(msg, sizeof(msg), "line %zu: invalid task: %s", lineno, err);
                report(&e, NULL, "invalid", msg);
                continue;
            }
            (void)enqueue_one(&e, &m, body);
            free(body);
            lr_task_msg_free(&m);
        }
        if (invalid > 0 && e.ok == 0 && e.exists == 0 && e.failed == 0) {
            rc = LR_EXIT_USAGE;
        } else if (invalid > 0 || e.failed > 0) {
            rc = LR_EXIT_PARTIAL;
        } else {
            rc = LR_EXIT_OK;
        }
        if (e.out == NULL) {
            fprintf(stderr, "enqueued %d, already existing %d, failed %d, invalid %d\n", e.ok, e.exists,
                    e.failed, invalid);
        }
    }
    if (e.out != NULL) {
        char *s = cJSON_PrintUnformatted(e.out);
        printf("%s\n", s);
        free(s);
    }
out:
    cJSON_Delete(e.out);
    cJSON_Delete(task);
    cJSON_Delete(budgets);
    free(input_text);
    free(line);
    if (e.amqp != NULL) {
        lr_amqp_sync_close(e.amqp);
    }
    PQfinish(e.db);
    return rc;
}
