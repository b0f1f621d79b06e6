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
    fprintf(f,
            "usage: longrun eval SUITE.json [--queue Q] [--timeout S] [--max-p95-seconds X]\n"
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

int cmd_eval(cli_t *c, int argc, char **argv) {
    static const struct option opts[] = {CLI_COMMON_OPTIONS,
                                         {"queue", required_argument, NULL, E_QUEUE},
                                         {"timeout", required_argument, NULL, E_TIMEOUT},
                                         {"max-p95-seconds", required_argument, NULL, E_MAX_P95},
                                         {"max-error-rate", required_argument, NULL, E_MAX_ERR},
                                         {NULL, 0, NULL, 0}};
    const char *queue = "default";
    long timeout = 300;
    double max_p95 = -1, max_err = -1;
    int opt, rc = LR_EXIT_USAGE, nruns, n = 0, failed = 0, not_ok = 0;
    char *text = NULL;
    cJSON *suite = NULL, *ids = NULL;
    const cJSON *cases, *cs;
    run_t *runs = NULL;
    cli_producer_t *p = NULL;
    double *lat = NULL, p95 = 0, err_rate;
    int nlat = 0;
    time_t start;

    while ((opt = cli_next_option(c, argc, argv, "h", opts)) != -1) {
        char *end = NULL;
        switch (opt) {
        case CLI_OPT_INVALID: goto out;
        case 'h': eval_usage(stdout); rc = LR_EXIT_OK; goto out;
        case E_QUEUE:
            if (!lr_name_valid(optarg)) {
                rc = cli_fail(c, LR_EXIT_USAGE, "--queue: '%s' is not a queue name", optarg);
                goto out;
            }
            queue = optarg;
            break;
        case E_TIMEOUT:
            if (cli_parse_long(c, "--timeout", optarg, 1, 86400, &timeout) != 0) {
                goto out;
            }
            break;
        case E_MAX_P95:
            max_p95 = strtod(optarg, &end);
            if (end == optarg || *end != '\0' || !(max_p95 > 0)) {
                rc = cli_fail(c, LR_EXIT_USAGE, "--max-p95-seconds: '%s' is not a positive number", optarg);
                goto out;
            }
            break;
        case E_MAX_ERR:
            max_err = strtod(optarg, &end);
            if (end == optarg || *end != '\0' || max_err < 0 || max_err > 1) {
                rc = cli_fail(c, LR_EXIT_USAGE, "--max-error-rate: '%s' is not a number in [0, 1]", optarg);
                goto out;
            }
            break;
        default: eval_usage(stderr); goto out;
        }
    }
    if (optind + 1 != argc) {
        rc = cli_fail(c, LR_EXIT_USAGE, "exactly one SUITE.json is expected");
        goto out;
    }
    {
        char arg[4096];
        snprintf(arg, sizeof(arg), "@%s", argv[optind]);
        text = cli_read_arg_or_file(c, "SUITE", arg, 4 * 1024 * 1024);
    }
    if (text == NULL) {
        goto out;
    }
    suite = cJSON_Parse(text);
    if (suite == NULL) {
        rc = cli_fail(c, LR_EXIT_USAGE, "%s: not valid JSON", argv[optind]);
        goto out;
    }
    nruns = check_suite(c, suite);
    if (nruns < 0) {
        goto out;
    }
    cases = cJSON_GetObjectItemCaseSensitive(suite, "cases");
    runs = calloc((size_t)nruns, sizeof(run_t));
    lat = calloc((size_t)nruns, sizeof(double));
    ids = cJSON_CreateArray();
    if (runs == NULL || lat == NULL || ids == NULL) {
        rc = cli_fail(c, LR_EXIT_FAIL, "out of memory");
        goto out;
    }
    p = cli_producer_open(c, queue);
    if (p == NULL) {
        rc = LR_EXIT_FAIL;
        goto out;
    }
    start = time(NULL);
    {
        int ci = 0;
        cJSON_ArrayForEach(cs, cases) {
            const cJSON *rep = cJSON_GetObjectItemCaseSensitive(cs, "repeat");
            int reps = rep != NULL ? (int)rep->valuedouble : 1;
            for (int r = 0; r < reps; r++) {
                cJSON *body = cJSON_CreateObject();
                char *btxt;
                const cJSON *b = cJSON_GetObjectItemCaseSensitive(cs, "budgets");
                cJSON_AddStringToObject(body, "agent", cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cs, "agent")));
                cJSON_AddItemToObject(body, "input", cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(cs, "input"), true));
                if (b != NULL) {
                    cJSON_AddItemToObject(body, "budgets", cJSON_Duplicate(b, true));
                }
                cJSON_AddItemToObject(body, "metadata", cJSON_Parse("{\"eval\":true}"));
                btxt = cJSON_PrintUnformatted(body);
                cJSON_Delete(body);
                runs[n].case_idx = ci;
                if (btxt == NULL || cli_producer_send(p, btxt, runs[n].id) != 0) {
                    free(btxt);
                    rc = LR_EXIT_USAGE;
                    goto out;
                }
                free(btxt);
                cJSON_AddItemToArray(ids, cJSON_CreateString(runs[n].id));
                n++;
            }
            ci++;
        }
    }
    if (!c->json) {
        fprintf(stderr, "eval: %d task(s) enqueued on queue %s; waiting (up to %ld s)\n", n, queue, timeout);
    }
    /* Wait for every task to be terminal. */
    for (;;) {
        char *idtxt = cJSON_PrintUnformatted(ids);
        const char *params[1] = {idtxt};
        PGresult *r = cli_exec(c, cli_producer_db(p),
                               "SELECT id::text, status, coalesce(result->>'answer', ''),"
                               " extract(epoch FROM coalesce(finished_at, now()) - created_at)"
                               " FROM tasks WHERE id::text IN (SELECT x FROM jsonb_array_elements_text($1::jsonb) x)",
                               1, params);
        int done = 0;
        free(idtxt);
        if (r == NULL) {
            rc = LR_EXIT_FAIL;
            goto out;
        }
        for (int i = 0; i < PQntuples(r); i++) {
            const char *st = PQgetvalue(r, i, 1);
            if (strcmp(st, "succeeded") == 0 || strcmp(st, "failed") == 0 || strcmp(st, "dead") == 0 ||
                strcmp(st, "cancelled") == 0) {
                done++;
            }
        }
        if (done == n || time(NULL) - start > timeout) {
            for (int i = 0; i < PQntuples(r); i++) {
                for (int k = 0; k < n; k++) {
                    run_t *rn = &runs[k];
                    const cJSON *x, *cse;
                    const char *answer;
                    if (strcmp(rn->id, PQgetvalue(r, i, 0)) != 0) {
                        continue;
                    }
                    cse = cJSON_GetArrayItem(cases, rn->case_idx);
                    snprintf(rn->status, sizeof(rn->status), "%s", PQgetvalue(r, i, 1));
                    answer = PQgetvalue(r, i, 2);
                    rn->latency_s = atof(PQgetvalue(r, i, 3));
                    rn->pass = strcmp(rn->status, "succeeded") == 0;
                    if (!rn->pass) {
                        snprintf(rn->why, sizeof(rn->why), "status %s", rn->status);
                        break;
                    }
                    lat[nlat++] = rn->latency_s;
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
                    break;
                }
            }
            PQclear(r);
            break;
        }
        PQclear(r);
        usleep(500000);
    }
    for (int k = 0; k < n; k++) {
        if (runs[k].status[0] == '\0') {
            snprintf(runs[k].why, sizeof(runs[k].why), "not finished within %ld s", timeout);
        }
        if (!runs[k].pass) {
            failed++;
        }
        if (strcmp(runs[k].status, "succeeded") != 0) {
            not_ok++;
        }
    }
    qsort(lat, (size_t)nlat, sizeof(double), cmp_double);
    p95 = nlat > 0 ? lat[(int)ceil(0.95 * nlat) - 1] : 0;
    err_rate = n > 0 ? (double)not_ok / n : 0;
    if (c->json) {
        cJSON *o = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(o, "runs");
        for (int k = 0; k < n; k++) {
            char nb[32];
            cJSON *x = cJSON_CreateObject();
            cJSON_AddStringToObject(x, "case", case_name(cases, runs[k].case_idx, nb, sizeof(nb)));
            cJSON_AddStringToObject(x, "id", runs[k].id);
            cJSON_AddStringToObject(x, "status", runs[k].status[0] ? runs[k].status : "unfinished");
            cJSON_AddBoolToObject(x, "pass", runs[k].pass);
            if (!runs[k].pass) {
                cJSON_AddStringToObject(x, "why", runs[k].why);
            }
            cJSON_AddNumberToObject(x, "latency_seconds", runs[k].latency_s);
            cJSON_AddItemToArray(arr, x);
        }
        cJSON_AddNumberToObject(o, "runs_total", n);
        cJSON_AddNumberToObject(o, "failed", failed);
        cJSON_AddNumberToObject(o, "p95_seconds", p95);
        cJSON_AddNumberToObject(o, "error_rate", err_rate);
        {
            char *s = cJSON_PrintUnformatted(o);
            printf("%s\n", s != NULL ? s : "{}");
            free(s);
        }
        cJSON_Delete(o);
    } else {
        for (int k = 0; k < n; k++) {
            char nb[32];
            printf("%-4s %-28.28s %-36s %-10s %7.2f s  %s\n", runs[k].pass ? "PASS" : "FAIL",
                   case_name(cases, runs[k].case_idx, nb, sizeof(nb)), runs[k].id,
                   runs[k].status[0] ? runs[k].status : "unfinished", runs[k].latency_s, runs[k].why);
        }
        printf("%d/%d passed; p95 latency %.2f s; error rate %.1f%%\n", n - failed, n, p95, err_rate * 100.0);
    }
    rc = LR_EXIT_OK;
    if (failed > 0) {
        rc = LR_EXIT_FAIL;
    }
    if (max_p95 > 0 && p95 > max_p95) {
        fprintf(stderr, "eval: p95 latency %.2f s is above --max-p95-seconds %.2f\n", p95, max_p95);
        rc = LR_EXIT_FAIL;
    }
    if (max_err >= 0 && err_rate > max_err) {
        fprintf(stderr, "eval: error rate %.3f is above --max-error-rate %.3f\n", err_rate, max_err);
        rc = LR_EXIT_FAIL;
    }
out:
    cli_producer_close(p);
    cJSON_Delete(suite);
    cJSON_Delete(ids);
    free(text);
    free(runs);
    free(lat);
    return rc;
}
