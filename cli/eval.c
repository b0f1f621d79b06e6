/*
 * eval.c - `longrun eval SUITE.json`: the release gate.
 *
 * Runs a suite of cases through a running fleet (for example the new slot of
 * a blue/green deploy, with --queue pointing at its queue), waits for every
 * task, and checks each final answer: texts it must contain and texts it must
 * not contain.  Reports pass/fail per case, the p95 task latency (created ->
 * finished) and the error rate (tasks that did not succeed), and exits 1 when
 * a case fails, a task does not finish in time, or a threshold given on the
 * command line is missed.  The suite format is documented in docs/deploy.md
 * and examples/eval-suite.json.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cli.h"
#include "task.h"

#define MAX_RUNS 10000

enum { E_TIMEOUT = OPT_FIRST_COMMAND_OPTION, E_QUEUE, E_MAX_P95, E_MAX_ERR };

typedef struct run {
    int case_idx;
    char id[LR_UUID_LEN + 1];
    char status[16];
    double latency_s;
    bool pass;
    char why[200];
} run_t;

static void eval_usage(FILE *f) {
    fprintf(f, "usage: longrun eval SUITE.json [--queue Q] [--timeout S] [--max-p95-seconds X]\n"
               "                   [--max-error-rate R] [--json]\n"
               "\n"
               "Runs every case of the suite through the fleet and checks the final answers.\n"
               "SUITE.json: {\"cases\": [{\"name\": \"...\", \"agent\": \"...\", \"input\": ...,\n"
               "             \"contains\": [\"...\"], \"not_contains\": [\"...\"], \"repeat\": N,\n"
               "             \"budgets\": {...}}]}\n"
               "  --queue Q              task queue to send to (default 'default')\n"
               "  --timeout S            seconds to wait for every task (default 300)\n"
               "  --max-p95-seconds X    fail when the p95 task latency is above X\n"
               "  --max-error-rate R     fail when the share of tasks not succeeded is above R (0..1)\n"
               "Exit 0: every case passed and the thresholds hold; 1: a case failed, a task did not\n"
               "finish, or a threshold was missed; 2: bad usage or suite.\n");
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Validates the suite; returns the number of runs or -1 (message printed). */
static int check_suite(cli_t *c, const cJSON *suite) {
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(suite, "cases");
    const cJSON *cs;
    int runs = 0, i = 0;
    if (!cJSON_IsArray(cases) || cJSON_GetArraySize(cases) == 0) {
        return cli_fail(c, -1, "suite: \"cases\" must be a non-empty array");
    }
    cJSON_ArrayForEach(cs, cases) {
        const cJSON *rep = cJSON_GetObjectItemCaseSensitive(cs, "repeat");
        const char *const lists[] = {"contains", "not_contains"};
        if (!cJSON_IsObject(cs) || !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(cs, "agent")) ||
            cJSON_GetObjectItemCaseSensitive(cs, "input") == NULL) {
            return cli_fail(c, -1, "suite: cases[%d] needs \"agent\" (string) and \"input\"", i);
        }
        for (int l = 0; l < 2; l++) {
            const cJSON *arr = cJSON_GetObjectItemCaseSensitive(cs, lists[l]), *x;
            if (arr == NULL) {
                continue;
            }
            if (!cJSON_IsArray(arr)) {
                return cli_fail(c, -1, "suite: cases[%d].%s must be an array of strings", i, lists[l]);
            }
            cJSON_ArrayForEach(x, arr) {
                if (!cJSON_IsString(x)) {
                    return cli_fail(c, -1, "suite: cases[%d].%s must be an array of strings", i, lists[l]);
                }
            }
        }
        if (rep != NULL && (!cJSON_IsNumber(rep) || rep->valuedouble < 1 || rep->valuedouble > 1000)) {
            return cli_fail(c, -1, "suite: cases[%d].repeat must be an integer in [1, 1000]", i);
        }
        runs += rep != NULL ? (int)rep->valuedouble : 1;
        i++;
    }
    if (runs > MAX_RUNS) {
        return cli_fail(c, -1, "suite: %d runs, over the limit of %d", runs, MAX_RUNS);
    }
    return runs;
}

static const char *case_name(const cJSON *cases, int idx, char *buf, size_t len) {
    const cJSON *cs = cJSON_GetArrayItem(cases, idx);
    const char *n = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cs, "name"));
    if (n != NULL) {
        return n;
    }
    snprintf(buf, len, "case %d", idx + 1);
    return buf;
}

/* What the command line asks of an eval. */
typedef struct eval_opts {
    const char *queue;
    long timeout;   /* seconds to wait for every task */
    double max_p95; /* --max-p95-seconds, or -1 */
    double max_err; /* --max-error-rate, or -1 */
} eval_opts_t;

/* One eval in progress.  Owns runs, lat, ids and the producer session; cases
 * is borrowed from the suite, which the caller keeps until the end. */
typedef struct eval {
    cli_t *c;
    eval_opts_t o;
    const cJSON *cases;
    run_t *runs; /* one per task; n of them enqueued so far */
    int n;
    double *lat; /* the latencies of the runs that succeeded; nlat of them */
    int nlat;
    cJSON *ids; /* the ids of the runs, as a JSON array for the status query */
    cli_producer_t *p;
    time_t start;
} eval_t;

/* The outcome over all runs. */
typedef struct eval_summary {
    int failed;      /* runs that did not pass */
    int not_ok;      /* runs whose task did not succeed */
    double p95;      /* p95 latency of the runs that succeeded, in seconds */
    double err_rate; /* not_ok / runs */
} eval_summary_t;

/* Parses the options and checks that one SUITE.json follows them.  Returns 0
 * to go on (argv[optind] is the suite), -1 after --help, or an exit code
 * after printing why. */
static int eval_options(cli_t *c, int argc, char **argv, eval_opts_t *o) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"queue", required_argument, NULL, E_QUEUE},
                                         {"timeout", required_argument, NULL, E_TIMEOUT},
                                         {"max-p95-seconds", required_argument, NULL, E_MAX_P95},
                                         {"max-error-rate", required_argument, NULL, E_MAX_ERR},
                                         {NULL, 0, NULL, 0}};
    int opt;
    o->queue = "default";
    o->timeout = 300;
    o->max_p95 = -1;
    o->max_err = -1;
    while ((opt = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        char *end = NULL;
        switch (opt) {
        case CLI_OPT_INVALID: return LR_EXIT_USAGE;
        case 'h': eval_usage(stdout); return -1;
        case E_QUEUE:
            if (!lr_name_valid(optarg)) {
                return cli_fail(c, LR_EXIT_USAGE, "--queue: '%s' is not a queue name", optarg);
            }
            o->queue = optarg;
            break;
        case E_TIMEOUT:
            if (cli_parse_long(c, "--timeout", optarg, 1, 86400, &o->timeout) != 0) {
                return LR_EXIT_USAGE;
            }
            break;
        case E_MAX_P95:
            o->max_p95 = strtod(optarg, &end);
            if (end == optarg || *end != '\0' || !(o->max_p95 > 0)) {
                return cli_fail(c, LR_EXIT_USAGE, "--max-p95-seconds: '%s' is not a positive number", optarg);
            }
            break;
        case E_MAX_ERR:
            o->max_err = strtod(optarg, &end);
            if (end == optarg || *end != '\0' || o->max_err < 0 || o->max_err > 1) {
                return cli_fail(c, LR_EXIT_USAGE, "--max-error-rate: '%s' is not a number in [0, 1]", optarg);
            }
            break;
        default: eval_usage(stderr); return LR_EXIT_USAGE;
        }
    }
    if (optind + 1 != argc) {
        return cli_fail(c, LR_EXIT_USAGE, "exactly one SUITE.json is expected");
    }
    return 0;
}

/* Reads, parses and validates the suite at path.  Returns it (the caller
 * owns it) with *nruns set, or NULL after printing why. */
static cJSON *load_suite(cli_t *c, const char *path, int *nruns) {
    char arg[4096];
    char *text;
    cJSON *suite;
    snprintf(arg, sizeof(arg), "@%s", path);
    text = cli_read_arg_or_file(c, "SUITE", arg, 4 * 1024 * 1024);
    if (text == NULL) {
        return NULL;
    }
    suite = cJSON_Parse(text);
    free(text);
    if (suite == NULL) {
        cli_fail(c, LR_EXIT_USAGE, "%s: not valid JSON", path);
        return NULL;
    }
    *nruns = check_suite(c, suite);
    if (*nruns < 0) {
        cJSON_Delete(suite);
        return NULL;
    }
    return suite;
}

/* The task body of one run of case cs, as malloc'd JSON text (NULL when out
 * of memory). */
static char *run_body(const cJSON *cs) {
    cJSON *body = cJSON_CreateObject();
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(cs, "budgets");
    char *text;
    cJSON_AddStringToObject(body, "agent", cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cs, "agent")));
    cJSON_AddItemToObject(body, "input", cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(cs, "input"), true));
    if (b != NULL) {
        cJSON_AddItemToObject(body, "budgets", cJSON_Duplicate(b, true));
    }
    cJSON_AddItemToObject(body, "metadata", cJSON_Parse("{\"eval\":true}"));
    text = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);
    return text;
}

/* Enqueues every run of every case, in order.  Returns 0, or -1 when a task
 * could not be sent (message printed). */
static int enqueue_runs(eval_t *ev) {
    const cJSON *cs;
    int ci = 0;
    cJSON_ArrayForEach(cs, ev->cases) {
        const cJSON *rep = cJSON_GetObjectItemCaseSensitive(cs, "repeat");
        int reps = rep != NULL ? (int)rep->valuedouble : 1;
        for (int r = 0; r < reps; r++) {
            char *btxt = run_body(cs);
            ev->runs[ev->n].case_idx = ci;
            if (btxt == NULL || cli_producer_send(ev->p, btxt, ev->runs[ev->n].id) != 0) {
                free(btxt);
                return -1;
            }
            free(btxt);
            cJSON_AddItemToArray(ev->ids, cJSON_CreateString(ev->runs[ev->n].id));
            ev->n++;
        }
        ci++;
    }
    return 0;
}

/* The runs' tasks now: id, status, answer, latency (seconds, created ->
 * finished or now).  NULL after printing the database error. */
static PGresult *query_runs(eval_t *ev) {
    char *idtxt = cJSON_PrintUnformatted(ev->ids);
    const char *params[1] = {idtxt};
    PGresult *r = cli_exec(ev->c, cli_producer_db(ev->p),
                           "SELECT id::text, status, coalesce(result->>'answer', ''),"
                           " extract(epoch FROM coalesce(finished_at, now()) - created_at)"
                           " FROM tasks WHERE id::text IN (SELECT x FROM jsonb_array_elements_text($1::jsonb) x)",
                           1, params);
    free(idtxt);
    return r;
}

/* Grades run rn from row i of query_runs(): its status and latency, then
 * whether the answer holds every "contains" text and no "not_contains" one. */
static void grade_run(eval_t *ev, run_t *rn, PGresult *r, int i) {
    const cJSON *cse = cJSON_GetArrayItem(ev->cases, rn->case_idx);
    const cJSON *x;
    const char *answer = PQgetvalue(r, i, 2);
    snprintf(rn->status, sizeof(rn->status), "%s", PQgetvalue(r, i, 1));
    rn->latency_s = atof(PQgetvalue(r, i, 3));
    rn->pass = strcmp(rn->status, "succeeded") == 0;
    if (!rn->pass) {
        snprintf(rn->why, sizeof(rn->why), "status %s", rn->status);
        return;
    }
    ev->lat[ev->nlat++] = rn->latency_s;
    cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(cse, "contains")) {
        if (rn->pass && strstr(answer, x->valuestring) == NULL) {
            rn->pass = false;
            snprintf(rn->why, sizeof(rn->why), "answer lacks \"%.80s\"", x->valuestring);
        }
    }
    cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(cse, "not_contains")) {
        if (rn->pass && strstr(answer, x->valuestring) != NULL) {
            rn->pass = false;
            snprintf(rn->why, sizeof(rn->why), "answer contains \"%.80s\"", x->valuestring);
        }
    }
}

/* Waits until every run's task is final or the timeout has passed, then
 * grades the runs from that last look.  Returns 0, or -1 on a database error
 * (message printed). */
static int wait_runs(eval_t *ev) {
    for (;;) {
        PGresult *r = query_runs(ev);
        int done = 0;
        if (r == NULL) {
            return -1;
        }
        for (int i = 0; i < PQntuples(r); i++) {
            if (cli_status_final(PQgetvalue(r, i, 1))) {
                done++;
            }
        }
        if (done == ev->n || time(NULL) - ev->start > ev->o.timeout) {
            for (int i = 0; i < PQntuples(r); i++) {
                for (int k = 0; k < ev->n; k++) {
                    if (strcmp(ev->runs[k].id, PQgetvalue(r, i, 0)) == 0) {
                        grade_run(ev, &ev->runs[k], r, i);
                        break;
                    }
                }
            }
            PQclear(r);
            return 0;
        }
        PQclear(r);
        usleep(500000);
    }
}

/* Says why of the runs that never finished, and sums up all runs. */
static void summarize(eval_t *ev, eval_summary_t *s) {
    memset(s, 0, sizeof(*s));
    for (int k = 0; k < ev->n; k++) {
        run_t *rn = &ev->runs[k];
        if (rn->status[0] == '\0') {
            snprintf(rn->why, sizeof(rn->why), "not finished within %ld s", ev->o.timeout);
        }
        if (!rn->pass) {
            s->failed++;
        }
        if (strcmp(rn->status, "succeeded") != 0) {
            s->not_ok++;
        }
    }
    qsort(ev->lat, (size_t)ev->nlat, sizeof(double), cmp_double);
    s->p95 = ev->nlat > 0 ? ev->lat[(int)ceil(0.95 * ev->nlat) - 1] : 0;
    s->err_rate = ev->n > 0 ? (double)s->not_ok / ev->n : 0;
}

/* --json: every run, then the totals, as one object. */
static void print_report_json(const eval_t *ev, const eval_summary_t *s) {
    cJSON *o = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(o, "runs");
    char *text;
    for (int k = 0; k < ev->n; k++) {
        const run_t *rn = &ev->runs[k];
        char nb[32];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddStringToObject(x, "case", case_name(ev->cases, rn->case_idx, nb, sizeof(nb)));
        cJSON_AddStringToObject(x, "id", rn->id);
        cJSON_AddStringToObject(x, "status", rn->status[0] ? rn->status : "unfinished");
        cJSON_AddBoolToObject(x, "pass", rn->pass);
        if (!rn->pass) {
            cJSON_AddStringToObject(x, "why", rn->why);
        }
        cJSON_AddNumberToObject(x, "latency_seconds", rn->latency_s);
        cJSON_AddItemToArray(arr, x);
    }
    cJSON_AddNumberToObject(o, "runs_total", ev->n);
    cJSON_AddNumberToObject(o, "failed", s->failed);
    cJSON_AddNumberToObject(o, "p95_seconds", s->p95);
    cJSON_AddNumberToObject(o, "error_rate", s->err_rate);
    text = cJSON_PrintUnformatted(o);
    printf("%s\n", text != NULL ? text : "{}");
    free(text);
    cJSON_Delete(o);
}

/* One line per run, then the totals. */
static void print_report_text(const eval_t *ev, const eval_summary_t *s) {
    for (int k = 0; k < ev->n; k++) {
        const run_t *rn = &ev->runs[k];
        char nb[32];
        printf("%-4s %-28.28s %-36s %-10s %7.2f s  %s\n", rn->pass ? "PASS" : "FAIL",
               case_name(ev->cases, rn->case_idx, nb, sizeof(nb)), rn->id, rn->status[0] ? rn->status : "unfinished",
               rn->latency_s, rn->why);
    }
    printf("%d/%d passed; p95 latency %.2f s; error rate %.1f%%\n", ev->n - s->failed, ev->n, s->p95,
           s->err_rate * 100.0);
}

/* The exit code: 1 when a run failed or a threshold is missed (each missed
 * threshold said on stderr), else 0. */
static int verdict(const eval_t *ev, const eval_summary_t *s) {
    int rc = s->failed > 0 ? LR_EXIT_FAIL : LR_EXIT_OK;
    if (ev->o.max_p95 > 0 && s->p95 > ev->o.max_p95) {
        fprintf(stderr, "eval: p95 latency %.2f s is above --max-p95-seconds %.2f\n", s->p95, ev->o.max_p95);
        rc = LR_EXIT_FAIL;
    }
    if (ev->o.max_err >= 0 && s->err_rate > ev->o.max_err) {
        fprintf(stderr, "eval: error rate %.3f is above --max-error-rate %.3f\n", s->err_rate, ev->o.max_err);
        rc = LR_EXIT_FAIL;
    }
    return rc;
}

int cmd_eval(cli_t *c, int argc, char **argv) {
    eval_t ev;
    eval_summary_t sum;
    cJSON *suite = NULL;
    int nruns = 0;
    int rc;

    memset(&ev, 0, sizeof(ev));
    ev.c = c;
    rc = eval_options(c, argc, argv, &ev.o);
    if (rc != 0) {
        return rc < 0 ? LR_EXIT_OK : rc;
    }
    rc = LR_EXIT_USAGE;
    suite = load_suite(c, argv[optind], &nruns);
    if (suite == NULL) {
        goto out;
    }
    ev.cases = cJSON_GetObjectItemCaseSensitive(suite, "cases");
    ev.runs = calloc((size_t)nruns, sizeof(run_t));
    ev.lat = calloc((size_t)nruns, sizeof(double));
    ev.ids = cJSON_CreateArray();
    if (ev.runs == NULL || ev.lat == NULL || ev.ids == NULL) {
        rc = cli_fail(c, LR_EXIT_FAIL, "out of memory");
        goto out;
    }
    ev.p = cli_producer_open(c, ev.o.queue);
    if (ev.p == NULL) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    ev.start = time(NULL);
    if (enqueue_runs(&ev) != 0) {
        rc = LR_EXIT_USAGE;
        goto out;
    }
    if (!c->json) {
        fprintf(stderr, "eval: %d task(s) enqueued on queue %s; waiting (up to %ld s)\n", ev.n, ev.o.queue,
                ev.o.timeout);
    }
    if (wait_runs(&ev) != 0) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    summarize(&ev, &sum);
    if (c->json) {
        print_report_json(&ev, &sum);
    } else {
        print_report_text(&ev, &sum);
    }
    rc = verdict(&ev, &sum);
out:
    cli_producer_close(ev.p);
    cJSON_Delete(suite);
    cJSON_Delete(ev.ids);
    free(ev.runs);
    free(ev.lat);
    return rc;
}
