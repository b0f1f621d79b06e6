/* main.c - longrun-scheduler: options, configuration, then lr_scheduler_run. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "scheduler.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: longrun-scheduler [options]\n"
            "\n"
            "Resumes suspended and retry_wait tasks when due, republishes tasks whose worker\n"
            "died (expired lease) or whose dispatch was never confirmed (outbox), dead-letters\n"
            "tasks past their deadline, records the longrun.dead queue in PostgreSQL and deletes\n"
            "finished tasks past retention.  Run two or more: one leads (PostgreSQL advisory\n"
            "lock), the others stand by and take over within seconds.\n"
            "\n"
            "      --database-url URL  PostgreSQL (LONGRUN_DATABASE_URL)\n"
            "      --amqp-url URL      RabbitMQ (LONGRUN_AMQP_URL)\n"
            "      --check-config      validate the configuration and exit (0 ok, 2 invalid)\n"
            "      --print-config      print the effective configuration (secrets masked)\n"
            "  -h, --help              this help\n"
            "      --version           print the version\n");
}

int main(int argc, char **argv) {
    enum { O_DB = 1000, O_AMQP, O_CHECK, O_PRINT, O_VERSION };
    static const struct option opts[] = {{"database-url", required_argument, NULL, O_DB},
                                         {"amqp-url", required_argument, NULL, O_AMQP},
                                         {"check-config", no_argument, NULL, O_CHECK},
                                         {"print-config", no_argument, NULL, O_PRINT},
                                         {"help", no_argument, NULL, 'h'},
                                         {"version", no_argument, NULL, O_VERSION},
                                         {NULL, 0, NULL, 0}};
    lr_config_t cfg;
    char err[512];
    int opt;
    int check = 0, print = 0;

    if (lr_config_load(&cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "longrun-scheduler: invalid configuration: %s\n", err);
        return 2;
    }
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case O_DB:
        case O_AMQP:
            if (lr_config_set(&cfg, opt == O_DB ? "LONGRUN_DATABASE_URL" : "LONGRUN_AMQP_URL", optarg, err,
                              sizeof(err)) != 0) {
                fprintf(stderr, "longrun-scheduler: %s\n", err);
                return 2;
            }
            break;
        case O_CHECK: check = 1; break;
        case O_PRINT: print = 1; break;
        case O_VERSION: printf("longrun-scheduler %s\n", LONGRUN_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "longrun-scheduler: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (print) {
        lr_config_print(&cfg, stdout);
    }
    if (check) {
        printf("configuration ok\n");
    }
    if (check || print) {
        return 0;
    }
    signal(SIGPIPE, SIG_IGN);
    return lr_scheduler_run(&cfg);
}
