/*
 * deadletter.c - messages that are not valid tasks (malformed JSON, over the
 * size limit, no id, a value PostgreSQL cannot store, a continuation for an
 * unknown task): recorded in dead_letters with their raw bytes and reason,
 * published to longrun.dlx for AMQP-side tooling, then acked.  Nothing is
 * dropped: a message that cannot be recorded is given back to the broker.
 *
 * The record may be refused by PostgreSQL for the very bytes that made the
 * message malformed; it is then written again in safe mode (the raw bytes,
 * the reason and the error only), so a malformed message can never fail its
 * own dead-letter record.
 *
 * Ownership: each message is a dead_msg_t that owns its delivery until the
 * ack.  Knows the pool and the broker only (not the worker).
 */
#include "core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store.h"
#include "text.h"
#include "wmetrics.h"

/* ------------------------------------------------------ malformed messages */

typedef struct dead_msg {
    lr_pg_pool_t *pg;
    lr_amqp_t *amqp;
    lr_amqp_delivery_t *d;
    char reason[32];
    char error[512];
    char key[256];
    bool safe; /* record only what PostgreSQL surely accepts */
} dead_msg_t;

/* Replaces every byte that is not part of valid UTF-8 with '?' (in place). */
static void utf8_scrub(char *s) {
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t k = lr_utf8_seq_len((unsigned char *)s + i, n - i);
        if (k == 0) {
            s[i++] = '?';
        } else {
            i += k;
        }
    }
}

static void dead_msg_free(dead_msg_t *m) {
    lr_amqp_delivery_free(m->d);
    free(m);
}

static void dead_msg_published(int err, void *arg) {
    dead_msg_t *m = arg;
    if (err != 0) {
        /* The record is committed; the DLX copy is for AMQP-side tooling.
         * Ack anyway: the dead letter is never lost, it is in PostgreSQL. */
        lr_warn("dead_letter.publish_failed", "could not publish dead letter %s to %s: %s", m->key, LR_AMQP_DLX,
                lr_strerror(err));
    }
    (void)lr_amqp_ack(m->amqp, m->d);
    dead_msg_free(m);
}

static void dead_msg_recorded(const lr_store_dead_message_res_t *res, void *arg);

static void dead_msg_record(dead_msg_t *m) {
    lr_amqp_delivery_t *d = m->d;
    lr_store_dead_message_args_t a;
    bool mid_ok;
    int rc;

    /* The raw bytes always go in (bytea); the parsed body, the message id
     * and the headers only when PostgreSQL will surely take them, and not at
     * all in safe mode (after the server refused them): a malformed message
     * must never fail its own dead-letter record. */
    mid_ok = !m->safe && d->message_id != NULL && lr_pg_text_ok(d->message_id, strlen(d->message_id));
    memset(&a, 0, sizeof(a));
    a.body = d->body;
    a.body_len = d->body_len;
    a.message_id = mid_ok ? d->message_id : NULL;
    a.queue = d->queue;
    a.reason = m->reason;
    a.error = m->error;
    a.headers_json = m->safe ? NULL : d->headers_json;
    a.delivery_count = d->delivery_count >= 0 ? (long long)d->delivery_count : -1;
    a.body_is_json = !m->safe && lr_json_storable(d->body, d->body_len);
    a.task_id = (mid_ok && lr_uuid_valid(d->message_id)) ? d->message_id : NULL;
    rc = lr_store_dead_message(m->pg, &a, dead_msg_recorded, m);
    if (rc != 0) {
        lr_error("dead_letter.query_failed", "cannot queue the dead-letter record: %s; requeueing", lr_strerror(rc));
        (void)lr_amqp_reject(m->amqp, d, true);
        dead_msg_free(m);
    }
}

static void dead_msg_recorded(const lr_store_dead_message_res_t *res, void *arg) {
    dead_msg_t *m = arg;
    lr_amqp_msg_t msg;
    const char *headers[9];
    int rc;

    if (res->err != 0) {
        if (res->err == LR_EDB && !m->safe) {
            lr_warn("dead_letter.safe_mode",
                    "dead letter (%s) refused by PostgreSQL (%s); recording the "
                    "raw bytes only",
                    m->reason, res->errmsg);
            m->safe = true;
            dead_msg_record(m);
            return;
        }
        lr_error("dead_letter.record_failed", "cannot record dead letter (%s): %s; requeueing", m->reason, res->errmsg);
        (void)lr_amqp_reject(m->amqp, m->d, true);
        dead_msg_free(m);
        return;
    }
    snprintf(m->key, sizeof(m->key), "%s", res->key);
    lr_metric_inc1(lr_wm.dead_letters, m->reason);
    lr_warn("message.dead_lettered", "message %s from %s dead-lettered: %s: %s",
            m->d->message_id != NULL ? m->d->message_id : "(no message_id)", m->d->queue != NULL ? m->d->queue : "?",
            m->reason, m->error);
    headers[0] = "x-longrun-dead-letter-key";
    headers[1] = m->key;
    headers[2] = "x-longrun-reason";
    headers[3] = m->reason;
    headers[4] = "x-longrun-error";
    headers[5] = m->error;
    headers[6] = "x-longrun-queue";
    headers[7] = m->d->queue != NULL ? m->d->queue : "";
    headers[8] = NULL;
    memset(&msg, 0, sizeof(msg));
    msg.body = m->d->body;
    msg.body_len = m->d->body_len;
    msg.message_id = m->d->message_id;
    msg.content_type = m->d->content_type;
    msg.persistent = true;
    msg.headers = headers;
    rc = lr_amqp_publish(m->amqp, LR_AMQP_DLX, "", &msg, dead_msg_published, m);
    if (rc != 0) {
        dead_msg_published(rc, m);
    }
}

void lr_deadletter_message(lr_pg_pool_t *pg, lr_amqp_t *amqp, lr_amqp_delivery_t *d, const char *reason,
                           const char *error) {
    dead_msg_t *m = calloc(1, sizeof(*m));
    if (m == NULL) {
        (void)lr_amqp_reject(amqp, d, true);
        lr_amqp_delivery_free(d);
        return;
    }
    m->pg = pg;
    m->amqp = amqp;
    m->d = d;
    snprintf(m->reason, sizeof(m->reason), "%s", reason);
    snprintf(m->error, sizeof(m->error), "%s", error);
    utf8_scrub(m->error); /* it may quote (or cut) bytes of the body */
    dead_msg_record(m);
}
