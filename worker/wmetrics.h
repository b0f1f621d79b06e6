/*
 * wmetrics.h - the worker's metric families (docs/metrics.md), registered
 * once by lr_wm_init() before the loop starts and updated on the loop thread.
 *
 * Labels hold only names from configuration, so their number is bounded by
 * it: agent (a name the worker knows: the agents file or a built-in kind;
 * "unknown" otherwise, lr_run_agent_label()), model and provider (the
 * agents file), queue (LONGRUN_QUEUES), tool, and fixed sets (outcome,
 * reason, direction, status).
 */
#ifndef LR_WMETRICS_H
#define LR_WMETRICS_H

#include "metrics.h"

typedef struct lr_wm {
    lr_metric_t *tasks_started;       /* counter */
    lr_metric_t *tasks_finished;      /* counter {agent,outcome} */
    lr_metric_t *steps;               /* counter {agent} */
    lr_metric_t *step_seconds;        /* histogram {agent}, buckets to hours */
    lr_metric_t *queue_wait_seconds;  /* histogram {queue,agent}: created_at -> first claim */
    lr_metric_t *task_seconds;        /* histogram {agent,outcome}: created_at -> final state */
    lr_metric_t *checkpoint_seconds;  /* histogram */
    lr_metric_t *in_flight;           /* gauge */
    lr_metric_t *dead_letters;        /* counter {reason} */
    lr_metric_t *retries;             /* counter */
    lr_metric_t *suspensions;         /* counter {reason} */
    lr_metric_t *lease_renewals;      /* counter */
    lr_metric_t *fencing_rejections;  /* counter */
    lr_metric_t *model_requests;      /* counter {provider,model,status} */
    lr_metric_t *model_seconds;       /* histogram {provider} */
    lr_metric_t *tokens;              /* counter {agent,model,direction} */
    lr_metric_t *cost;                /* counter {agent,model} */
    lr_metric_t *tool_calls;          /* counter {tool,outcome} */
    lr_metric_t *tool_seconds;        /* histogram {tool} */
    lr_metric_t *circuit_state;       /* gauge {endpoint}: 0 closed, 1 half-open, 2 open */
    lr_metric_t *rate_limit_waits;    /* counter {model} */
    lr_metric_t *provider_parks;      /* counter {agent} */
    lr_metric_t *model_fallbacks;     /* counter {model, reason, action} */
    lr_metric_t *gate_waiting;        /* gauge {endpoint} */
    lr_metric_t *payloads_logged;     /* counter */
    lr_metric_t *payloads_redacted;   /* counter {class} */
    lr_metric_t *ready;               /* gauge */
    lr_metric_t *amqp_connected;      /* gauge */
    lr_metric_t *pg_connections;      /* gauge */
    lr_metric_t *callbacks_refused;   /* counter {reason} */
    lr_metric_t *egress_refused;      /* counter {reason} */
    lr_metric_t *memory_budget;       /* gauge */
    lr_metric_t *memory_charged;      /* gauge */
    lr_metric_t *memory_charged_peak; /* gauge */
    lr_metric_t *memory_holds;        /* counter */
    lr_metric_t *memory_waits;        /* counter (set from lr_mem_t.waits) */
    lr_metric_t *memory_held;         /* gauge */
    lr_metric_t *events_published;    /* counter {type}: confirmed by the broker (worker/events.c) */
    lr_metric_t *events_dropped;      /* counter {reason}: not published (full, disconnected, ...) */
    lr_metric_t *spend_suspensions;   /* counter {scope, name, period} */
} lr_wm_t;

extern lr_wm_t lr_wm;
void lr_wm_init(void);

#endif
