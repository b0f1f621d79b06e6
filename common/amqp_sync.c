/*
 * amqp_sync.c - the blocking helpers (lr_amqp_sync_*) for programs without an
 * event loop, on the protocol code of amqp_conn.c (see amqp.c for the design).
 */
#include "amqp_int.h"

/* ------------------------------------------------------------------------ */
/* Blocking helpers                                                          */

struct lr_amqp_sync {
    conn_t c;
    url_t url;
};

int lr_amqp_sync_connect(lr_amqp_sync_t **out, const char *url, long timeout_ms, char *errbuf, size_t errlen) {
    lr_amqp_sync_t *s;
    char name[128], host[64] = "";
    int rc;
    if (out == NULL) {
        return LR_EINVAL;
    }
    *out = NULL;
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        return LR_ENOMEM;
    }
    rc = lra_url_parse(&s->url, url, errbuf, errlen);
    if (rc != 0) {
        free(s);
        return rc;
    }
    gethostname(host, sizeof(host) - 1);
    snprintf(name, sizeof(name), "%s@%s:%ld/sync",
#if defined(__GLIBC__)
             program_invocation_short_name,
#else
             "longrun",
#endif
             host, (long)getpid());
    /* Heartbeats off: a blocking helper does not read while idle. */
    rc = lra_conn_open(&s->c, &s->url, timeout_ms > 0 ? timeout_ms : CONNECT_TIMEOUT_MS, 0, name, errbuf, errlen);
    if (rc != 0) {
        lr_amqp_sync_close(s);
        return rc == LR_ENOMEM ? rc : LR_ECONN;
    }
    *out = s;
    return 0;
}

int lr_amqp_sync_declare(lr_amqp_sync_t *s, const char *const *queues, int delivery_limit, int max_length, char *errbuf,
                         size_t errlen) {
    if (s == NULL || s->c.st == NULL || s->c.broken) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "not connected");
    }
    if (!s->c.channel_open && lra_channel_recover(&s->c) != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot reopen the AMQP channel");
    }
    return lra_declare_topology(&s->c, queues, delivery_limit, max_length, errbuf, errlen);
}

/* One publish and its lra_confirm; *nacked tells a basic.nack apart from the
 * other failures. */
static int sync_publish_once(lr_amqp_sync_t *s, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg,
                             long timeout_ms, bool *nacked, char *errbuf, size_t errlen) {
    char detail[DETAIL_MAX];
    char returned[DETAIL_MAX] = "";
    int rc;
    if (s == NULL || s->c.st == NULL || s->c.broken) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "not connected");
    }
    if ((rc = lra_msg_validate(exchange, routing_key, msg, errbuf, errlen)) != 0) {
        return rc;
    }
    if (!s->c.channel_open && lra_channel_recover(&s->c) != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot reopen the AMQP channel");
    }
    errno = 0;
    int status = lra_send_publish(&s->c, exchange, routing_key, msg);
    if (status != AMQP_STATUS_OK) {
        int saved = errno;
        s->c.broken = true;
        return lr_seterr(errbuf, errlen, lra_status_err(status), "publish failed: %s",
                         lra_status_text(status, saved, detail, sizeof(detail)));
    }
    uint64_t seq = s->c.next_seq++;
    uint64_t deadline = lra_now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    for (;;) {
        amqp_frame_t f;
        uint64_t now = lra_now_ms();
        if (now >= deadline) {
            return lr_seterr(errbuf, errlen, LR_ETIMEOUT,
                             "no lra_confirm from the broker within %ld ms (the message may or may "
                             "not have been stored)",
                             timeout_ms);
        }
        detail[0] = '\0';
        rc = lra_wait_frame(&s->c, &f, (long)(deadline - now), detail, sizeof(detail));
        if (rc == LR_ETIMEOUT) {
            continue;
        }
        if (rc != 0) {
            return lr_seterr(errbuf, errlen, rc, "waiting for the lra_confirm: %s", detail);
        }
        if (f.frame_type != AMQP_FRAME_METHOD) {
            continue;
        }
        if (f.channel == 0) {
            rc = lra_handle_channel0(&s->c, &f, detail, sizeof(detail));
            if (rc != 0) {
                return lr_seterr(errbuf, errlen, rc, "%s", detail);
            }
            continue;
        }
        switch (f.payload.method.id) {
        case AMQP_BASIC_ACK_METHOD:
        case AMQP_BASIC_NACK_METHOD: {
            bool nack = f.payload.method.id == AMQP_BASIC_NACK_METHOD;
            uint64_t tag = nack ? ((const amqp_basic_nack_t *)f.payload.method.decoded)->delivery_tag
                                : ((const amqp_basic_ack_t *)f.payload.method.decoded)->delivery_tag;
            amqp_maybe_release_buffers(s->c.st);
            /* Only one publish is outstanding: a lra_confirm with tag >= seq
               (single or `multiple`) covers it; a lower tag is for an older
               publish whose wait timed out. */
            if (tag < seq) {
                continue;
            }
            if (nack) {
                *nacked = true;
                return lr_seterr(errbuf, errlen, LR_EAMQP,
                                 "the broker refused the message (basic.nack; queue full or "
                                 "unavailable?)");
            }
            if (returned[0] != '\0') {
                return lr_seterr(errbuf, errlen, LR_EAMQP,
                                 "the message could not be routed: exchange '%s' has no queue "
                                 "bound for routing key '%s' (%s)",
                                 exchange, routing_key, returned);
            }
            return 0;
        }
        case AMQP_BASIC_RETURN_METHOD: {
            const amqp_basic_return_t *m = f.payload.method.decoded;
            content_t ct;
            snprintf(returned, sizeof(returned), "%u %.*s", m->reply_code, (int)m->reply_text.len,
                     (const char *)m->reply_text.bytes);
            rc = lra_read_content(&s->c, 0, &ct, detail, sizeof(detail));
            amqp_maybe_release_buffers(s->c.st);
            if (rc != 0) {
                return lr_seterr(errbuf, errlen, rc, "%s", detail);
            }
            continue;
        }
        case AMQP_CHANNEL_CLOSE_METHOD: {
            const amqp_channel_close_t *m = f.payload.method.decoded;
            char text[DETAIL_MAX];
            unsigned code = m->reply_code;
            snprintf(text, sizeof(text), "%.*s", (int)m->reply_text.len, (const char *)m->reply_text.bytes);
            lra_send_channel_close_ok(&s->c);
            amqp_maybe_release_buffers(s->c.st);
            (void)lra_channel_recover(&s->c);
            return lr_seterr(errbuf, errlen, LR_EAMQP, "the broker rejected the publish: %u %s", code, text);
        }
        default: amqp_maybe_release_buffers(s->c.st); continue;
        }
    }
}

int lr_amqp_sync_publish(lr_amqp_sync_t *s, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg,
                         long timeout_ms, char *errbuf, size_t errlen) {
    /* A basic.nack means the broker did not take the message: RabbitMQ sends
       one on an internal error of the queue process (a quorum queue between
       leaders, a full queue).  The first is transient, so the publish is
       retried with a doubling pause while the deadline allows; a full queue
       still fails, a little later. */
    uint64_t deadline = lra_now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    long pause_ms = 50;
    for (int attempt = 1;; attempt++) {
        bool nacked = false;
        uint64_t now = lra_now_ms();
        long left = now < deadline ? (long)(deadline - now) : 0;
        int rc = sync_publish_once(s, exchange, routing_key, msg, left, &nacked, errbuf, errlen);
        if (rc == 0 || !nacked) {
            return rc;
        }
        now = lra_now_ms();
        if (attempt >= SYNC_NACK_ATTEMPTS || now + (uint64_t)pause_ms >= deadline) {
            /* refused every time: the queue is full (x-overflow=reject-publish) */
            return LR_EBUSY;
        }
        struct timespec ts = {.tv_sec = pause_ms / 1000, .tv_nsec = (pause_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
        pause_ms *= 2;
    }
}

int lr_amqp_sync_queue_info(lr_amqp_sync_t *s, const char *queue, uint32_t *messages, uint32_t *consumers, char *errbuf,
                            size_t errlen) {
    rpc_err_t e;
    if (s == NULL || s->c.st == NULL || s->c.broken) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "not connected");
    }
    if (queue == NULL || queue[0] == '\0' || strlen(queue) > MAX_SHORTSTR) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "invalid queue name");
    }
    if (!s->c.channel_open && lra_channel_recover(&s->c) != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot reopen the AMQP channel");
    }
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(s->c.st, CHANNEL, amqp_cstring_bytes(queue), 1, 0, 0, 0, amqp_empty_table);
    int rc = lra_rpc_check(&s->c, &e);
    if (rc != 0 || ok == NULL) {
        if (rc == LR_EAMQP) {
            (void)lra_channel_recover(&s->c);
            if (e.code == AMQP_NOT_FOUND) {
                return lr_seterr(errbuf, errlen, LR_ENOTFOUND, "queue %s does not exist", queue);
            }
        }
        return lr_seterr(errbuf, errlen, rc != 0 ? rc : LR_EAMQP, "queue %s: %s", queue, e.server);
    }
    if (messages != NULL) {
        *messages = ok->message_count;
    }
    if (consumers != NULL) {
        *consumers = ok->consumer_count;
    }
    amqp_maybe_release_buffers(s->c.st);
    return 0;
}

void lr_amqp_sync_close(lr_amqp_sync_t *s) {
    if (s == NULL) {
        return;
    }
    lra_conn_close(&s->c);
    lra_url_free(&s->url);
    free(s);
}
