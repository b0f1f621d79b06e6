/*
 * main.c - `longrun`: the producer and operator command-line tool.
 *
 * Dispatches to one function per subcommand; each parses its own options
 * (plus the common ones in cli.h), prints human output by default and JSON
 * with --json, and returns an exit code from cli.h.  The CLI is a plain
 * blocking program: it uses libpq and the blocking AMQP helpers directly.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buildinfo.h"
#include "cli.h"
#include "log.h"

static const struct command {
    const char *name;
    int (*fn)(cli_t *, int, char **);
    const char *summary;
} commands[] = {
    {"migrate", cmd_migrate, "apply pending database migrations (--status, --dry-run)"},
    {"enqueue", cmd_enqueue, "create tasks and publish them (one, or many from stdin)"},
    {"status", cmd_status, "show one task"},
    {"list", cmd_list, "list tasks with filters"},
    {"log", cmd_log, "a task's audit log: steps and transitions (--follow)"},
    {"wait", cmd_wait, "block until tasks are final; the exit code says how they ended"},
    {"watch", cmd_watch, "follow one task's events live (steps, tool calls, outcome); exits with its outcome"},
    {"result", cmd_result, "print a finished task's output (--json: with usage and cost)"},
    {"stats", cmd_stats, "tasks by status, queue depths, throughput, dead letters by reason"},
    {"workers", cmd_workers, "live workers: version, in-flight tasks, heartbeat"},
    {"dlq", cmd_dlq, "dead letters: list, show, requeue (with budget overrides), purge"},
    {"approve", cmd_approve, "approve what a suspended task waits for"},
    {"deny", cmd_deny, "deny what a suspended task waits for"},
    {"signal", cmd_signal, "deliver an external event to a task"},
    {"cancel", cmd_cancel, "cancel a task (running ones now, or at the next step boundary with --after-step)"},
    {"replay", cmd_replay, "run a task again from step N, in place or as a fork"},
    {"tools", cmd_tools, "kill switch: disable or enable a tool fleet-wide"},
    {"models", cmd_models, "kill switch: disable or enable a model fleet-wide"},
    {"spend", cmd_spend, "what model calls cost (by day, agent, tenant, model); spend caps: list, set-cap"},
    {"eval", cmd_eval, "release gate: run a suite of cases through the fleet, check the answers"},
};

static void usage(FILE *out) {
    fprintf(out, "usage: longrun <command> [options]\n"
                 "\n"
                 "The producer and operator tool of the longrun durable agent runtime.\n"
                 "\n"
                 "Commands:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
    }
    fprintf(out,
            "\n"
            "Options accepted by every command:\n"
            "  --database-url URL  PostgreSQL (env LONGRUN_DATABASE_URL, else PG* variables,\n"
            "                      else the local default %s)\n"
            "  --amqp-url URL      RabbitMQ (env LONGRUN_AMQP_URL, default %s)\n"
            "  --json              machine-readable output\n"
            "  -h, --help          help for the command\n"
            "\n"
            "Exit codes: 0 ok, 1 operation failed, 2 bad usage or input (nothing changed),\n"
            "3 some items of a batch failed.\n"
            "Run 'longrun <command> --help' for a command's options.\n",
            LR_DEFAULT_DATABASE_URL, LR_DEFAULT_AMQP_URL);
}

int main(int argc, char **argv) {
    cli_t c;
    char err[512];
    int rc;

    memset(&c, 0, sizeof(c));
    lr_log_init("cli", NULL, LR_LOG_WARN, 0);
    lr_log_to_stderr();
    if (argc < 2) {
        usage(stderr);
        return LR_EXIT_USAGE;
    }
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return LR_EXIT_OK;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
        printf("longrun %s (commit %s)\n", lr_build_version, lr_build_commit);
        return LR_EXIT_OK;
    }
    rc = lr_config_load(&c.cfg, err, sizeof(err));
    if (rc != 0) {
        (void)cli_fail(&c, 0, "invalid configuration: %s", err);
        return LR_EXIT_USAGE;
    }
    c.color = isatty(STDOUT_FILENO) && getenv("NO_COLOR") == NULL;
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            char prog[64];
            snprintf(prog, sizeof(prog), "longrun %s", commands[i].name);
            c.prog = prog;
            return commands[i].fn(&c, argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "longrun: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return LR_EXIT_USAGE;
}
