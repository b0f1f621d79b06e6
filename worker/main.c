/* main.c - longrun-worker: options, configuration, then lr_worker_run. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "config.h"
#include "log.h"
#include "task.h"
#include "agents.h"
#include "worker.h"

#define MAX_QUEUES 32

static void usage(FILE *f) {
    fprintf(f,
            "usage: longrun-worker [--queue NAME]... [options]\n"
            "\n"
            "Consumes agent tasks from RabbitMQ and runs them, checkpointing every step to\n"
            "PostgreSQL.  Configuration comes from the environment (docs/configuration.md);\n"
            "options override it.\n"
            "\n"
            "  -q, --queue NAME        task queue to consume (repeatable; default LONGRUN_QUEUES)\n"
            "      --max-in-flight N   tasks in flight (the prefetch; LONGRUN_MAX_IN_FLIGHT)\n"
            "      --database-url URL  PostgreSQL (LONGRUN_DATABASE_URL)\n"
            "      --amqp-url URL      RabbitMQ (LONGRUN_AMQP_URL)\n"
            "      --check-config      validate the configuration and exit (0 ok, 2 invalid)\n"
            "      --print-config      print the effective configuration (secrets masked) and exit\n"
            "  -h, --help              this help\n"
            "      --version           print the version\n"
            "\n"
            "Signals: SIGTERM/SIGINT drain (stop consuming, checkpoint in-flight steps, hand the\n"
            "rest back, exit 0 within LONGRUN_DRAIN_SECONDS); the same signal again or SIGQUIT\n"
            "exits at once.\n");
}

int main(int argc, char **argv) {
    enum { O_MAX_IN_FLIGHT = 1000, O_DB, O_AMQP, O_CHECK, O_PRINT, O_VERSION };
    static const struct option opts[] = {{"queue", required_argument, NULL, 'q'},
                                         {"max-in-flight", required_argument, NULL, O_MAX_IN_FLIGHT},
                                         {"database-url", required_argument, NULL, O_DB},
                                         {"amqp-url", required_argument, NULL, O_AMQP},
                                         {"check-config", no_argument, NULL, O_CHECK},
                                         {"print-config", no_argument, NULL, O_PRINT},
                                         {"help", no_argument, NULL, 'h'},
                                         {"version", no_argument, NULL, O_VERSION},
                                         {NULL, 0, NULL, 0}};
    lr_config_t cfg;
    char err[512];
    const char *queues[MAX_QUEUES + 1];
    char *qcopy = NULL;
    int nq = 0, opt, rc;
    bool check = false, print = false;

    if (lr_config_load(&cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "longrun-worker: invalid configuration: %s\n", err);
        return 2;
    }
    while ((opt = getopt_long(argc, argv, "q:h", opts, NULL)) != -1) {
        switch (opt) {
        case 'q':
            if (!lr_name_valid(optarg)) {
                fprintf(stderr, "longrun-worker: --queue '%s': must match ^[a-z0-9][a-z0-9_.-]{0,63}$\n", optarg);
                return 2;
            }
            if (nq == MAX_QUEUES) {
                fprintf(stderr, "longrun-worker: at most %d queues\n", MAX_QUEUES);
                return 2;
            }
            queues[nq++] = optarg;
            break;
        case O_MAX_IN_FLIGHT:
            if (lr_config_set(&cfg, "LONGRUN_MAX_IN_FLIGHT", optarg, err, sizeof(err)) != 0) {
                fprintf(stderr, "longrun-worker: --max-in-flight: %s\n", err);
                return 2;
            }
            break;
        case O_DB:
            if (lr_config_set(&cfg, "LONGRUN_DATABASE_URL", optarg, err, sizeof(err)) != 0) {
                fprintf(stderr, "longrun-worker: --database-url: %s\n", err);
                return 2;
            }
            break;
        case O_AMQP:
            if (lr_config_set(&cfg, "LONGRUN_AMQP_URL", optarg, err, sizeof(err)) != 0) {
                fprintf(stderr, "longrun-worker: --amqp-url: %s\n", err);
                return 2;
            }
            break;
        case O_CHECK: check = true; break;
        case O_PRINT: print = true; break;
        case O_VERSION: printf("longrun-worker %s\n", LONGRUN_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "longrun-worker: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (nq == 0) {
        char *save = NULL;
        qcopy = strdup(cfg.queues);
        for (char *t = strtok_r(qcopy, ",", &save); t != NULL; t = strtok_r(NULL, ",", &save)) {
            if (!lr_name_valid(t) || nq == MAX_QUEUES) {
                fprintf(stderr, "longrun-worker: LONGRUN_QUEUES=%s: '%s' is not a valid queue name\n",
                        cfg.queues, t);
                free(qcopy);
                return 2;
            }
            queues[nq++] = t;
        }
    }
    queues[nq] = NULL;
    if (nq == 0) {
        fprintf(stderr, "longrun-worker: no queue to consume (LONGRUN_QUEUES is empty)\n");
        free(qcopy);
        return 2;
    }
    if (cfg.agents_file[0] != '\0') {
        rc = lr_agents_load(cfg.agents_file, err, sizeof(err));
        if (rc != 0) {
            fprintf(stderr, "longrun-worker: invalid agents file %s: %s\n", cfg.agents_file, err);
            free(qcopy);
            return 2;
        }
    }
    if (print) {
        lr_config_print(&cfg, stdout);
    }
    if (check || print) {
        if (check) {
            printf("configuration ok (%d agents)\n", lr_agents_count());
        }
        lr_agents_free();
        free(qcopy);
        return 0;
    }
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    rc = lr_worker_run(&cfg, queues);
    curl_global_cleanup();
    lr_agents_free();
    free(qcopy);
    return rc;
}
