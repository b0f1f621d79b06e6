/*
 * amqp.c - RabbitMQ for event-loop programs; see amqp.h for the contract.
 *
 * Design.  librabbitmq (rabbitmq-c) is blocking and not thread-safe, so one
 * "owner" thread per lr_amqp_t holds the connection and its single channel
 * (CHANNEL).  Two queues connect it to the loop thread, both guarded by one
 * mutex:
 *
 *   loop -> owner: commands (ack, reject, publish, cancel, stop).  Pushing the
 *     first command into an empty queue writes an eventfd; the owner thread
 *     sleeps in poll(2) on that eventfd *and* the connection's socket, so it
 *     wakes at once for either a command or broker data and costs nothing
 *     while idle (rabbitmq-c cannot poll an extra fd itself, but it does
 *     expose the socket; before sleeping we drain everything rabbitmq-c has
 *     buffered, so poll never waits on data that was already read).  An idle
 *     tick of IDLE_TICK_MS lets rabbitmq-c send heartbeats and notice a
 *     silent broker.
 *
 *   owner -> loop: events (delivery, publish outcome, state change, stopped),
 *     appended in batches followed by one uv_async_send; libuv coalesces the
 *     wake-ups and the async callback drains the whole queue in order.
 *
 * Ordering: commands run in the order the loop issued them, so "publish the
 * continuation, wait for its lra_confirm, then ack" keeps its meaning.  Events
 * reach the loop in the order the broker produced them.
 *
 * Owner thread states (set_state() traces every transition):
 *   DISCONNECTED -> CONNECTING -> READY -> (error) -> DISCONNECTED ...
 *   READY -> DRAINING (stop requested, waiting for confirms) -> CLOSED.
 *
 * Publisher confirms: after lra_confirm.select the broker numbers publishes on
 * the channel 1, 2, 3...; unconfirmed publishes sit in a ring indexed by that
 * sequence number; basic.ack / basic.nack (possibly with `multiple`) complete
 * them.  A mandatory publish that cannot be routed comes back as basic.return
 * *before* its basic.ack; basic.return carries no sequence number, so it is
 * matched to the oldest unconfirmed mandatory publish with the same exchange,
 * routing key, body length and body hash (the channel processes publishes in
 * order, so returns arrive in publish order).
 *
 * Reconnect: any connection or channel error (a channel error leaves the
 * delivery tags and lra_confirm numbers of the channel meaningless, so it is
 * handled like a lost connection) fails unconfirmed publishes with LR_ECONN,
 * bumps the generation, reports on_state(0, why) and retries with
 * exponential backoff and jitter (250 ms .. 10 s).  Publishes issued while
 * disconnected fail at once with LR_ECONN rather than queueing without bound.
 *
 * Stopping: the stop command runs after everything queued before it; the
 * owner cancels its consumers (fewer needless redeliveries), waits for
 * outstanding confirms until the stop timeout, closes politely, reports the
 * rest as LR_ESHUTDOWN, and posts a "stopped" event; the loop then joins the
 * thread and closes its handles.  If the thread is stuck in a blocking socket
 * call (a broker that stopped reading), a loop timer shuts the socket down
 * STOP_GRACE_MS after the stop timeout.
 *
 * Thread affinity: lr_amqp_start/ack/reject/publish/cancel_consume/connected/
 * stop and all callbacks: the loop thread.  The owner thread touches only its
 * own fields (t_*, conn, unconfirmed) and the mutex-guarded queues.
 * lr_amqp_sync_*: any one thread per handle; they share the protocol code
 * (conn_*, lra_declare_topology, lra_send_publish) with the owner thread.
 *
 * TLS (amqps://): the broker certificate and host name are verified against
 * LONGRUN_AMQP_CACERT (PEM file) or, when unset, the system bundle
 * /etc/ssl/certs/ca-certificates.crt.  LONGRUN_AMQP_CERT and LONGRUN_AMQP_KEY
 * name a client certificate and key; LONGRUN_AMQP_TLS_VERIFY=0 disables
 * verification (logged as a warning; for tests only).
 *
 * URL quirk: rabbitmq-c reads "amqp://host/" as the empty vhost ""; we read
 * it as "/" like most other clients (an explicit "%2f" also means "/").
 *
 * Files (what they share is in amqp_int.h, functions prefixed lra_):
 *   amqp.c        the loop side (this file) and reply_to outcomes
 *   amqp_owner.c  the owner thread, its command and event queues, confirms
 *   amqp_conn.c   the connection wrapper, publishing and topology, shared
 *                 by the owner thread and the blocking helpers
 *   amqp_sync.c   the blocking helpers (lr_amqp_sync_*)
 *   amqp_wire.c   small helpers, URL parsing, message headers as JSON
 */
#include "amqp_int.h"

/* ------------------------------------------------------------------------ */
/* Loop side                                                                 */

static void amqp_free(lr_amqp_t *a) {
    item_t *it;
    while ((it = lra_item_pop(&a->events)) != NULL) {
        lra_item_free(it);
    }
    while ((it = lra_item_pop(&a->cmds)) != NULL) {
        lra_item_free(it);
    }
    lra_item_free(a->stop_item);
    lra_item_free(a->stopped_item);
    free(a->unconfirmed.v);
    lra_url_free(&a->url);
    if (a->consume != NULL) {
        for (size_t i = 0; a->consume[i] != NULL; i++) {
            free(a->consume[i]);
        }
        free(a->consume);
    }
    if (a->declare != NULL) {
        for (size_t i = 0; a->declare[i] != NULL; i++) {
            free(a->declare[i]);
        }
        free(a->declare);
    }
    if (a->wake_fd >= 0) {
        close(a->wake_fd);
    }
    pthread_mutex_destroy(&a->mu);
    free(a);
}

static void handle_closed(uv_handle_t *h) {
    lr_amqp_t *a = h->data;
    if (--a->open_handles > 0) {
        return;
    }
    void (*done)(void *) = a->done;
    void *done_arg = a->done_arg;
    amqp_free(a);
    if (done != NULL) {
        done(done_arg);
    }
}

static void push_command(lr_amqp_t *a, item_t *it) {
    bool wake = false;
    pthread_mutex_lock(&a->mu);
    lr_list_push_back(&a->cmds, &it->link);
    if (!a->wake_armed) {
        a->wake_armed = true;
        wake = true;
    }
    if (wake) {
        uint64_t one = 1;
        ssize_t n = write(a->wake_fd, &one, sizeof(one));
        (void)n;
    }
    pthread_mutex_unlock(&a->mu);
}

static void async_cb(uv_async_t *h) {
    lr_amqp_t *a = h->data;
    lr_list_t batch;
    item_t *it;

    if (a->stopped) {
        return;
    }
    lr_list_init(&batch);
    pthread_mutex_lock(&a->mu);
    lr_list_splice_back(&batch, &a->events);
    pthread_mutex_unlock(&a->mu);

    while ((it = lra_item_pop(&batch)) != NULL) {
        switch (it->type) {
        case EV_DELIVERY:
            if (!a->stopping && a->on_delivery != NULL) {
                lr_amqp_delivery_t *d = it->delivery;
                it->delivery = NULL;
                a->on_delivery(d, a->arg);
            }
            break;
        case EV_CONFIRM: {
            pub_t *p = it->pub;
            a->inflight--;
            if (p->cb != NULL) {
                p->cb(p->result, p->arg);
            }
            break;
        }
        case EV_STATE:
            a->connected = it->connected;
            if (it->connected) {
                a->generation = it->generation;
            }
            if (a->on_state != NULL && !a->stopping) {
                a->on_state(it->connected, it->detail, a->arg);
            }
            break;
        case EV_STOPPED: a->stopped = true; break;
        default: break;
        }
        lra_item_free(it);
    }
    if (a->stopped) {
        pthread_join(a->thread, NULL);
        a->connected = 0;
        uv_close((uv_handle_t *)&a->stop_timer, handle_closed);
        uv_close((uv_handle_t *)&a->async, handle_closed);
    }
}

static void stop_timer_cb(uv_timer_t *t) {
    lr_amqp_t *a = t->data;
    /* The owner thread did not finish within the stop timeout: it is stuck
       in a blocking write or read.  Shut the socket down under it. */
    pthread_mutex_lock(&a->mu);
    if (a->kick_fd >= 0) {
        lr_warn("amqp.stop_kick", "the AMQP thread is slow to stop; shutting its socket down");
        shutdown(a->kick_fd, SHUT_RDWR);
    }
    pthread_mutex_unlock(&a->mu);
}

static atomic_uint instance_counter;

static char **copy_strv(const char *const *v, size_t *count) {
    size_t n = 0;
    while (v != NULL && v[n] != NULL) {
        n++;
    }
    char **out = calloc(n + 1, sizeof(*out));
    if (out == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        out[i] = strdup(v[i]);
        if (out[i] == NULL) {
            for (size_t j = 0; j < i; j++) {
                free(out[j]);
            }
            free(out);
            return NULL;
        }
    }
    if (count != NULL) {
        *count = n;
    }
    return out;
}

static lr_metric_t *replies_metric(void);

int lr_amqp_start(lr_amqp_t **out, uv_loop_t *loop, const lr_amqp_opts_t *opts, char *errbuf, size_t errlen) {
    lr_amqp_t *a = NULL;
    int rc;
    char host[64] = "";
    sigset_t all, old;

    if (out == NULL || loop == NULL || opts == NULL) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "lr_amqp_start: missing argument");
    }
    *out = NULL;
    (void)replies_metric(); /* in /metrics from the start, before the first reply */
    size_t nconsume = 0;
    while (opts->consume != NULL && opts->consume[nconsume] != NULL) {
        nconsume++;
    }
    if (nconsume > 0 && (opts->prefetch < 1 || opts->prefetch > 65535)) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "prefetch %d must be 1..65535", opts->prefetch);
    }
    if (opts->delivery_limit < 0) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "delivery limit %d is negative", opts->delivery_limit);
    }
    for (size_t i = 0; i < nconsume; i++) {
        if (opts->consume[i][0] == '\0' || strlen(opts->consume[i]) > MAX_SHORTSTR) {
            return lr_seterr(errbuf, errlen, LR_EINVAL,
                             "queue name %zu to consume is empty or "
                             "too long",
                             i);
        }
    }
    /* Checked here: the owner thread would otherwise retry a bad name forever. */
    rc = lra_check_queue_names(opts->declare, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    a = calloc(1, sizeof(*a));
    if (a == NULL) {
        return LR_ENOMEM;
    }
    a->wake_fd = -1;
    a->kick_fd = -1;
    lr_list_init(&a->cmds);
    lr_list_init(&a->events);
    lr_list_init(&a->t_cmds);
    lr_list_init(&a->t_events);
    pthread_mutex_init(&a->mu, NULL);
    rc = lra_url_parse(&a->url, opts->url, errbuf, errlen);
    if (rc != 0) {
        goto fail;
    }
    a->loop = loop;
    a->consume = copy_strv(opts->consume, &a->nconsume);
    a->declare = copy_strv(opts->declare, NULL);
    a->stop_item = calloc(1, sizeof(*a->stop_item));
    a->stopped_item = calloc(1, sizeof(*a->stopped_item));
    if (a->consume == NULL || a->declare == NULL || a->stop_item == NULL || a->stopped_item == NULL) {
        rc = LR_ENOMEM;
        goto fail;
    }
    a->prefetch = opts->prefetch;
    a->delivery_limit = opts->delivery_limit;
    a->max_length = opts->max_length;
    a->on_delivery = opts->on_delivery;
    a->on_state = opts->on_state;
    a->arg = opts->arg;
    gethostname(host, sizeof(host) - 1);
    /* "<program>@<host>:<pid>/<n>": findable in rabbitmqctl list_connections. */
    snprintf(a->conn_name, sizeof(a->conn_name), "%s@%s:%ld/%u",
#if defined(__GLIBC__)
             program_invocation_short_name,
#else
             "longrun",
#endif
             host, (long)getpid(), atomic_fetch_add(&instance_counter, 1) + 1);
    a->rng = (lra_now_ms() * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)a;
    if (a->rng == 0) {
        a->rng = 1;
    }
    a->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (a->wake_fd < 0) {
        rc = lr_seterr(errbuf, errlen, LR_EIO, "eventfd failed: errno %d", errno);
        goto fail;
    }
    if (uv_async_init(loop, &a->async, async_cb) != 0) {
        rc = lr_seterr(errbuf, errlen, LR_EIO, "uv_async_init failed");
        goto fail;
    }
    a->async.data = a;
    a->open_handles++;
    uv_timer_init(loop, &a->stop_timer);
    a->stop_timer.data = a;
    a->open_handles++;

    /* The owner thread takes no signals: they belong to the loop thread. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&a->thread, NULL, lra_owner_main, a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        /* The handles exist: they must be closed, and a is freed in the
           last close callback once the loop runs. */
        lr_seterr(errbuf, errlen, LR_EIO, "cannot start the AMQP thread: errno %d", rc);
        a->done = NULL;
        uv_close((uv_handle_t *)&a->stop_timer, handle_closed);
        uv_close((uv_handle_t *)&a->async, handle_closed);
        return LR_EIO;
    }
#if defined(__GLIBC__)
    pthread_setname_np(a->thread, "lr-amqp");
#endif
    *out = a;
    return 0;
fail:
    amqp_free(a);
    return rc;
}

/* Queues the ack or reject of d for the owner thread. */
static int settle(lr_amqp_t *a, const lr_amqp_delivery_t *d, int type, bool requeue) {
    if (a == NULL || d == NULL) {
        return LR_EINVAL;
    }
    if (a->stopping) {
        return LR_ESHUTDOWN;
    }
    if (!a->connected || d->generation != a->generation) {
        return LR_ESTATE;
    }
    item_t *it = calloc(1, sizeof(*it));
    if (it == NULL) {
        return LR_ENOMEM;
    }
    it->type = type;
    it->generation = d->generation;
    it->tag = d->delivery_tag;
    it->requeue = requeue;
    push_command(a, it);
    return 0;
}

int lr_amqp_ack(lr_amqp_t *a, const lr_amqp_delivery_t *d) { return settle(a, d, CMD_ACK, false); }

int lr_amqp_reject(lr_amqp_t *a, const lr_amqp_delivery_t *d, bool requeue) {
    return settle(a, d, CMD_REJECT, requeue);
}

int lr_amqp_publish(lr_amqp_t *a, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg,
                    lr_amqp_confirm_cb cb, void *arg) {
    char err[DETAIL_MAX];
    if (a == NULL) {
        return LR_EINVAL;
    }
    if (a->stopping) {
        return LR_ESHUTDOWN;
    }
    int rc = lra_msg_validate(exchange, routing_key, msg, err, sizeof(err));
    if (rc != 0) {
        lr_warn("amqp.publish_invalid", "%s", err);
        return rc;
    }
    if (a->inflight >= MAX_INFLIGHT) {
        return LR_EBUSY;
    }
    item_t *it = calloc(1, sizeof(*it));
    if (it == NULL) {
        return LR_ENOMEM;
    }
    it->type = CMD_PUBLISH;
    it->pub = lra_pub_new(exchange, routing_key, msg, cb, arg);
    if (it->pub == NULL) {
        free(it);
        return LR_ENOMEM;
    }
    it->pub->ev = it;
    a->inflight++;
    push_command(a, it);
    return 0;
}

void lr_amqp_cancel_consume(lr_amqp_t *a) {
    if (a == NULL || a->stopping || a->cancelled) {
        return;
    }
    item_t *it = calloc(1, sizeof(*it));
    if (it == NULL) {
        lr_error("amqp.oom", "out of memory cancelling consumers");
        return;
    }
    a->cancelled = true;
    it->type = CMD_CANCEL;
    push_command(a, it);
}

int lr_amqp_connected(const lr_amqp_t *a) { return a != NULL && a->connected && !a->stopping ? 1 : 0; }

void lr_amqp_stop(lr_amqp_t *a, long timeout_ms, void (*done)(void *arg), void *arg) {
    if (a == NULL) {
        return;
    }
    if (a->stopping) {
        lr_warn("amqp.stop_twice", "lr_amqp_stop called twice; ignoring the second call");
        return;
    }
    if (timeout_ms < 0) {
        timeout_ms = 0;
    }
    a->stopping = true;
    a->done = done;
    a->done_arg = arg;
    item_t *it = a->stop_item;
    a->stop_item = NULL;
    it->type = CMD_STOP;
    it->timeout_ms = timeout_ms;
    push_command(a, it);
    uv_timer_start(&a->stop_timer, stop_timer_cb, (uint64_t)timeout_ms + STOP_GRACE_MS, 1000);
}

/* ------------------------------------------------------------------------ */
/* Replies                                                                   */

static lr_metric_t *replies_metric(void) {
    /* Registering is idempotent and locked: the same family every time. */
    return lr_metric_counter("longrun_replies_total",
                             "Task outcomes for reply_to queues: sent (confirmed), failed, refused (not an "
                             "allowed queue).",
                             "outcome");
}

bool lr_amqp_reply_direct(const char *reply_to) {
    static const char direct[] = LR_AMQP_DIRECT_REPLY_TO;
    return reply_to != NULL && strncmp(reply_to, direct, sizeof(direct) - 1) == 0 &&
           (reply_to[sizeof(direct) - 1] == '\0' || reply_to[sizeof(direct) - 1] == '.');
}

int lr_amqp_reply_allowed(const char *reply_to, const char *prefixes, char *errbuf, size_t errlen) {
    const char *p = prefixes != NULL ? prefixes : "none";
    if (reply_to == NULL || reply_to[0] == '\0') {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "no reply_to");
    }
    if (strlen(reply_to) > MAX_SHORTSTR) {
        return lr_seterr(errbuf, errlen, LR_EPERM, "reply_to is longer than %d bytes", MAX_SHORTSTR);
    }
    if (strncmp(reply_to, "longrun.", 8) == 0) {
        return lr_seterr(errbuf, errlen, LR_EPERM,
                         "reply_to '%s' is one of longrun's own queues (longrun.*), never a reply queue", reply_to);
    }
    if (lr_amqp_reply_direct(reply_to)) {
        return 0;
    }
    while (strcmp(p, "none") != 0 && *p != '\0') {
        size_t n = strcspn(p, ",");
        if (n > 0 && strncmp(reply_to, p, n) == 0) {
            return 0;
        }
        p += n;
        p += *p == ',';
    }
    return lr_seterr(errbuf, errlen, LR_EPERM,
                     "reply_to '%s' is not an allowed reply queue (direct reply-to " LR_AMQP_DIRECT_REPLY_TO
                     ", or a name starting with LONGRUN_REPLY_TO_PREFIX=%s)",
                     reply_to, p);
}

static void reply_confirmed(int err, void *arg) {
    char *id = arg;
    if (err != 0) {
        lr_warn("task.reply_failed", "could not publish the outcome of task %s to reply_to: %s%s", id, lr_strerror(err),
                err == LR_EAMQP ? " (nacked, or returned: the queue does not exist)" : "");
    }
    lr_metric_inc1(replies_metric(), err == 0 ? "sent" : "failed");
    free(id);
}

int lr_amqp_publish_reply(lr_amqp_t *a, const char *prefixes, const char *reply_to, const char *correlation_id,
                          const char *task_id, const char *body, char *errbuf, size_t errlen) {
    lr_amqp_msg_t msg;
    char why[512];
    char *id;
    int rc = lr_amqp_reply_allowed(reply_to, prefixes, why, sizeof(why));
    if (rc != 0) {
        lr_warn("task.reply_refused", "the outcome of task %s is not published: %s", task_id, why);
        lr_metric_inc1(replies_metric(), "refused");
        return lr_seterr(errbuf, errlen, rc, "%s", why);
    }
    id = strdup(task_id);
    if (id == NULL) {
        lr_metric_inc1(replies_metric(), "failed");
        return 0;
    }
    memset(&msg, 0, sizeof(msg));
    msg.body = body;
    msg.body_len = strlen(body);
    msg.message_id = task_id;
    msg.correlation_id = correlation_id;
    msg.content_type = "application/json";
    msg.persistent = true;
    msg.mandatory = !lr_amqp_reply_direct(reply_to); /* no such queue: basic.return, logged */
    rc = lr_amqp_publish(a, "", reply_to, &msg, reply_confirmed, id);
    if (rc != 0) {
        reply_confirmed(rc, id);
    }
    return 0;
}
