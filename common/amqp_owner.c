/*
 * amqp_owner.c - the owner thread of an lr_amqp_t and its two queues (see
 * amqp.c for the design).
 */
#include "amqp_int.h"

/* ------------------------------------------------------------------------ */
/* The owner thread and its queues                                           */

void lra_pub_free(pub_t *p) {
    if (p == NULL) {
        return;
    }
    free(p->exchange);
    free(p->routing_key);
    free(p->body);
    free(p->strs);
    free(p);
}

/* Deep copy of a publish (validated already). */
pub_t *lra_pub_new(const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg, lr_amqp_confirm_cb cb,
                   void *arg) {
    pub_t *p = calloc(1, sizeof(*p));
    size_t nh = 0, bytes = 0;
    const char *ids[4] = {msg->message_id, msg->correlation_id, msg->reply_to, msg->content_type};
    if (p == NULL) {
        return NULL;
    }
    p->cb = cb;
    p->arg = arg;
    p->exchange = strdup(exchange);
    p->routing_key = strdup(routing_key);
    p->body = malloc(msg->body_len + 1);
    if (p->exchange == NULL || p->routing_key == NULL || p->body == NULL) {
        goto fail;
    }
    if (msg->body_len > 0) {
        memcpy(p->body, msg->body, msg->body_len);
    }
    p->body[msg->body_len] = '\0';
    p->hash = lra_fnv1a(FNV_INIT, p->body, msg->body_len);
    for (int i = 0; i < 4; i++) {
        bytes += ids[i] != NULL ? strlen(ids[i]) + 1 : 0;
    }
    if (msg->headers != NULL) {
        for (const char *const *h = msg->headers; h[0] != NULL; h += 2) {
            nh++;
            bytes += strlen(h[0]) + strlen(h[1]) + 2;
        }
    }
    size_t ptrs = (2 * nh + 1) * sizeof(char *);
    p->strs = malloc(ptrs + bytes + 1);
    if (p->strs == NULL) {
        goto fail;
    }
    p->headers = (const char **)(void *)p->strs;
    char *w = p->strs + ptrs;
    const char *copies[4];
    for (int i = 0; i < 4; i++) {
        copies[i] = NULL;
        if (ids[i] != NULL) {
            size_t n = strlen(ids[i]) + 1;
            memcpy(w, ids[i], n);
            copies[i] = w;
            w += n;
        }
    }
    for (size_t i = 0; i < nh; i++) {
        for (int j = 0; j < 2; j++) {
            size_t n = strlen(msg->headers[2 * i + (size_t)j]) + 1;
            memcpy(w, msg->headers[2 * i + (size_t)j], n);
            p->headers[2 * i + (size_t)j] = w;
            w += n;
        }
    }
    p->headers[2 * nh] = NULL;
    p->msg = *msg;
    p->msg.body = p->body;
    p->msg.message_id = copies[0];
    p->msg.correlation_id = copies[1];
    p->msg.reply_to = copies[2];
    p->msg.content_type = copies[3];
    p->msg.headers = nh > 0 ? p->headers : NULL;
    return p;
fail:
    lra_pub_free(p);
    return NULL;
}

static int ring_push(ring_t *r, pub_t *p) {
    if (r->n == 0) {
        r->base = p->seq;
        r->head = 0;
    }
    if (r->n == r->cap) {
        size_t cap = r->cap == 0 ? 64 : r->cap * 2;
        pub_t **v = malloc(cap * sizeof(*v));
        if (v == NULL) {
            return LR_ENOMEM;
        }
        for (size_t i = 0; i < r->n; i++) {
            v[i] = r->v[(r->head + i) % r->cap];
        }
        free(r->v);
        r->v = v;
        r->cap = cap;
        r->head = 0;
    }
    r->v[(r->head + r->n) % r->cap] = p;
    r->n++;
    return 0;
}

static pub_t **ring_at(ring_t *r, size_t i) { return &r->v[(r->head + i) % r->cap]; }

static void ring_trim(ring_t *r) {
    while (r->n > 0 && r->v[r->head] == NULL) {
        r->head = (r->head + 1) % r->cap;
        r->n--;
        r->base++;
    }
}

/* Removes and returns the oldest item of a FIFO list, or NULL. */
item_t *lra_item_pop(lr_list_t *l) {
    lr_list_t *n = lr_list_pop_front(l);
    return n != NULL ? lr_list_entry(n, item_t, link) : NULL;
}

void lra_item_free(item_t *it) {
    if (it == NULL) {
        return;
    }
    lra_pub_free(it->pub);
    lr_amqp_delivery_free(it->delivery);
    free(it->detail);
    free(it);
}

static const char *const owner_state_names[] = {"disconnected", "connecting", "ready", "draining", "closed"};

#define set_state(a, s) set_state_at((a), (s), __LINE__)
static void set_state_at(lr_amqp_t *a, owner_state_t s, int line) {
    if (a->state != s) {
        lr_debug("amqp.state", "%s -> %s (line %d)", owner_state_names[a->state], owner_state_names[s], line);
        a->state = s;
    }
}

/* Owner: queue an event for the next flush. */
static void emit(lr_amqp_t *a, item_t *it) { lr_list_push_back(&a->t_events, &it->link); }

/* Owner: hand queued events to the loop and wake it. */
static void flush_events(lr_amqp_t *a) {
    if (lr_list_empty(&a->t_events)) {
        return;
    }
    pthread_mutex_lock(&a->mu);
    lr_list_splice_back(&a->events, &a->t_events);
    pthread_mutex_unlock(&a->mu);
    uv_async_send(&a->async);
}

/* Owner: complete a publish (its command item becomes the outcome event). */
static void complete_pub(lr_amqp_t *a, pub_t *p, int result) {
    item_t *it = p->ev;
    p->ev = NULL;
    p->result = result;
    memset(it, 0, sizeof(*it));
    it->type = EV_CONFIRM;
    it->pub = p;
    emit(a, it);
}

static void emit_state(lr_amqp_t *a, int connected, const char *detail) {
    item_t *it = calloc(1, sizeof(*it));
    if (it == NULL) {
        lr_error("amqp.oom", "out of memory reporting a connection state change");
        return;
    }
    it->type = EV_STATE;
    it->connected = connected;
    it->generation = a->t_generation;
    it->detail = strdup(detail);
    if (it->detail == NULL) {
        lr_error("amqp.oom", "out of memory reporting a connection state change");
        free(it);
        return;
    }
    emit(a, it);
    flush_events(a);
}

/* Owner: every unconfirmed publish gets err (connection lost / stopping). */
static void fail_unconfirmed(lr_amqp_t *a, int err) {
    ring_t *r = &a->unconfirmed;
    for (size_t i = 0; i < r->n; i++) {
        pub_t **pp = ring_at(r, i);
        if (*pp != NULL) {
            complete_pub(a, *pp, err);
            *pp = NULL;
        }
    }
    r->n = 0;
    r->head = 0;
}

/* Owner: basic.ack / basic.nack from the broker. */
void lra_confirm(lr_amqp_t *a, uint64_t tag, bool multiple, int err) {
    ring_t *r = &a->unconfirmed;
    if (multiple) {
        while (r->n > 0 && r->base <= tag) {
            pub_t *p = r->v[r->head];
            if (p != NULL) {
                complete_pub(a, p, p->returned ? LR_EAMQP : err);
                r->v[r->head] = NULL;
            }
            ring_trim(r);
        }
    } else if (r->n > 0 && tag >= r->base && tag < r->base + r->n) {
        pub_t **pp = ring_at(r, (size_t)(tag - r->base));
        if (*pp != NULL) {
            complete_pub(a, *pp, (*pp)->returned ? LR_EAMQP : err);
            *pp = NULL;
        }
        ring_trim(r);
    } else {
        lr_debug("amqp.unknown_confirm", "lra_confirm for unknown sequence number %" PRIu64, tag);
    }
}

/* Owner: basic.return for a mandatory publish that could not be routed. */
static int handle_return(lr_amqp_t *a, const amqp_basic_return_t *m, char *detail, size_t dlen) {
    char exchange[MAX_SHORTSTR + 1], rk[MAX_SHORTSTR + 1], text[DETAIL_MAX];
    content_t ct;
    snprintf(exchange, sizeof(exchange), "%.*s", (int)m->exchange.len, (const char *)m->exchange.bytes);
    snprintf(rk, sizeof(rk), "%.*s", (int)m->routing_key.len, (const char *)m->routing_key.bytes);
    snprintf(text, sizeof(text), "%u %.*s", m->reply_code, (int)m->reply_text.len, (const char *)m->reply_text.bytes);
    int rc = lra_read_content(&a->conn, 0, &ct, detail, dlen);
    if (rc != 0) {
        return rc;
    }
    ring_t *r = &a->unconfirmed;
    for (size_t i = 0; i < r->n; i++) {
        pub_t *p = *ring_at(r, i);
        if (p != NULL && p->msg.mandatory && !p->returned && p->hash == ct.hash && p->msg.body_len == ct.total_len &&
            strcmp(p->exchange, exchange) == 0 && strcmp(p->routing_key, rk) == 0) {
            p->returned = true;
            lr_warn("amqp.returned",
                    "the broker returned a message published to exchange '%s' with routing "
                    "key '%s': %s",
                    exchange, rk, text);
            return 0;
        }
    }
    lr_warn("amqp.returned_unknown", "basic.return (%s) for exchange '%s' routing key '%s' matches no pending publish",
            text, exchange, rk);
    return 0;
}

/* Owner: basic.deliver -> EV_DELIVERY. */
static int handle_deliver(lr_amqp_t *a, const amqp_basic_deliver_t *m, char *detail, size_t dlen) {
    content_t ct;
    int rc = lra_read_content(&a->conn, a->t_stop ? 0 : LR_AMQP_MAX_BODY, &ct, detail, dlen);
    if (rc != 0) {
        return rc;
    }
    if (a->t_stop) {
        /* Stopping: the message goes back to the queue when we close. */
        return 0;
    }
    const char *queue = NULL;
    /* Consumer tags are "lr.<index>" (see start_consuming). */
    if (m->consumer_tag.len > 3 && memcmp(m->consumer_tag.bytes, "lr.", 3) == 0) {
        size_t idx = 0;
        for (size_t i = 3; i < m->consumer_tag.len; i++) {
            idx = idx * 10 + (size_t)(((const char *)m->consumer_tag.bytes)[i] - '0');
        }
        if (idx < a->nconsume) {
            queue = a->consume[idx];
        }
    }
    lr_amqp_delivery_t *d = calloc(1, sizeof(*d));
    item_t *it = calloc(1, sizeof(*it));
    if (d == NULL || it == NULL) {
        free(ct.body);
        free(d);
        free(it);
        return LR_ENOMEM;
    }
    const amqp_basic_properties_t *p = ct.props;
    d->generation = a->t_generation;
    d->delivery_tag = m->delivery_tag;
    d->queue = lra_dup_str(queue != NULL ? queue : "");
    d->exchange = lra_dup_bytes(m->exchange);
    d->routing_key = lra_dup_bytes(m->routing_key);
    d->redelivered = m->redelivered != 0;
    d->body = ct.body;
    d->body_len = ct.body_len;
    d->body_truncated = ct.truncated;
    d->delivery_count = -1;
    if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
        d->message_id = lra_dup_bytes(p->message_id);
    }
    if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) {
        d->correlation_id = lra_dup_bytes(p->correlation_id);
    }
    if (p->_flags & AMQP_BASIC_REPLY_TO_FLAG) {
        d->reply_to = lra_dup_bytes(p->reply_to);
    }
    if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) {
        d->content_type = lra_dup_bytes(p->content_type);
    }
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
        d->headers_json = lra_headers_to_json(&p->headers);
        d->delivery_count = lra_header_int(&p->headers, "x-delivery-count");
    }
    if (d->queue == NULL || d->exchange == NULL || d->routing_key == NULL) {
        lr_amqp_delivery_free(d);
        free(it);
        return LR_ENOMEM;
    }
    if (ct.truncated) {
        lr_warn("amqp.body_truncated", "message %s on queue %s has a %" PRIu64 "-byte body; delivered truncated to %d",
                d->message_id != NULL ? d->message_id : "(no id)", d->queue, ct.total_len, LR_AMQP_MAX_BODY);
    }
    it->type = EV_DELIVERY;
    it->delivery = d;
    emit(a, it);
    return 0;
}

/* Owner: one frame read outside an RPC.  Returns 0 or an error that ends
 * the connection (detail says why). */
static int handle_frame(lr_amqp_t *a, const amqp_frame_t *f, char *detail, size_t dlen) {
    if (f->frame_type != AMQP_FRAME_METHOD) {
        lr_debug("amqp.stray_frame", "ignoring frame type %u on channel %u", (unsigned)f->frame_type,
                 (unsigned)f->channel);
        return 0;
    }
    if (f->channel == 0) {
        return lra_handle_channel0(&a->conn, f, detail, dlen);
    }
    const void *m = f->payload.method.decoded;
    switch (f->payload.method.id) {
    case AMQP_BASIC_DELIVER_METHOD: return handle_deliver(a, m, detail, dlen);
    case AMQP_BASIC_ACK_METHOD: {
        const amqp_basic_ack_t *ack = m;
        lra_confirm(a, ack->delivery_tag, ack->multiple != 0, 0);
        return 0;
    }
    case AMQP_BASIC_NACK_METHOD: {
        const amqp_basic_nack_t *nack = m;
        lr_warn("amqp.nacked", "the broker refused publish #%" PRIu64 "%s", nack->delivery_tag,
                nack->multiple ? " and earlier" : "");
        lra_confirm(a, nack->delivery_tag, nack->multiple != 0, LR_EAMQP);
        return 0;
    }
    case AMQP_BASIC_RETURN_METHOD: return handle_return(a, m, detail, dlen);
    case AMQP_CHANNEL_CLOSE_METHOD: {
        const amqp_channel_close_t *cc = m;
        snprintf(detail, dlen, "the broker closed the channel: %u %.*s", cc->reply_code, (int)cc->reply_text.len,
                 (const char *)cc->reply_text.bytes);
        lra_send_channel_close_ok(&a->conn);
        return LR_EAMQP;
    }
    case AMQP_BASIC_CANCEL_METHOD: {
        const amqp_basic_cancel_t *bc = m;
        snprintf(detail, dlen,
                 "the broker cancelled consumer %.*s (its queue was deleted or moved); "
                 "reconnecting to declare and consume again",
                 (int)bc->consumer_tag.len, (const char *)bc->consumer_tag.bytes);
        return LR_EAMQP;
    }
    default: lr_debug("amqp.ignored_method", "ignoring method 0x%08x", (unsigned)f->payload.method.id); return 0;
    }
}

static int start_consuming(lr_amqp_t *a, char *detail, size_t dlen) {
    rpc_err_t e;
    int rc;
    if (a->nconsume == 0 || a->t_cancelled) {
        return 0;
    }
    /* Per-consumer prefetch: quorum queues refuse global (per-channel) QoS. */
    amqp_basic_qos(a->conn.st, CHANNEL, 0, (uint16_t)a->prefetch, 0);
    if ((rc = lra_rpc_check(&a->conn, &e)) != 0) {
        return lr_seterr(detail, dlen, rc, "basic.qos failed: %s", e.server);
    }
    for (size_t i = 0; i < a->nconsume; i++) {
        char tag[32];
        snprintf(tag, sizeof(tag), "lr.%zu", i);
        amqp_basic_consume(a->conn.st, CHANNEL, amqp_cstring_bytes(a->consume[i]), amqp_cstring_bytes(tag), 0, 0, 0,
                           amqp_empty_table);
        if ((rc = lra_rpc_check(&a->conn, &e)) != 0) {
            if (e.code == AMQP_NOT_FOUND) {
                return lr_seterr(detail, dlen, rc, "cannot consume from queue %s: it does not exist", a->consume[i]);
            }
            return lr_seterr(detail, dlen, rc, "cannot consume from queue %s: %s", a->consume[i], e.server);
        }
    }
    return 0;
}

static int stop_consuming(lr_amqp_t *a, char *detail, size_t dlen) {
    rpc_err_t e;
    for (size_t i = 0; i < a->nconsume; i++) {
        char tag[32];
        snprintf(tag, sizeof(tag), "lr.%zu", i);
        amqp_basic_cancel(a->conn.st, CHANNEL, amqp_cstring_bytes(tag));
        int rc = lra_rpc_check(&a->conn, &e);
        if (rc != 0) {
            return lr_seterr(detail, dlen, rc, "basic.cancel failed: %s", e.server);
        }
    }
    return 0;
}

/* Owner: run one command.  connected: whether the session is usable.
 * Returns 0 or a connection-ending error. */
static int run_command(lr_amqp_t *a, item_t *it, bool connected, char *detail, size_t dlen) {
    int rc = 0;
    switch (it->type) {
    case CMD_ACK:
    case CMD_REJECT:
        if (!connected || it->generation != a->t_generation) {
            lr_debug("amqp.stale_ack", "dropping %s of delivery %" PRIu64 " from generation %" PRIu64,
                     it->type == CMD_ACK ? "ack" : "reject", it->tag, it->generation);
            break;
        }
        errno = 0;
        rc = it->type == CMD_ACK ? amqp_basic_ack(a->conn.st, CHANNEL, it->tag, 0)
                                 : amqp_basic_reject(a->conn.st, CHANNEL, it->tag, it->requeue ? 1 : 0);
        if (rc != AMQP_STATUS_OK) {
            char buf[256];
            int saved = errno;
            a->conn.broken = true;
            snprintf(detail, dlen, "sending %s failed: %s", it->type == CMD_ACK ? "ack" : "reject",
                     lra_status_text(rc, saved, buf, sizeof(buf)));
            rc = LR_ECONN;
        }
        break;
    case CMD_PUBLISH: {
        /* it stays with p (p->ev) as its future outcome event. */
        pub_t *p = it->pub;
        it->pub = NULL;
        if (!connected) {
            complete_pub(a, p, LR_ECONN);
            return 0;
        }
        errno = 0;
        int status = lra_send_publish(&a->conn, p->exchange, p->routing_key, &p->msg);
        if (status != AMQP_STATUS_OK) {
            char buf[256];
            int saved = errno;
            a->conn.broken = true;
            snprintf(detail, dlen, "publish failed: %s", lra_status_text(status, saved, buf, sizeof(buf)));
            complete_pub(a, p, LR_ECONN);
            return LR_ECONN;
        }
        free(p->body);
        p->body = NULL;
        p->msg.body = NULL;
        p->seq = a->conn.next_seq++;
        if (ring_push(&a->unconfirmed, p) != 0) {
            /* It was sent; we just cannot track it.  Report the unknown. */
            complete_pub(a, p, LR_ECONN);
        }
        return 0;
    }
    case CMD_CANCEL:
        if (!a->t_cancelled) {
            a->t_cancelled = true;
            if (connected) {
                rc = stop_consuming(a, detail, dlen);
            }
        }
        break;
    case CMD_STOP:
        a->t_stop = true;
        a->t_stop_deadline = lra_now_ms() + (uint64_t)(it->timeout_ms > 0 ? it->timeout_ms : 0);
        if (connected) {
            /* From here on a silent broker must not hold the stop for the
               full RPC timeout. */
            long ms = it->timeout_ms < 200 ? 200 : it->timeout_ms;
            struct timeval tv = lra_ms_to_tv(ms < CLOSE_TIMEOUT_MS ? ms : CLOSE_TIMEOUT_MS);
            amqp_set_rpc_timeout(a->conn.st, &tv);
            set_state(a, OWNER_DRAINING);
            if (!a->t_cancelled) {
                a->t_cancelled = true;
                rc = stop_consuming(a, detail, dlen);
            }
        }
        break;
    default: break;
    }
    lra_item_free(it);
    return rc;
}

/* Owner: take new commands from the loop (and reset the eventfd). */
static void take_commands(lr_amqp_t *a) {
    pthread_mutex_lock(&a->mu);
    if (a->wake_armed) {
        uint64_t v;
        ssize_t n = read(a->wake_fd, &v, sizeof(v));
        (void)n;
        a->wake_armed = false;
    }
    lr_list_splice_back(&a->t_cmds, &a->cmds);
    pthread_mutex_unlock(&a->mu);
}

/* Owner: run up to CMD_BATCH commands. */
static int run_commands(lr_amqp_t *a, bool connected, char *detail, size_t dlen) {
    take_commands(a);
    for (int i = 0; i < CMD_BATCH; i++) {
        item_t *it = lra_item_pop(&a->t_cmds);
        if (it == NULL) {
            break;
        }
        int rc = run_command(a, it, connected, detail, dlen);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

/* Owner: sleep until fd is readable, a command arrives, or ms pass. */
static void wait_for_work(lr_amqp_t *a, int fd, long ms) {
    struct pollfd p[2];
    int n = 0;
    p[n].fd = a->wake_fd;
    p[n].events = POLLIN;
    n++;
    if (fd >= 0) {
        p[n].fd = fd;
        p[n].events = POLLIN;
        n++;
    }
    if (poll(p, (nfds_t)n, (int)ms) < 0 && errno != EINTR) {
        lr_warn("amqp.poll", "poll failed: errno %d", errno);
    }
}

/* Owner: the connected session.  Returns 0 after a requested stop, or the
 * error that ended the connection (detail says why). */
static int session_run(lr_amqp_t *a, char *detail, size_t dlen) {
    int rc;
    for (;;) {
        rc = run_commands(a, true, detail, dlen);
        if (rc != 0) {
            return rc;
        }
        if (a->t_stop && (a->unconfirmed.n == 0 || lra_now_ms() >= a->t_stop_deadline)) {
            flush_events(a);
            return 0;
        }
        /* Read what is available without blocking (rabbitmq-c may hold
           frames in its buffers that poll() cannot see). */
        bool idle = true;
        int nframes = 0;
        struct timeval zero = {0, 0};
        for (; nframes < FRAME_BATCH; nframes++) {
            amqp_frame_t f;
            char buf[256];
            errno = 0;
            int status = amqp_simple_wait_frame_noblock(a->conn.st, &f, &zero);
            int saved = errno;
            if (status == AMQP_STATUS_TIMEOUT) {
                break;
            }
            if (status != AMQP_STATUS_OK) {
                a->conn.broken = true;
                snprintf(detail, dlen, "%s", lra_status_text(status, saved, buf, sizeof(buf)));
                return lra_status_err(status);
            }
            idle = false;
            rc = handle_frame(a, &f, detail, dlen);
            amqp_maybe_release_buffers(a->conn.st);
            if (rc != 0) {
                return rc;
            }
        }
        flush_events(a);
        if (!idle || !lr_list_empty(&a->t_cmds)) {
            continue;
        }
        long wait = IDLE_TICK_MS;
        if (a->t_stop) {
            uint64_t now = lra_now_ms();
            wait = a->t_stop_deadline > now ? (long)(a->t_stop_deadline - now) : 0;
            wait = wait < IDLE_TICK_MS ? wait : IDLE_TICK_MS;
        }
        uint64_t before = lra_now_ms();
        wait_for_work(a, amqp_get_sockfd(a->conn.st), wait);
        if (lra_now_ms() - before >= (uint64_t)wait) {
            /* Idle tick: a short wait lets rabbitmq-c send a heartbeat and
               notice a broker that went silent (a zero timeout cannot). */
            amqp_frame_t f;
            char buf[256];
            struct timeval tick = {0, 1000};
            errno = 0;
            int status = amqp_simple_wait_frame_noblock(a->conn.st, &f, &tick);
            int saved = errno;
            if (status == AMQP_STATUS_OK) {
                rc = handle_frame(a, &f, detail, dlen);
                amqp_maybe_release_buffers(a->conn.st);
                if (rc != 0) {
                    return rc;
                }
            } else if (status != AMQP_STATUS_TIMEOUT) {
                a->conn.broken = true;
                snprintf(detail, dlen, "%s", lra_status_text(status, saved, buf, sizeof(buf)));
                return lra_status_err(status);
            }
        }
    }
}

static void set_kick_fd(lr_amqp_t *a, int fd) {
    pthread_mutex_lock(&a->mu);
    a->kick_fd = fd;
    pthread_mutex_unlock(&a->mu);
}

/* Owner: connect, declare, consume. */
static int session_open(lr_amqp_t *a, char *detail, size_t dlen) {
    int rc = lra_conn_open(&a->conn, &a->url, CONNECT_TIMEOUT_MS, OWNER_HEARTBEAT_S, a->conn_name, detail, dlen);
    if (rc != 0) {
        return rc;
    }
    set_kick_fd(a, amqp_get_sockfd(a->conn.st));
    rc =
        lra_declare_topology(&a->conn, (const char *const *)a->declare, a->delivery_limit, a->max_length, detail, dlen);
    if (rc != 0) {
        return rc;
    }
    return start_consuming(a, detail, dlen);
}

static void session_close(lr_amqp_t *a) {
    if (a->conn.st == NULL) {
        return;
    }
    /* Clear the kick fd first, so that stop's last resort can never hit a
       reused descriptor. */
    set_kick_fd(a, -1);
    lra_conn_close(&a->conn);
}

static uint64_t rng_next(lr_amqp_t *a) {
    a->rng ^= a->rng << 13;
    a->rng ^= a->rng >> 7;
    a->rng ^= a->rng << 17;
    return a->rng;
}

/* 250 ms .. 10 s, doubling, "equal jitter" (half fixed, half random). */
static long backoff_ms(lr_amqp_t *a, unsigned attempt) {
    uint64_t cap = BACKOFF_MIN_MS;
    for (unsigned i = 0; i < attempt && cap < BACKOFF_MAX_MS; i++) {
        cap *= 2;
    }
    if (cap > BACKOFF_MAX_MS) {
        cap = BACKOFF_MAX_MS;
    }
    uint64_t d = cap / 2 + rng_next(a) % (cap / 2 + 1);
    return (long)(d < BACKOFF_MIN_MS ? BACKOFF_MIN_MS : d);
}

/* Owner: wait before reconnecting, still answering commands (publishes
 * fail with LR_ECONN, acks are dropped, stop ends the wait). */
static void disconnected_wait(lr_amqp_t *a, long ms) {
    char detail[DETAIL_MAX];
    uint64_t deadline = lra_now_ms() + (uint64_t)ms;
    for (;;) {
        do {
            /* Not connected: cannot fail (publishes complete with LR_ECONN). */
            (void)run_commands(a, false, detail, sizeof(detail));
            flush_events(a);
        } while (!lr_list_empty(&a->t_cmds));
        uint64_t now = lra_now_ms();
        if (a->t_stop || now >= deadline) {
            return;
        }
        wait_for_work(a, -1, (long)(deadline - now));
    }
}

void *lra_owner_main(void *arg) {
    lr_amqp_t *a = arg;
    char detail[DETAIL_MAX];
    unsigned attempt = 0;

    while (!a->t_stop) {
        set_state(a, OWNER_CONNECTING);
        detail[0] = '\0';
        int rc = session_open(a, detail, sizeof(detail));
        if (rc == 0) {
            attempt = 0;
            a->t_generation++;
            set_state(a, OWNER_READY);
            char msg[DETAIL_MAX];
            snprintf(msg, sizeof(msg), "connected to %s", a->url.redacted);
            lr_info("amqp.connected", "%s (generation %" PRIu64 ")", msg, a->t_generation);
            emit_state(a, 1, msg);
            rc = session_run(a, detail, sizeof(detail));
        }
        if (a->t_stop) {
            /* Requested stop (even if the connection failed while draining):
               what is still unconfirmed is abandoned, as amqp.h promises. */
            fail_unconfirmed(a, LR_ESHUTDOWN);
            session_close(a);
            break;
        }
        fail_unconfirmed(a, LR_ECONN);
        session_close(a);
        set_state(a, OWNER_DISCONNECTED);
        if (detail[0] == '\0') {
            snprintf(detail, sizeof(detail), "%s", lr_strerror(rc));
        }
        if (a->t_stop) {
            break;
        }
        long delay = backoff_ms(a, rc == LR_ECONFIG ? 100 : attempt);
        attempt++;
        lr_warn("amqp.disconnected", "%s: %s; retrying in %ld ms", a->url.redacted, detail, delay);
        emit_state(a, 0, detail);
        disconnected_wait(a, delay);
    }

    /* Whatever the loop queued before its stop command completes now. */
    for (;;) {
        take_commands(a);
        item_t *it = lra_item_pop(&a->t_cmds);
        if (it == NULL) {
            break;
        }
        if (it->type == CMD_PUBLISH) {
            pub_t *p = it->pub;
            it->pub = NULL;
            complete_pub(a, p, LR_ESHUTDOWN);
            continue;
        }
        lra_item_free(it);
    }
    set_state(a, OWNER_CLOSED);
    item_t *it = a->stopped_item; /* preallocated: this event must not fail */
    a->stopped_item = NULL;
    it->type = EV_STOPPED;
    emit(a, it);
    flush_events(a);
    return NULL;
}
