/* main.c - longrun-worker: options, configuration, then lr_worker_run (the
 * shared part is lr_daemon_main, common/daemon.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <malloc.h>

#include "agents.h"
#include "daemon.h"
#include "task.h"
#include "worker.h"

#define MAX_QUEUES 32

typedef struct worker_main {
    const char *queues[MAX_QUEUES + 1]; /* --queue values (argv) or pieces of qcopy */
    int nq;
    char *qcopy; /* LONGRUN_QUEUES, cut at the commas */
} worker_main_t;

static int set_queue(lr_config_t *cfg, const char *value, void *arg) {
    worker_main_t *wm = arg;
    (void)cfg;
    if (!lr_name_valid(value)) {
        fprintf(stderr, "longrun-worker: --queue '%s': must match ^[a-z0-9][a-z0-9_.-]{0,63}$\n", value);
        return 2;
    }
    if (wm->nq == MAX_QUEUES) {
        fprintf(stderr, "longrun-worker: at most %d queues\n", MAX_QUEUES);
        return 2;
    }
    wm->queues[wm->nq++] = value;
    return 0;
}

/* The queues (from LONGRUN_QUEUES unless --queue was given) and the agents
 * file, for --check-config too. */
static int prepare(lr_config_t *cfg, char *note, size_t notelen, void *arg) {
    worker_main_t *wm = arg;
    char err[512];
    if (wm->nq == 0) {
        char *save = NULL;
        wm->qcopy = strdup(cfg->queues);
        if (wm->qcopy == NULL) {
            fprintf(stderr, "longrun-worker: out of memory\n");
            return 1;
        }
        for (char *t = strtok_r(wm->qcopy, ",", &save); t != NULL; t = strtok_r(NULL, ",", &save)) {
            if (!lr_name_valid(t) || wm->nq == MAX_QUEUES) {
                fprintf(stderr, "longrun-worker: LONGRUN_QUEUES=%s: '%s' is not a valid queue name\n", cfg->queues, t);
                return 2;
            }
            wm->queues[wm->nq++] = t;
        }
    }
    wm->queues[wm->nq] = NULL;
    if (wm->nq == 0) {
        fprintf(stderr, "longrun-worker: no queue to consume (LONGRUN_QUEUES is empty)\n");
        return 2;
    }
    if (cfg->agents_file[0] != '\0' && lr_agents_load(cfg->agents_file, err, sizeof(err)) != 0) {
        fprintf(stderr, "longrun-worker: invalid agents file %s: %s\n", cfg->agents_file, err);
        return 2;
    }
    snprintf(note, notelen, " (%d agents)", lr_agents_count());
    return 0;
}

static int run(const lr_config_t *cfg, void *arg) {
    worker_main_t *wm = arg;
    int rc;
    /* Buffers of 1 MiB and more (model answers, their texts, libpq's
     * copies) are mapped for themselves and unmapped when freed.  glibc's
     * default raises this threshold after each such free, after which
     * megabyte buffers come from the heap and stay in the process once
     * freed: the RSS then drifts far above what the memory budget counts. */
    (void)mallopt(M_MMAP_THRESHOLD, 1024 * 1024);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    rc = lr_worker_run(cfg, wm->queues);
    curl_global_cleanup();
    return rc;
}

static void cleanup(void *arg) {
    worker_main_t *wm = arg;
    lr_agents_free();
    free(wm->qcopy);
}

int main(int argc, char **argv) {
    static const lr_daemon_option_t own[] = {
        {"queue", 'q', "NAME", "task queue to consume (repeatable; default LONGRUN_QUEUES)", NULL, set_queue},
        {"max-in-flight", 0, "N", "tasks in flight (the prefetch; LONGRUN_MAX_IN_FLIGHT)", "LONGRUN_MAX_IN_FLIGHT",
         NULL},
        {NULL, 0, NULL, NULL, NULL, NULL},
    };
    static worker_main_t wm;
    static const lr_daemon_main_t m = {
        .prog = "longrun-worker",
        .synopsis = "[--queue NAME]... [options]",
        .about = "Consumes agent tasks from RabbitMQ and runs them, checkpointing every step to\n"
                 "PostgreSQL.  Configuration comes from the environment (docs/configuration.md);\n"
                 "options override it.\n",
        .epilog = "Signals: SIGTERM/SIGINT drain (stop consuming, checkpoint in-flight steps, hand the\n"
                  "rest back, exit 0 within LONGRUN_DRAIN_SECONDS); the same signal again or SIGQUIT\n"
                  "exits at once.\n",
        .options = own,
        .prepare = prepare,
        .run = run,
        .cleanup = cleanup,
        .arg = &wm,
    };
    return lr_daemon_main(&m, argc, argv);
}
