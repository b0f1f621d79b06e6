/*
 * worker.h - internals of longrun-worker shared by its files.
 *
 * One libuv loop thread drives every in-flight task (lr_run_t) as a state
 * machine; PostgreSQL through the async pool (common/pg.h), RabbitMQ through
 * the owner thread (common/amqp.h), HTTP through curl multi (common/http.h).
 * Step execution sits behind lr_executor_t so that agent kinds plug in.
 */
#ifndef LR_WORKER_H
#define LR_WORKER_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "amqp.h"
#include "config.h"
#include "http.h"
#include "pg.h"
#include "task.h"

typedef struct lr_worker lr_worker_t;
typedef struct lr_run lr_run_t;

/* What a step ended with. */
enum lr_step_outcome {
    LR_STEP_CONTINUE = 0,   /* step done; the task goes on */
    LR_STEP_FINISHED,       /* step done; the task succeeded (result set) */
    LR_STEP_SUSPEND,        /* step done; the task waits (suspend_reason, resume_in_ms / wait_event) */
    LR_STEP_STOP,           /* step done; the task stops on a budget (stop_reason): dead-lettered */
    LR_STEP_FAIL_TRANSIENT, /* step not done; retry the task later (attempt + 1) */
    LR_STEP_FAIL_PERMANENT, /* step not done; dead-letter now (error) */
    LR_STEP_ABANDONED,      /* step canceled by the worker (drain deadline, fenced) */
};

/* Output of one step, filled by the executor.  Strings owned by the struct
 * (freed by lr_step_reset). */
typedef struct lr_step {
    int outcome;
    char *messages;   /* JSON array text: the messages this step added */
    char *tool_calls; /* JSON text or NULL */
    char *result;     /* JSON text when FINISHED */
    char *model;      /* model that answered, or NULL */
    char *fallback;   /* JSON array text: the calls that did not answer (task_steps.fallback), or NULL */
    char error[512];
    char stop_reason[32];
    char suspend_reason[32];
    char wait_event[128];
    long resume_in_ms; /* -1 = none */
    long tokens_in, tokens_out, tokens_cached, tool_calls_count;
    double cost_usd;
} lr_step_t;

void lr_step_reset(lr_step_t *s);

typedef void (*lr_step_done_cb)(lr_run_t *r);

typedef struct lr_executor {
    const char *name;
    bool needs_history;
    /* It keeps its own copy of the conversation across the steps of a
     * delivery: the worker does not append each committed step to the
     * history (lr_run_history then holds what was loaded at the claim). */
    bool keeps_conversation;
    /* Starts step lr_run_step_no(r) + 1.  Returns 0 and later calls done(r)
     * exactly once (never inside start), or an error code (done never runs):
     * LR_EPERM means out->outcome/out->error already say why (e.g. invalid
     * input); any other code counts as a transient failure. */
    int (*start)(lr_run_t *r, lr_step_t *out, lr_step_done_cb done);
    /* Cancels an in-flight step: done(r) will not run. */
    void (*cancel)(lr_run_t *r);
    /* Frees per-task executor state (lr_run_exec_state). */
    void (*release)(lr_run_t *r);
} lr_executor_t;

/* Accessors for executors (borrowed values valid while the run lives). */
const char *lr_run_id(const lr_run_t *r);
int lr_run_step_no(const lr_run_t *r); /* last checkpointed step */
int64_t lr_run_epoch(const lr_run_t *r);
const cJSON *lr_run_input(const lr_run_t *r);
const char *lr_run_agent(const lr_run_t *r);
/* The step log, loaded on claim for executors that need it: an array whose
 * entries are each step's message array, in order, followed by the task's
 * signals as {"signal": name, "payload": ...} objects.  NULL before step 1. */
const cJSON *lr_run_history(const lr_run_t *r);
void **lr_run_exec_state(lr_run_t *r);
/* The task's own budgets object (JSON text as stored, may be "{}"). */
const char *lr_run_budgets_json(const lr_run_t *r);
/* The task's tenant, or NULL. */
const char *lr_run_tenant(const lr_run_t *r);
typedef struct lr_run_usage {
    int step; /* steps checkpointed */
    long tokens_in, tokens_out, tool_calls, active_ms;
    double cost_usd;
    long outage_ms; /* parked for provider_unavailable since that long ago (ms), -1: not in an outage */
    long wall_ms;   /* since the task's first claim (started_at), waits included (ms) */
} lr_run_usage_t;
/* Usage recorded so far (before the step in flight). */
void lr_run_usage(const lr_run_t *r, lr_run_usage_t *u);
/* Counts what a committed step used (called by the worker after a checkpoint). */
void lr_run_add_usage(lr_run_t *r, long tool_calls, long active_ms);
lr_worker_t *lr_run_worker(lr_run_t *r);
/* Whether this worker's lease on the task is surely still valid by its own
 * clock: claimed, renewed or checkpointed (each measured from when it was
 * sent) less than a lease ago.  An executor asks before every model and
 * tool call: false means the task may belong to another worker by now (this
 * process was paused or starved past its lease); end the step as
 * LR_STEP_ABANDONED without calling anything. */
bool lr_run_lease_ok(lr_run_t *r);
/* The run takes over n bytes already charged to the memory budget (a step's
 * answer): they stay charged until its checkpoint is written or it ends. */
void lr_run_mem_adopt(lr_run_t *r, size_t n);
lr_http_t *lr_worker_http(lr_worker_t *w);
/* The worker's MCP client (worker/mcp.h). */
struct lr_mcp *lr_worker_mcp(lr_worker_t *w);
/* The worker's memory budget (membudget.h). */
struct lr_mem *lr_worker_mem(lr_worker_t *w);
uv_loop_t *lr_worker_loop(lr_worker_t *w);
lr_pg_pool_t *lr_worker_pg(lr_worker_t *w);
const lr_config_t *lr_worker_config(const lr_worker_t *w);
const char *lr_worker_id(const lr_worker_t *w);
bool lr_worker_test_hooks(const lr_worker_t *w);
/* The connect-time check model and tool requests set (lr_http_opts_t
 * check_addr / check_arg): worker/egress.h. */
void lr_worker_egress(lr_worker_t *w, lr_http_opts_t *o);

/* Built-in executors. */
extern const lr_executor_t lr_exec_http_steps;
extern const lr_executor_t lr_exec_agent;

/* Runs the worker until it has drained and stopped.  Returns the exit code. */
int lr_worker_run(const lr_config_t *cfg, const char *const *queues);

#endif
