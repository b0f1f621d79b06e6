/*
 * amqp.h - RabbitMQ for event-loop programs: one thread owns the connection.
 *
 * librabbitmq is blocking and not thread-safe, so a dedicated thread owns the
 * connection and its channel: it declares the topology, consumes (basic.qos
 * prefetch + basic.consume on each queue), acks and rejects, and publishes
 * with publisher confirms (confirm.select; basic.ack/nack from the broker are
 * matched to publishes by sequence number; mandatory publishes that come back
 * with basic.return fail).  The loop talks to the thread through a command
 * queue (mutex + an eventfd/pipe that wakes amqp_simple_wait_frame_noblock
 * polling, or a short-timeout wait loop); the thread talks to the loop through
 * an event queue and one uv_async_t (coalesced: the loop drains the whole
 * queue on each wake-up).
 *
 * Reconnect: on any connection error the thread reports "disconnected",
 * fails every unconfirmed publish with LR_ECONN, drops pending acks of the
 * old connection (their deliveries will be redelivered by the broker), and
 * reconnects with exponential backoff and jitter (250 ms .. 10 s), then
 * re-declares and re-consumes (unless consuming was cancelled) and reports
 * "connected".  Every delivery carries the connection generation; acks and
 * rejects for an older generation are ignored (their tags are meaningless on
 * the new channel).
 *
 * Thread affinity: every lr_amqp_* function is called on the loop thread
 * (except lr_amqp_sync_* which are plain blocking helpers for the CLI and the
 * owner thread); callbacks run on the loop thread.
 */
#ifndef LR_AMQP_H
#define LR_AMQP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include <amqp_compat.h> /* not "": see amqp_compat.h */
#include "err.h"

typedef struct lr_amqp lr_amqp_t;

#define LR_AMQP_EXCHANGE "longrun.tasks"
#define LR_AMQP_DLX "longrun.dlx"
#define LR_AMQP_DEAD_QUEUE "longrun.dead"
#define LR_AMQP_QUEUE_PREFIX "longrun.q."
/* The stream of task events (worker/events.h, docs/task-contract.md) and
 * its default retention (LONGRUN_EVENTS_MAX_AGE, LONGRUN_EVENTS_MAX_BYTES). */
#define LR_AMQP_EVENTS_STREAM "longrun.events"
#define LR_AMQP_EVENTS_TASK_HEADER "x-longrun-task-id"
#define LR_AMQP_EVENTS_MAX_AGE "7D"
#define LR_AMQP_EVENTS_MAX_BYTES (1024LL * 1024 * 1024)
#define LR_AMQP_DEFAULT_DELIVERY_LIMIT 20
#define LR_AMQP_MAX_BODY (1024 * 1024)

/* A received message.  All strings NUL-terminated or NULL when absent. */
typedef struct lr_amqp_delivery {
    uint64_t generation; /* connection generation it arrived on */
    uint64_t delivery_tag;
    char *queue; /* queue it was consumed from */
    char *exchange;
    char *routing_key;
    bool redelivered;
    char *body; /* NUL-terminated copy; body_len excludes the NUL */
    size_t body_len;
    bool body_truncated; /* the message was larger than LR_AMQP_MAX_BODY: body holds
                            its first LR_AMQP_MAX_BODY bytes only */
    char *message_id;
    char *correlation_id;
    char *reply_to;
    char *content_type;
    int64_t delivery_count; /* x-delivery-count header (quorum queues), -1 absent */
    char *headers_json;     /* all headers as a JSON object text (x-death included), or NULL */
} lr_amqp_delivery_t;

typedef struct lr_amqp_msg {
    const char *body;
    size_t body_len;
    const char *message_id;     /* optional */
    const char *correlation_id; /* optional */
    const char *reply_to;       /* optional */
    const char *content_type;   /* default "application/json" */
    bool persistent;            /* delivery_mode 2 */
    bool mandatory;             /* unroutable -> confirm callback gets LR_EAMQP */
    /* optional string headers, NULL-terminated name/value pairs:
       {"x-longrun-reason", "bad_json", NULL} */
    const char *const *headers;
} lr_amqp_msg_t;

/* Delivery callback: takes ownership of d (free with lr_amqp_delivery_free). */
typedef void (*lr_amqp_delivery_cb)(lr_amqp_delivery_t *d, void *arg);
/* connected = 1 when consuming/publishing is possible, 0 when the connection
 * is down (reconnecting).  detail: human text (borrowed). */
typedef void (*lr_amqp_state_cb)(int connected, const char *detail, void *arg);
/* Publish outcome: 0 = confirmed by the broker (persisted for persistent
 * messages to quorum queues); LR_EAMQP = nacked or returned unroutable;
 * LR_ECONN = connection lost before the confirm (unknown: treat as not
 * published); LR_ESHUTDOWN = stopped before sending. */
typedef void (*lr_amqp_confirm_cb)(int err, void *arg);

typedef struct lr_amqp_opts {
    const char *url;            /* amqp:// or amqps:// URL */
    const char *const *consume; /* NULL-terminated full queue names to consume, or NULL */
    const char *const *declare; /* NULL-terminated task-queue short names to declare
                                   (longrun.q.<name>), or NULL; DLX topology always declared */
    int prefetch;               /* basic.qos prefetch count (max in flight) */
    int delivery_limit;         /* x-delivery-limit; 0 = default */
    int max_length;             /* x-max-length of task queues it creates; 0 = none */
    lr_amqp_delivery_cb on_delivery;
    lr_amqp_state_cb on_state;
    void *arg;
} lr_amqp_opts_t;

/* Starts the owner thread (which connects asynchronously).  Copies opts.
 * Returns 0, LR_EINVAL (bad URL; detail in errbuf), LR_ENOMEM, LR_EIO.
 * amqps:// verifies the broker against LONGRUN_AMQP_CACERT or the system CA
 * bundle (see amqp.c for the TLS environment variables). */
int lr_amqp_start(lr_amqp_t **out, uv_loop_t *loop, const lr_amqp_opts_t *opts, char *errbuf,
                  size_t errlen) LR_MUSTCHECK;

/* Queue an ack / a reject for d.  Ignored (returns LR_ESTATE) when d's
 * generation is stale.  Rejecting without requeue routes the message to the
 * queue's dead-letter exchange.  d stays owned by the caller. */
int lr_amqp_ack(lr_amqp_t *a, const lr_amqp_delivery_t *d);
int lr_amqp_reject(lr_amqp_t *a, const lr_amqp_delivery_t *d, bool requeue);

/* Confirmed publish.  Copies everything.  cb runs exactly once if this
 * returns 0.  Returns LR_ENOMEM or LR_ESHUTDOWN otherwise (cb never runs);
 * also LR_EINVAL (missing argument, a name or id longer than 255 bytes, bad
 * header), LR_ETOOBIG (body over LR_AMQP_MAX_BODY, more than 64 headers) and
 * LR_EBUSY (65536 publishes already in flight).  A publish made while the
 * connection is down is not queued: its cb gets LR_ECONN. */
int lr_amqp_publish(lr_amqp_t *a, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg,
                    lr_amqp_confirm_cb cb, void *arg) LR_MUSTCHECK;

/* The queues a task's outcome may be published to: RabbitMQ's direct
 * reply-to (LR_AMQP_DIRECT_REPLY_TO itself, or the per-channel name
 * "amq.rabbitmq.reply-to.<token>" the broker gives the producer), and names
 * that start with one of the comma-separated prefixes (LONGRUN_REPLY_TO_PREFIX,
 * default "reply."; "none" or NULL: no prefix).  Never longrun's own queues (names starting with
 * "longrun."), whatever the prefixes say: a producer must not be able to
 * publish into a task queue or the dead-letter queue through a worker. */
#define LR_AMQP_DIRECT_REPLY_TO "amq.rabbitmq.reply-to"

/* Whether reply_to names RabbitMQ's direct reply-to.  Such a reply is
 * published without mandatory: RabbitMQ (3.10 here) returns a mandatory
 * publish to the pseudo-queue as unroutable even when it delivered it, and
 * a requester that has gone away loses the reply either way. */
bool lr_amqp_reply_direct(const char *reply_to);

/* Whether reply_to is such a queue.  Returns 0 (allowed) or LR_EPERM with
 * the reason in errbuf (LR_EINVAL: reply_to NULL or empty).  Any thread. */
int lr_amqp_reply_allowed(const char *reply_to, const char *prefixes, char *errbuf, size_t errlen) LR_MUSTCHECK;

/* Publishes a task's outcome (JSON body) to the producer's reply_to queue
 * through the default exchange, persistent and mandatory (not for direct
 * reply-to, see lr_amqp_reply_direct), message_id =
 * task_id, with correlation_id if not NULL.  A reply_to that
 * lr_amqp_reply_allowed refuses is not published: logged as
 * task.reply_refused, counted in longrun_replies_total{outcome="refused"},
 * and LR_EPERM is returned with the reason in errbuf, for the caller to
 * record on the task.  Otherwise best effort: returns 0, and a failure (now
 * or in the confirm; a queue that does not exist comes back as basic.return)
 * is logged as task.reply_failed and counted (outcome "failed"; "sent" when
 * confirmed); the outcome is in PostgreSQL either way.  Used by the worker
 * and the scheduler. */
int lr_amqp_publish_reply(lr_amqp_t *a, const char *prefixes, const char *reply_to, const char *correlation_id,
                          const char *task_id, const char *body, char *errbuf, size_t errlen);

/* Stops consuming (basic.cancel on every consumer; not resumed on reconnect).
 * Publishing, acks and rejects keep working. */
void lr_amqp_cancel_consume(lr_amqp_t *a);

/* 1 when connected and (unless cancelled) consuming. */
int lr_amqp_connected(const lr_amqp_t *a);

/* Flushes queued acks/rejects/publishes (bounded wait, up to timeout_ms for
 * outstanding confirms), closes the channel and connection, joins the thread,
 * closes the uv_async_t, then calls done(arg) on the loop and frees a.
 * Unconfirmed publishes at that point get LR_ESHUTDOWN.  After this call no
 * more deliveries or state changes are reported (unacked deliveries go back
 * to their queue); confirm callbacks still run. */
void lr_amqp_stop(lr_amqp_t *a, long timeout_ms, void (*done)(void *arg), void *arg);

void lr_amqp_delivery_free(lr_amqp_delivery_t *d);

/* ---- Blocking helpers (CLI, tests, and the owner thread itself) ---- */

typedef struct lr_amqp_sync lr_amqp_sync_t;

/* Connects (blocking, timeout_ms for the TCP connect and login), opens
 * channel 1 and enables confirms.  Returns 0, LR_EINVAL (bad URL), LR_ECONN
 * (unreachable, refused, login failed; detail in errbuf). */
int lr_amqp_sync_connect(lr_amqp_sync_t **out, const char *url, long timeout_ms, char *errbuf,
                         size_t errlen) LR_MUSTCHECK;

/* Declares exchange longrun.tasks (direct, durable), longrun.dlx (fanout,
 * durable), quorum queue longrun.dead bound to longrun.dlx, the stream
 * longrun.events (x-queue-type=stream, x-max-age and x-max-length-bytes from
 * LONGRUN_EVENTS_MAX_AGE / LONGRUN_EVENTS_MAX_BYTES; an existing stream with
 * other ones is used as it is, with a warning), and for each
 * short name in queues (NULL-terminated) quorum queue longrun.q.<name> with
 * x-delivery-limit, x-dead-letter-exchange=longrun.dlx,
 * x-dead-letter-strategy=at-least-once, x-overflow=reject-publish, bound to
 * longrun.tasks with routing key <name>, and, when max_length > 0,
 * x-max-length = max_length (with reject-publish: a full queue nacks
 * publishes).  A PRECONDITION_FAILED (existing queue with other arguments)
 * returns LR_ECONFIG with a plain-words explanation in errbuf naming the
 * queue and what differs if known, except on x-max-length alone: an existing
 * queue with another limit (or none) is used as it is, with a warning
 * (amqp.queue_max_length) that names the policy that applies the limit. */
int lr_amqp_sync_declare(lr_amqp_sync_t *s, const char *const *queues, int delivery_limit, int max_length, char *errbuf,
                         size_t errlen) LR_MUSTCHECK;

/* Publishes and waits for the broker's confirm (up to timeout_ms).
 * A nacked publish is retried (4 tries, pauses doubling from 50 ms) while
 * the timeout allows.
 * Returns 0 (confirmed), LR_EBUSY (nacked on every try: the queue is at its
 * x-max-length, or unavailable; the message was not stored: publish it
 * later), LR_EAMQP (unroutable, or refused by a channel error), LR_ETIMEOUT
 * (the message may or may not be stored), LR_ECONN. */
int lr_amqp_sync_publish(lr_amqp_sync_t *s, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg,
                         long timeout_ms, char *errbuf, size_t errlen) LR_MUSTCHECK;

/* Passive declare: message and consumer counts of a queue. LR_ENOTFOUND when
 * the queue does not exist. */
int lr_amqp_sync_queue_info(lr_amqp_sync_t *s, const char *queue, uint32_t *messages, uint32_t *consumers, char *errbuf,
                            size_t errlen) LR_MUSTCHECK;

/* Consumes stream queue (basic.qos prefetch, then basic.consume with manual
 * acks and x-stream-offset: the named offset offset ("first", "last",
 * "next") or, when offset is NULL, the timestamp ts_seconds (the first chunk
 * written at or after it).  Returns 0, LR_ENOTFOUND (no such queue),
 * LR_EAMQP (refused, e.g. not a stream), LR_ECONN, LR_EINVAL. */
int lr_amqp_sync_stream_consume(lr_amqp_sync_t *s, const char *queue, const char *offset, int64_t ts_seconds,
                                int prefetch, char *errbuf, size_t errlen) LR_MUSTCHECK;

/* Waits up to timeout_ms for the next delivery of the consumer and acks it
 * (a stream's credit).  On 0, *body is its body and *header_value the
 * string header named header (NULL when absent), both NUL-terminated and
 * the caller's to free.  Returns 0, LR_ETIMEOUT (nothing yet: call again),
 * LR_ETOOBIG (a message over LR_AMQP_MAX_BODY, skipped), LR_EAMQP (the
 * broker cancelled the consumer or closed the channel), LR_ECONN (the
 * connection is gone: connect again), LR_ENOMEM. */
int lr_amqp_sync_next(lr_amqp_sync_t *s, long timeout_ms, const char *header, char **body, char **header_value,
                      char *errbuf, size_t errlen) LR_MUSTCHECK;

void lr_amqp_sync_close(lr_amqp_sync_t *s);

/* Parses url into its parts (wrapper over amqp_parse_url on a copy) and
 * checks the scheme; returns 0 or LR_EINVAL with the reason in errbuf. */
int lr_amqp_url_check(const char *url, char *errbuf, size_t errlen);

/* The broker host of url as rabbitmq-c reads it to connect (percent-decoded,
 * an IPv6 address without its brackets) copied into host, and whether the
 * URL is amqps:// into *tls.  Returns 0, LR_EINVAL (as lr_amqp_url_check),
 * LR_ETOOBIG (the host does not fit in hostlen), LR_ENOMEM. */
int lr_amqp_url_host(const char *url, char *host, size_t hostlen, bool *tls, char *errbuf, size_t errlen) LR_MUSTCHECK;

#endif
