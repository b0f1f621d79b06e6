/*
 * cli.h - shared pieces of the `longrun` command-line tool.
 *
 * Exit codes (documented in docs/cli.md):
 *   0  success
 *   1  the operation failed (server unreachable, database error, ...)
 *   2  bad usage or invalid input (unknown option, malformed JSON, unknown
 *      id, invalid override) -- nothing was changed
 *   3  partial: some items of a batch failed (details printed per item)
 */
#ifndef LR_CLI_H
#define LR_CLI_H

#include <getopt.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"

enum { LR_EXIT_OK = 0, LR_EXIT_FAIL = 1, LR_EXIT_USAGE = 2, LR_EXIT_PARTIAL = 3 };

typedef struct cli {
    lr_config_t cfg;
    bool json;
    bool color;
    const char *prog;  /* "longrun status" for messages */
    const char *actor; /* --actor, or NULL: see cli_actor() */
    char **opt_argv;   /* the argv cli_next_option() is parsing */
} cli_t;

/* Options every subcommand accepts, then options shared by some (--actor, the
 * budget flags); their ids start at 1000. */
enum {
    OPT_DATABASE_URL = 1000,
    OPT_AMQP_URL,
    OPT_JSON,
    OPT_HELP,
    OPT_ACTOR,
    OPT_MAX_STEPS,
    OPT_MAX_TOOL_CALLS,
    OPT_MAX_TOKENS,
    OPT_MAX_COST,
    OPT_MAX_SECONDS,
    OPT_FIRST_COMMAND_OPTION
};
/* clang-format off */
#define CLI_COMMON_OPTIONS                                        \
    {"database-url", required_argument, NULL, OPT_DATABASE_URL}, \
        {"amqp-url", required_argument, NULL, OPT_AMQP_URL},     \
        {"json", no_argument, NULL, OPT_JSON},                   \
        {"help", no_argument, NULL, 'h'}
/* --actor NAME, for the commands that record who acted; see cli_actor(). */
#define CLI_ACTOR_OPTION {"actor", required_argument, NULL, OPT_ACTOR}
/* The budget flags of enqueue and dlq requeue, parsed by cli_budget_option(). */
#define CLI_BUDGET_OPTIONS                                               \
    {"max-steps", required_argument, NULL, OPT_MAX_STEPS},              \
        {"max-tool-calls", required_argument, NULL, OPT_MAX_TOOL_CALLS}, \
        {"max-tokens", required_argument, NULL, OPT_MAX_TOKENS},         \
        {"max-cost", required_argument, NULL, OPT_MAX_COST},             \
        {"max-seconds", required_argument, NULL, OPT_MAX_SECONDS}
/* clang-format on */

enum { CLI_OPT_INVALID = -2 };

/* The option loop of every subcommand: getopt_long() over argv with opts
 * (which must start with CLI_COMMON_OPTIONS), handling the common options
 * (--database-url, --amqp-url, --json) and --actor itself.  Starts again from
 * argv[1] when argv is not the one of the previous call.
 * Returns the next option for the command to handle: its id (or 'h', or '?'
 * for an unknown option or a missing value, which getopt has reported); -1
 * when the options are done (optind is the first operand); or
 * CLI_OPT_INVALID when a common option has an invalid value: the message is
 * printed, the command exits LR_EXIT_USAGE. */
int cli_next_option(cli_t *c, int argc, char **argv, const char *shortopts, const struct option *opts);

/* What cli_no_options() prints for an option the command does not take:
 * the command's usage (on stderr), or "unknown option (see --help)". */
typedef enum { CLI_UNKNOWN_USAGE, CLI_UNKNOWN_SAY_SO } cli_on_unknown_t;

/* The option loop of a command that takes only the common options.  usage is
 * its help text, printed on stdout for --help.  Returns 0 to go on (optind is
 * the first operand), -1 after --help, or LR_EXIT_USAGE after printing why. */
int cli_no_options(cli_t *c, int argc, char **argv, const char *usage, cli_on_unknown_t on_unknown);

/* The actor recorded with operator actions: --actor, else LONGRUN_ACTOR,
 * else the login name. */
const char *cli_actor(const cli_t *c);

/* One budget flag: its option id, how messages name it, and the budget it
 * sets (its name in the task contract's "budgets"). */
typedef struct cli_budget_flag {
    int opt;
    const char *flag;   /* "--max-steps" */
    const char *budget; /* "max_steps" */
} cli_budget_flag_t;

/* Parses the value of budget flag opt (OPT_MAX_STEPS .. OPT_MAX_SECONDS) as a
 * number; its range is the caller's to check (lr_budget_set()).  Returns the
 * flag's entry with *value set, or NULL after printing why (the command
 * exits LR_EXIT_USAGE). */
const cli_budget_flag_t *cli_budget_option(cli_t *c, int opt, const char *arg, double *value);

/* Prints "longrun <cmd>: <message>" to stderr and returns code. */
int cli_fail(cli_t *c, int code, const char *fmt, ...) LR_PRINTF(3, 4);

/* Connects to PostgreSQL (blocking, 10 s timeout).  NULL on failure, with a
 * clear message printed (the URL shown with its password masked). */
PGconn *cli_db_connect(cli_t *c);

/* Runs a parameterized statement and checks its status.  Returns the result
 * (caller PQclear()s) or NULL after printing the server's message. */
PGresult *cli_exec(cli_t *c, PGconn *db, const char *sql, int n, const char *const *params);

/* Runs a statement without parameters whose result is not needed.  Returns 0,
 * or -1 after printing the server's message (as cli_exec). */
int cli_exec_simple(cli_t *c, PGconn *db, const char *sql);

/* Whether a task status is final (nothing more happens to the task unless an
 * operator acts): succeeded, failed, dead or cancelled. */
bool cli_status_final(const char *status);

/* The exit code of a final status, as `longrun wait` uses them (cli/wait.c):
 * 0 succeeded, 4 dead or failed, 5 cancelled. */
int cli_status_exit(const char *status);

/* A monotonic clock in milliseconds (deadlines, pauses). */
uint64_t cli_mono_ms(void);

/* The one task ID operand of a command (argv[optind]): *id, or an exit code
 * (LR_EXIT_USAGE, message printed) when it is missing, not alone or not a
 * UUID.  Returns 0 on success. */
int cli_task_id_operand(cli_t *c, int argc, char **argv, const char **id);

/* Parses a decimal integer in [min, max] for option name; -1 + message on error. */
int cli_parse_long(cli_t *c, const char *name, const char *s, long min, long max, long *out);

/* Reads "JSON" or "@file" or "-" (stdin) into a malloc'd string; NULL + message. */
char *cli_read_arg_or_file(cli_t *c, const char *name, const char *arg, size_t max);

/* Publishes {"id"} continuations (confirmed) for rows of ids (task id and
 * queue columns) and marks them published.  Returns 0, or -1 when RabbitMQ
 * is unreachable (message printed; the scheduler's outbox sweep dispatches
 * them later).  *published counts the confirmed ones. */
int cli_publish_continuations(cli_t *c, PGconn *db, PGresult *ids, int col_id, int col_queue, int *published);

/* Prints j as one line of JSON on stdout. */
struct cJSON;
void cli_print_json(const struct cJSON *j);
/* "30s", "15m", "2h", "7d" -> "30 seconds" (a PostgreSQL interval); 0 or -1. */
int cli_duration(const char *s, char *out, size_t outlen);

/* A producer session for commands that enqueue (eval): both servers
 * connected, the queue declared.  NULL after printing why.  send validates a
 * task body (JSON text), records and publishes it, and writes its id;
 * returns 0 or -1 (message printed). */
typedef struct cli_producer cli_producer_t;
cli_producer_t *cli_producer_open(cli_t *c, const char *queue);
int cli_producer_send(cli_producer_t *p, const char *text, char id_out[37]);
PGconn *cli_producer_db(cli_producer_t *p);
void cli_producer_close(cli_producer_t *p);

int cmd_migrate(cli_t *c, int argc, char **argv);
int cmd_enqueue(cli_t *c, int argc, char **argv);
int cmd_status(cli_t *c, int argc, char **argv);
int cmd_list(cli_t *c, int argc, char **argv);
int cmd_log(cli_t *c, int argc, char **argv);
int cmd_approve(cli_t *c, int argc, char **argv);
int cmd_deny(cli_t *c, int argc, char **argv);
int cmd_signal(cli_t *c, int argc, char **argv);
int cmd_cancel(cli_t *c, int argc, char **argv);
int cmd_replay(cli_t *c, int argc, char **argv);
int cmd_dlq(cli_t *c, int argc, char **argv);
int cmd_stats(cli_t *c, int argc, char **argv);
int cmd_workers(cli_t *c, int argc, char **argv);
int cmd_tools(cli_t *c, int argc, char **argv);
int cmd_models(cli_t *c, int argc, char **argv);
int cmd_eval(cli_t *c, int argc, char **argv);
int cmd_wait(cli_t *c, int argc, char **argv);
int cmd_result(cli_t *c, int argc, char **argv);
int cmd_watch(cli_t *c, int argc, char **argv);
int cmd_spend(cli_t *c, int argc, char **argv);

/* Blocks until the n tasks ids are final (or timeout_s > 0 passes), printing
 * each as it ends; returns wait's exit code (wait.c). */
int cli_wait_tasks(cli_t *c, PGconn *db, char **ids, int n, long timeout_s);

/* Applies pending migrations (used by `migrate` and by tests).  Prints
 * progress unless quiet.  Returns an exit code. */
int cli_migrate_run(cli_t *c, PGconn *db, bool dry_run, bool status_only);

#endif
