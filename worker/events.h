/*
 * events.h - the worker's task events on the RabbitMQ stream longrun.events
 * (docs/task-contract.md, "Events"; the schema is docs/events.schema.json).
 *
 * Every event reports state that is already committed, and is numbered from
 * durable state: tasks.event_seq (migration 0010) counts the events a task
 * has been given so far, and the statement that commits what they report
 * advances it in the same transaction (the claim by one, a checkpoint by the
 * step's events plus one when the task leaves running, a transition by one).
 * So the numbers are gapless and unique per task across workers and
 * restarts; a step re-run after a crash was never committed and its first
 * run published nothing.  The cost is liveness: a step's started and tool
 * call events are published with its checkpoint (each carries the time it
 * happened in "ts").
 *
 * Publishing is fire-and-forget after the commit: never waited for by a
 * run, at most LONGRUN_EVENTS_MAX_INFLIGHT unconfirmed at once, an event
 * that cannot be published (that bound, RabbitMQ down, a nack) is dropped
 * and counted in longrun_events_dropped_total{reason}.  The checkpoint stays
 * the source of truth: `longrun watch` fills a gap from the step log.
 * LONGRUN_EVENTS=0 turns publishing off (the sequence still advances).
 *
 * Thread affinity: the loop thread.
 */
#ifndef LR_WORKER_EVENTS_H
#define LR_WORKER_EVENTS_H

#include <stdint.h>

#include "amqp.h"
#include "core.h"

#define LR_EVENTS_STREAM LR_AMQP_EVENTS_STREAM
#define LR_EVENTS_TASK_HEADER LR_AMQP_EVENTS_TASK_HEADER

/* The events a checkpoint of step out reports before any status event:
 * step_started, a started and a finished event per tool call in
 * out->tool_calls, step_finished.  Passed to the checkpoint statement. */
int lr_events_step_count(const lr_step_t *out);

/* The claim of r committed (r->event_seq is its event's number): claimed,
 * or resumed when the task has checkpointed steps. */
void lr_events_claimed(lr_run_t *r);

/* The checkpoint of step r->step + 1 committed with tasks.event_seq = last
 * (0: unknown, the commit was found by a check: computed from r->event_seq).
 * Publishes the step's events and, unless status is running, the status
 * event; sets r->event_seq.  Call before r->step and r->out change. */
void lr_events_step(lr_run_t *r, int64_t last, enum lr_status status);

/* A transition to status committed with tasks.event_seq = seq (0: unknown,
 * r->event_seq + 1).  Publishes its event; sets r->event_seq. */
void lr_events_transition(lr_run_t *r, int64_t seq, enum lr_status status);

#endif
