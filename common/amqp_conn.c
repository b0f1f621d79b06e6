/*
 * amqp_conn.c - the connection wrapper, publishing and topology that the owner
 * thread and the blocking helpers share (see amqp.c for the design).
 */
#include "amqp_int.h"

/* ------------------------------------------------------------------------ */
/* Connection wrapper shared by the owner thread and the blocking helpers    */

int lra_status_err(int status) { return status == AMQP_STATUS_NO_MEMORY ? LR_ENOMEM : LR_ECONN; }

void lra_send_channel_close_ok(conn_t *c) {
    amqp_channel_close_ok_t ok;
    memset(&ok, 0, sizeof(ok));
    if (amqp_send_method(c->st, CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) != AMQP_STATUS_OK) {
        c->broken = true;
    }
    c->channel_open = false;
}

static void send_connection_close_ok(conn_t *c) {
    amqp_connection_close_ok_t ok;
    memset(&ok, 0, sizeof(ok));
    (void)amqp_send_method(c->st, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
    c->broken = true;
}

/* Checks the reply of the synchronous method just called.  A channel.close
 * or connection.close from the broker is acknowledged here so that the
 * protocol state stays consistent.  Returns 0, LR_EAMQP (the channel is now
 * closed; the connection is fine), LR_ECONN (the connection is gone) or
 * LR_ENOMEM. */
int lra_rpc_check(conn_t *c, rpc_err_t *e) {
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c->st);
    e->code = 0;
    e->server[0] = '\0';
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: return 0;
    case AMQP_RESPONSE_NONE:
        snprintf(e->server, sizeof(e->server), "no reply from the broker");
        c->broken = true;
        return LR_ECONN;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(e->server, sizeof(e->server), "%s", amqp_error_string2(r.library_error));
        c->broken = true;
        return lra_status_err(r.library_error);
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            const amqp_channel_close_t *m = r.reply.decoded;
            e->code = m->reply_code;
            snprintf(e->server, sizeof(e->server), "%.*s", (int)m->reply_text.len, (const char *)m->reply_text.bytes);
            lra_send_channel_close_ok(c);
            return c->broken ? LR_ECONN : LR_EAMQP;
        }
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            const amqp_connection_close_t *m = r.reply.decoded;
            e->code = m->reply_code;
            snprintf(e->server, sizeof(e->server), "%.*s", (int)m->reply_text.len, (const char *)m->reply_text.bytes);
            send_connection_close_ok(c);
            return LR_ECONN;
        }
        snprintf(e->server, sizeof(e->server), "unexpected method 0x%08x from the broker", (unsigned)r.reply.id);
        c->broken = true;
        return LR_ECONN;
    }
    c->broken = true;
    return LR_ECONN;
}

/* Opens CHANNEL and puts it in lra_confirm mode; numbering restarts at 1. */
static int channel_setup(conn_t *c, char *errbuf, size_t errlen) {
    rpc_err_t e;
    int rc;
    amqp_channel_open(c->st, CHANNEL);
    rc = lra_rpc_check(c, &e);
    if (rc != 0) {
        c->broken = true;
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot open an AMQP channel: %s", e.server);
    }
    c->channel_open = true;
    amqp_confirm_select(c->st, CHANNEL);
    rc = lra_rpc_check(c, &e);
    if (rc != 0) {
        c->broken = true;
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot enable publisher confirms (lra_confirm.select): %s",
                         e.server);
    }
    c->next_seq = 1;
    return 0;
}

/* Best-effort diagnosis of a failed TCP connect: rabbitmq-c only reports
 * "a socket error occurred", but operators want "connection refused". */
static void diagnose_connect(const char *host, int port, char *buf, size_t len) {
    struct addrinfo hint, *res = NULL;
    char portstr[16];
    char ebuf[128];
    int fd = -1;
    memset(&hint, 0, sizeof(hint));
    hint.ai_family = AF_UNSPEC;
    hint.ai_socktype = SOCK_STREAM;
    snprintf(portstr, sizeof(portstr), "%d", port);
    snprintf(buf, len, "a socket error occurred");
    if (getaddrinfo(host, portstr, &hint, &res) != 0 || res == NULL) {
        snprintf(buf, len, "cannot resolve host %s", host);
        goto out;
    }
    fd = socket(res->ai_family, res->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, res->ai_protocol);
    if (fd < 0) {
        goto out;
    }
    if (connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
        snprintf(buf, len, "the TCP connection succeeded on retry (transient failure)");
        goto out;
    }
    if (errno == EINPROGRESS) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int so = 0;
        socklen_t sl = sizeof(so);
        if (poll(&p, 1, 2000) <= 0) {
            snprintf(buf, len, "no answer within the connect timeout");
            goto out;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl) == 0 && so != 0) {
            snprintf(buf, len, "%s", lra_errno_text(so, ebuf, sizeof(ebuf)));
        } else {
            snprintf(buf, len, "the TCP connection succeeded on retry (transient failure)");
        }
        goto out;
    }
    snprintf(buf, len, "%s", lra_errno_text(errno, ebuf, sizeof(ebuf)));
out:
    if (fd >= 0) {
        close(fd);
    }
    if (res != NULL) {
        freeaddrinfo(res);
    }
    /* Lower-case first letter, so that the text reads well after "host:port: ". */
    if (buf[0] >= 'A' && buf[0] <= 'Z') {
        buf[0] = (char)(buf[0] - 'A' + 'a');
    }
}

static int tls_setup(amqp_socket_t *sock, char *errbuf, size_t errlen) {
    const char *cacert = getenv("LONGRUN_AMQP_CACERT");
    const char *cert = getenv("LONGRUN_AMQP_CERT");
    const char *key = getenv("LONGRUN_AMQP_KEY");
    const char *verify = getenv("LONGRUN_AMQP_TLS_VERIFY");
    if (verify != NULL && strcmp(verify, "0") == 0) {
        lr_warn("amqp.tls_insecure", "LONGRUN_AMQP_TLS_VERIFY=0: the broker's TLS certificate is NOT verified");
        amqp_ssl_socket_set_verify_peer(sock, 0);
        amqp_ssl_socket_set_verify_hostname(sock, 0);
    } else {
        amqp_ssl_socket_set_verify_peer(sock, 1);
        amqp_ssl_socket_set_verify_hostname(sock, 1);
        if (cacert == NULL || cacert[0] == '\0') {
            cacert = access(SYSTEM_CA_BUNDLE, R_OK) == 0 ? SYSTEM_CA_BUNDLE : NULL;
        }
        if (cacert == NULL) {
            return lr_seterr(errbuf, errlen, LR_ECONN,
                             "amqps: no CA certificates to verify the broker with; set "
                             "LONGRUN_AMQP_CACERT to a PEM file");
        }
        if (amqp_ssl_socket_set_cacert(sock, cacert) != AMQP_STATUS_OK) {
            return lr_seterr(errbuf, errlen, LR_ECONN, "amqps: cannot load CA certificates from %s", cacert);
        }
    }
    if (cert != NULL && cert[0] != '\0') {
        if (key == NULL || key[0] == '\0' || amqp_ssl_socket_set_key(sock, cert, key) != AMQP_STATUS_OK) {
            return lr_seterr(errbuf, errlen, LR_ECONN,
                             "amqps: cannot load the client certificate %s with key %s "
                             "(LONGRUN_AMQP_CERT, LONGRUN_AMQP_KEY)",
                             cert, key != NULL ? key : "(unset)");
        }
    }
    return 0;
}

/* Connects, logs in, opens CHANNEL in lra_confirm mode.  On failure c is torn
 * down by the caller with lra_conn_close(). */
int lra_conn_open(conn_t *c, const url_t *u, long timeout_ms, int heartbeat, const char *conn_name, char *errbuf,
                  size_t errlen) {
    amqp_socket_t *sock;
    struct timeval tv = lra_ms_to_tv(timeout_ms);
    struct timeval rpc_tv = lra_ms_to_tv(RPC_TIMEOUT_MS > timeout_ms ? RPC_TIMEOUT_MS : timeout_ms);
    int status;

    memset(c, 0, sizeof(*c));
    c->st = amqp_new_connection();
    if (c->st == NULL) {
        return LR_ENOMEM;
    }
    sock = u->ci.ssl ? amqp_ssl_socket_new(c->st) : amqp_tcp_socket_new(c->st);
    if (sock == NULL) {
        c->broken = true;
        return lr_seterr(errbuf, errlen, u->ci.ssl ? LR_ECONN : LR_ENOMEM, "cannot create the %s socket",
                         u->ci.ssl ? "TLS" : "TCP");
    }
    if (u->ci.ssl) {
        int rc = tls_setup(sock, errbuf, errlen);
        if (rc != 0) {
            c->broken = true;
            return rc;
        }
    }
    status = amqp_socket_open_noblock(sock, u->ci.host, u->ci.port, &tv);
    if (status != AMQP_STATUS_OK) {
        char why[256];
        c->broken = true;
        if (status == AMQP_STATUS_SOCKET_ERROR || status == AMQP_STATUS_TCP_ERROR) {
            diagnose_connect(u->ci.host, u->ci.port, why, sizeof(why));
        } else if (status == AMQP_STATUS_TIMEOUT) {
            snprintf(why, sizeof(why), "no answer within %ld ms", timeout_ms);
        } else if (status == AMQP_STATUS_HOSTNAME_RESOLUTION_FAILED) {
            snprintf(why, sizeof(why), "cannot resolve host %s", u->ci.host);
        } else if (status == AMQP_STATUS_SSL_PEER_VERIFY_FAILED) {
            snprintf(why, sizeof(why),
                     "the broker's TLS certificate is not signed by a trusted "
                     "CA (set LONGRUN_AMQP_CACERT to the CA's PEM file)");
        } else if (status == AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED) {
            snprintf(why, sizeof(why),
                     "the broker's TLS certificate is not issued for host %s "
                     "(use the host name it names)",
                     u->ci.host);
        } else {
            snprintf(why, sizeof(why), "%s", amqp_error_string2(status));
        }
        return lr_seterr(errbuf, errlen, lra_status_err(status), "%s:%d: %s", u->ci.host, u->ci.port, why);
    }
    amqp_set_handshake_timeout(c->st, &tv);
    amqp_set_rpc_timeout(c->st, &rpc_tv);

    amqp_table_entry_t caps[3];
    caps[0].key = amqp_cstring_bytes("authentication_failure_close");
    caps[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[0].value.value.boolean = 1;
    caps[1].key = amqp_cstring_bytes("consumer_cancel_notify");
    caps[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[1].value.value.boolean = 1;
    caps[2].key = amqp_cstring_bytes("connection.blocked");
    caps[2].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[2].value.value.boolean = 1;
    amqp_table_entry_t props[2];
    props[0].key = amqp_cstring_bytes("connection_name");
    props[0].value.kind = AMQP_FIELD_KIND_UTF8;
    props[0].value.value.bytes = amqp_cstring_bytes(conn_name);
    props[1].key = amqp_cstring_bytes("capabilities");
    props[1].value.kind = AMQP_FIELD_KIND_TABLE;
    props[1].value.value.table.num_entries = 3;
    props[1].value.value.table.entries = caps;
    amqp_table_t props_table = {.num_entries = 2, .entries = props};

    amqp_rpc_reply_t r = amqp_login_with_properties(c->st, u->ci.vhost, 0, FRAME_MAX, heartbeat, &props_table,
                                                    AMQP_SASL_METHOD_PLAIN, u->ci.user, u->ci.password);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        c->broken = true;
        if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            const amqp_connection_close_t *m = r.reply.decoded;
            send_connection_close_ok(c);
            if (m->reply_code == AMQP_ACCESS_REFUSED || m->reply_code == AMQP_NOT_ALLOWED) {
                return lr_seterr(errbuf, errlen, LR_ECONN,
                                 "%s:%d: login refused for user %s on vhost %s (server said: "
                                 "%.*s); check the user name, password and the vhost's "
                                 "permissions",
                                 u->ci.host, u->ci.port, u->ci.user, u->ci.vhost, (int)m->reply_text.len,
                                 (const char *)m->reply_text.bytes);
            }
            return lr_seterr(errbuf, errlen, LR_ECONN, "%s:%d: the broker refused the connection: %u %.*s", u->ci.host,
                             u->ci.port, m->reply_code, (int)m->reply_text.len, (const char *)m->reply_text.bytes);
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
            return lr_seterr(errbuf, errlen, lra_status_err(r.library_error), "%s:%d: login failed: %s%s", u->ci.host,
                             u->ci.port, amqp_error_string2(r.library_error),
                             r.library_error == AMQP_STATUS_CONNECTION_CLOSED ||
                                     r.library_error == AMQP_STATUS_SOCKET_CLOSED
                                 ? " (wrong credentials, or not an AMQP 0-9-1 port?)"
                                 : "");
        }
        return lr_seterr(errbuf, errlen, LR_ECONN, "%s:%d: login failed", u->ci.host, u->ci.port);
    }
    return channel_setup(c, errbuf, errlen);
}

/* Closes politely when possible (bounded by CLOSE_TIMEOUT_MS), then frees. */
void lra_conn_close(conn_t *c) {
    if (c->st == NULL) {
        return;
    }
    if (!c->broken) {
        struct timeval tv = lra_ms_to_tv(CLOSE_TIMEOUT_MS);
        amqp_set_rpc_timeout(c->st, &tv);
        if (c->channel_open) {
            amqp_rpc_reply_t r = amqp_channel_close(c->st, CHANNEL, AMQP_REPLY_SUCCESS);
            if (r.reply_type != AMQP_RESPONSE_NORMAL) {
                c->broken = true;
            }
        }
        if (!c->broken) {
            (void)amqp_connection_close(c->st, AMQP_REPLY_SUCCESS);
        }
    }
    amqp_destroy_connection(c->st);
    c->st = NULL;
    c->channel_open = false;
}

/* Reopens CHANNEL after the broker closed it (the connection is fine). */
int lra_channel_recover(conn_t *c) {
    char buf[DETAIL_MAX];
    if (c->broken) {
        return LR_ECONN;
    }
    if (c->channel_open) {
        return 0;
    }
    int rc = channel_setup(c, buf, sizeof(buf));
    if (rc != 0) {
        lr_warn("amqp.channel_reopen_failed", "%s", buf);
    }
    return rc;
}

/* Handles a method on channel 0 outside an RPC.  Returns 0 (handled) or
 * LR_ECONN with the reason in detail (the broker is closing the connection). */
int lra_handle_channel0(conn_t *c, const amqp_frame_t *f, char *detail, size_t dlen) {
    switch (f->payload.method.id) {
    case AMQP_CONNECTION_CLOSE_METHOD: {
        const amqp_connection_close_t *m = f->payload.method.decoded;
        snprintf(detail, dlen, "the broker closed the connection: %u %.*s", m->reply_code, (int)m->reply_text.len,
                 (const char *)m->reply_text.bytes);
        send_connection_close_ok(c);
        return LR_ECONN;
    }
    case AMQP_CONNECTION_BLOCKED_METHOD: {
        const amqp_connection_blocked_t *m = f->payload.method.decoded;
        lr_warn("amqp.blocked", "the broker blocked publishing on this connection (%.*s); publishes wait",
                (int)m->reason.len, (const char *)m->reason.bytes);
        return 0;
    }
    case AMQP_CONNECTION_UNBLOCKED_METHOD: lr_info("amqp.unblocked", "the broker unblocked publishing"); return 0;
    default:
        lr_debug("amqp.ignored_method", "ignoring method 0x%08x on channel 0", (unsigned)f->payload.method.id);
        return 0;
    }
}

int lra_wait_frame(conn_t *c, amqp_frame_t *f, long timeout_ms, char *detail, size_t dlen) {
    struct timeval tv = lra_ms_to_tv(timeout_ms);
    char buf[256];
    errno = 0;
    int status = amqp_simple_wait_frame_noblock(c->st, f, &tv);
    int saved = errno;
    if (status == AMQP_STATUS_OK) {
        return 0;
    }
    if (status == AMQP_STATUS_TIMEOUT) {
        return LR_ETIMEOUT;
    }
    c->broken = true;
    snprintf(detail, dlen, "%s", lra_status_text(status, saved, buf, sizeof(buf)));
    return lra_status_err(status);
}

/* Reads the header and body frames that follow a content-bearing method.
 * keep: how many body bytes to keep (0 = none, only hash).  Frames on
 * channel 0 that interleave are handled.  Returns 0, LR_ECONN, LR_ENOMEM. */
int lra_read_content(conn_t *c, size_t keep, content_t *ct, char *detail, size_t dlen) {
    amqp_frame_t f;
    int rc;
    memset(ct, 0, sizeof(*ct));
    ct->hash = FNV_INIT;
    for (;;) {
        rc = lra_wait_frame(c, &f, CONTENT_TIMEOUT_MS, detail, dlen);
        if (rc == LR_ETIMEOUT) {
            c->broken = true;
            snprintf(detail, dlen, "timed out waiting for a message's content");
            return LR_ECONN;
        }
        if (rc != 0) {
            return rc;
        }
        if (f.channel == 0 && f.frame_type == AMQP_FRAME_METHOD) {
            rc = lra_handle_channel0(c, &f, detail, dlen);
            if (rc != 0) {
                return rc;
            }
            continue;
        }
        break;
    }
    if (f.frame_type != AMQP_FRAME_HEADER || f.channel != CHANNEL) {
        c->broken = true;
        snprintf(detail, dlen, "protocol error: expected a content header, got frame type %u", (unsigned)f.frame_type);
        return LR_ECONN;
    }
    ct->props = f.payload.properties.decoded;
    ct->total_len = f.payload.properties.body_size;
    size_t cap = ct->total_len < keep ? (size_t)ct->total_len : keep;
    ct->truncated = ct->total_len > keep;
    if (keep > 0) {
        ct->body = malloc(cap + 1);
        if (ct->body == NULL) {
            return LR_ENOMEM;
        }
        ct->body[0] = '\0';
    }
    uint64_t got = 0;
    while (got < ct->total_len) {
        rc = lra_wait_frame(c, &f, CONTENT_TIMEOUT_MS, detail, dlen);
        if (rc == LR_ETIMEOUT) {
            c->broken = true;
            snprintf(detail, dlen, "timed out waiting for a message's body");
            rc = LR_ECONN;
        }
        if (rc == 0 && f.channel == 0 && f.frame_type == AMQP_FRAME_METHOD) {
            rc = lra_handle_channel0(c, &f, detail, dlen);
            if (rc == 0) {
                continue;
            }
        }
        if (rc == 0 && (f.frame_type != AMQP_FRAME_BODY || f.channel != CHANNEL)) {
            c->broken = true;
            snprintf(detail, dlen, "protocol error: expected a body frame, got frame type %u", (unsigned)f.frame_type);
            rc = LR_ECONN;
        }
        if (rc != 0) {
            free(ct->body);
            ct->body = NULL;
            return rc;
        }
        amqp_bytes_t frag = f.payload.body_fragment;
        ct->hash = lra_fnv1a(ct->hash, frag.bytes, frag.len);
        if (ct->body != NULL && ct->body_len < cap) {
            size_t n = frag.len < cap - ct->body_len ? frag.len : cap - ct->body_len;
            memcpy(ct->body + ct->body_len, frag.bytes, n);
            ct->body_len += n;
        }
        got += frag.len;
    }
    if (ct->body != NULL) {
        ct->body[ct->body_len] = '\0';
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Publishing (shared)                                                       */

static int check_shortstr(const char *what, const char *s, char *errbuf, size_t errlen) {
    if (s != NULL && strlen(s) > MAX_SHORTSTR) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "%s is longer than %d bytes", what, MAX_SHORTSTR);
    }
    return 0;
}

/* Validates a publish up front: rabbitmq-c sends the method frame before it
 * encodes the properties, so an encoding failure would break the connection. */
int lra_msg_validate(const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg, char *errbuf,
                     size_t errlen) {
    int rc;
    if (exchange == NULL || routing_key == NULL || msg == NULL || (msg->body == NULL && msg->body_len > 0)) {
        return lr_seterr(errbuf, errlen, LR_EINVAL,
                         "publish: missing exchange, routing key, "
                         "message or body");
    }
    if ((rc = check_shortstr("the exchange name", exchange, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("the routing key", routing_key, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("message_id", msg->message_id, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("correlation_id", msg->correlation_id, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("reply_to", msg->reply_to, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("content_type", msg->content_type, errbuf, errlen)) != 0) {
        return rc;
    }
    if (msg->body_len > LR_AMQP_MAX_BODY) {
        return lr_seterr(errbuf, errlen, LR_ETOOBIG, "message body of %zu bytes exceeds the limit of %d bytes",
                         msg->body_len, LR_AMQP_MAX_BODY);
    }
    if (msg->headers != NULL) {
        size_t n = 0, bytes = 0;
        for (const char *const *h = msg->headers; h[0] != NULL; h += 2) {
            if (h[1] == NULL) {
                return lr_seterr(errbuf, errlen, LR_EINVAL, "header %s has no value", h[0]);
            }
            if (h[0][0] == '\0' || strlen(h[0]) > 127) {
                return lr_seterr(errbuf, errlen, LR_EINVAL, "header names must be 1..127 bytes long");
            }
            if (++n > MAX_MSG_HEADERS) {
                return lr_seterr(errbuf, errlen, LR_ETOOBIG, "more than %d headers", MAX_MSG_HEADERS);
            }
            bytes += strlen(h[0]) + strlen(h[1]);
            if (bytes > MAX_HEADER_BYTES) {
                return lr_seterr(errbuf, errlen, LR_ETOOBIG, "headers exceed %d bytes", MAX_HEADER_BYTES);
            }
        }
    }
    return 0;
}

/* Sends one publish; returns the rabbitmq-c status.  The message must have
 * passed lra_msg_validate(). */
int lra_send_publish(conn_t *c, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg) {
    amqp_basic_properties_t props;
    amqp_table_entry_t entries[MAX_MSG_HEADERS];
    int n = 0;

    memset(&props, 0, sizeof(props));
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.content_type = amqp_cstring_bytes(msg->content_type != NULL ? msg->content_type : "application/json");
    if (msg->persistent) {
        props._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
        props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
    }
    if (msg->message_id != NULL) {
        props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
        props.message_id = amqp_cstring_bytes(msg->message_id);
    }
    if (msg->correlation_id != NULL) {
        props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        props.correlation_id = amqp_cstring_bytes(msg->correlation_id);
    }
    if (msg->reply_to != NULL) {
        props._flags |= AMQP_BASIC_REPLY_TO_FLAG;
        props.reply_to = amqp_cstring_bytes(msg->reply_to);
    }
    if (msg->headers != NULL) {
        for (const char *const *h = msg->headers; h[0] != NULL && n < MAX_MSG_HEADERS; h += 2) {
            entries[n].key = amqp_cstring_bytes(h[0]);
            entries[n].value.kind = AMQP_FIELD_KIND_UTF8;
            entries[n].value.value.bytes = amqp_cstring_bytes(h[1]);
            n++;
        }
        if (n > 0) {
            props._flags |= AMQP_BASIC_HEADERS_FLAG;
            props.headers.num_entries = n;
            props.headers.entries = entries;
        }
    }
    amqp_bytes_t body = {.len = msg->body_len, .bytes = (void *)msg->body};
    return amqp_basic_publish(c->st, CHANNEL, amqp_cstring_bytes(exchange), amqp_cstring_bytes(routing_key),
                              msg->mandatory ? 1 : 0, 0, &props, body);
}

/* ------------------------------------------------------------------------ */
/* Topology                                                                  */

/* "inequivalent arg 'x-queue-type' for queue ..." -> "x-queue-type". */
static void differing_arg(const char *server, char *out, size_t len) {
    const char *p = strstr(server, "inequivalent arg '");
    out[0] = '\0';
    if (p != NULL) {
        p += strlen("inequivalent arg '");
        const char *q = strchr(p, '\'');
        if (q != NULL && (size_t)(q - p) < len) {
            memcpy(out, p, (size_t)(q - p));
            out[q - p] = '\0';
        }
    }
}

/* Turns a failed declare into a plain-words error.  kind: "queue" or
 * "exchange"; wanted: what longrun needs. */
static int declare_error(conn_t *c, int rc, const rpc_err_t *e, const char *kind, const char *name, const char *wanted,
                         char *errbuf, size_t errlen) {
    if (rc == LR_EAMQP && e->code == AMQP_PRECONDITION_FAILED) {
        char arg[128];
        differing_arg(e->server, arg, sizeof(arg));
        (void)lra_channel_recover(c);
        if (arg[0] != '\0') {
            return lr_seterr(errbuf, errlen, LR_ECONFIG,
                             "%s %s already exists with different arguments: its %s differs "
                             "(server said: %s). longrun needs %s. Delete the %s (its messages "
                             "are lost unless you move them first) or pick another name",
                             kind, name, arg, e->server, wanted, kind);
        }
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "%s %s already exists with different settings (server said: %s). "
                         "longrun needs %s. Delete the %s (its messages are lost unless you "
                         "move them first) or pick another name",
                         kind, name, e->server, wanted, kind);
    }
    if (rc == LR_EAMQP && e->code == AMQP_ACCESS_REFUSED) {
        (void)lra_channel_recover(c);
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "not allowed to declare %s %s (server said: %s); grant the user "
                         "configure permission on it",
                         kind, name, e->server);
    }
    if (rc == LR_EAMQP) {
        (void)lra_channel_recover(c);
        return lr_seterr(errbuf, errlen, LR_EAMQP, "declaring %s %s failed: %u %s", kind, name, e->code, e->server);
    }
    return lr_seterr(errbuf, errlen, rc, "declaring %s %s failed: %s", kind, name, e->server);
}

static int declare_exchange(conn_t *c, const char *name, const char *type, char *errbuf, size_t errlen) {
    rpc_err_t e;
    amqp_exchange_declare(c->st, CHANNEL, amqp_cstring_bytes(name), amqp_cstring_bytes(type), 0, 1, 0, 0,
                          amqp_empty_table);
    int rc = lra_rpc_check(c, &e);
    if (rc != 0) {
        char wanted[64];
        snprintf(wanted, sizeof(wanted), "a durable %s exchange", type);
        return declare_error(c, rc, &e, "exchange", name, wanted, errbuf, errlen);
    }
    return 0;
}

static int bind_queue(conn_t *c, const char *queue, const char *exchange, const char *key, char *errbuf,
                      size_t errlen) {
    rpc_err_t e;
    amqp_queue_bind(c->st, CHANNEL, amqp_cstring_bytes(queue), amqp_cstring_bytes(exchange), amqp_cstring_bytes(key),
                    amqp_empty_table);
    int rc = lra_rpc_check(c, &e);
    if (rc != 0) {
        if (rc == LR_EAMQP) {
            (void)lra_channel_recover(c);
        }
        return lr_seterr(errbuf, errlen, rc == LR_EAMQP && e.code == AMQP_ACCESS_REFUSED ? LR_ECONFIG : rc,
                         "binding queue %s to exchange %s failed: %s", queue, exchange, e.server);
    }
    return 0;
}

static void set_str_entry(amqp_table_entry_t *e, const char *key, const char *val) {
    e->key = amqp_cstring_bytes(key);
    e->value.kind = AMQP_FIELD_KIND_UTF8;
    e->value.value.bytes = amqp_cstring_bytes(val);
}

int lra_check_queue_names(const char *const *queues, char *errbuf, size_t errlen) {
    if (queues != NULL) {
        for (const char *const *q = queues; *q != NULL; q++) {
            size_t n = strlen(*q);
            if (n == 0 || n > MAX_QUEUE_NAME) {
                return lr_seterr(errbuf, errlen, LR_EINVAL, "task queue name \"%.64s\" must be 1..%d bytes", *q,
                                 MAX_QUEUE_NAME);
            }
            for (size_t i = 0; i < n; i++) {
                if ((unsigned char)(*q)[i] < 0x20 || (*q)[i] == 0x7f) {
                    return lr_seterr(errbuf, errlen, LR_EINVAL, "task queue name contains a control character");
                }
            }
        }
    }
    return 0;
}

/* One declare of a task queue: with x-max-length = max_length when it is
 * above 0, without it when 0, passive (exists, whatever its arguments) when
 * passive.  Returns lra_rpc_check's code with e filled. */
static int queue_declare_once(conn_t *c, const char *name, int delivery_limit, long max_length, bool passive,
                              rpc_err_t *e) {
    amqp_table_entry_t args[6];
    amqp_table_t table = {.num_entries = 5, .entries = args};
    set_str_entry(&args[0], "x-queue-type", "quorum");
    args[1].key = amqp_cstring_bytes("x-delivery-limit");
    args[1].value.kind = AMQP_FIELD_KIND_I32;
    args[1].value.value.i32 = delivery_limit;
    set_str_entry(&args[2], "x-dead-letter-exchange", LR_AMQP_DLX);
    set_str_entry(&args[3], "x-dead-letter-strategy", "at-least-once");
    set_str_entry(&args[4], "x-overflow", "reject-publish");
    if (max_length > 0) {
        args[5].key = amqp_cstring_bytes("x-max-length");
        args[5].value.kind = AMQP_FIELD_KIND_I64;
        args[5].value.value.i64 = max_length;
        table.num_entries = 6;
    }
    if (passive) {
        table = amqp_empty_table;
    }
    amqp_queue_declare(c->st, CHANNEL, amqp_cstring_bytes(name), passive ? 1 : 0, 1, 0, 0, table);
    return lra_rpc_check(c, e);
}

/* Declares task queue name.  The maximum length is a queue argument, which
 * RabbitMQ compares on every declare: a queue created before
 * LONGRUN_QUEUE_MAX_LENGTH existed (or with another value) answers
 * PRECONDITION_FAILED on x-max-length.  That queue is then used as it is
 * (declared again without the argument, which still checks every other
 * one, or passively when it has another limit) and a warning says how to
 * give it the limit without deleting it: a policy, which RabbitMQ applies to
 * existing queues (the lower of policy and argument wins). */
static int declare_task_queue(conn_t *c, const char *name, int delivery_limit, int max_length, char *errbuf,
                              size_t errlen) {
    char wanted[300], arg[128];
    rpc_err_t e;
    int rc = queue_declare_once(c, name, delivery_limit, max_length, false, &e);
    if (rc == LR_EAMQP && e.code == AMQP_PRECONDITION_FAILED && max_length > 0) {
        differing_arg(e.server, arg, sizeof(arg));
        if (strcmp(arg, "x-max-length") == 0 && lra_channel_recover(c) == 0) {
            char first[DETAIL_MAX];
            snprintf(first, sizeof(first), "%s", e.server);
            rc = queue_declare_once(c, name, delivery_limit, 0, false, &e);
            if (rc == LR_EAMQP && e.code == AMQP_PRECONDITION_FAILED) {
                differing_arg(e.server, arg, sizeof(arg));
                if (strcmp(arg, "x-max-length") == 0 && lra_channel_recover(c) == 0) {
                    rc = queue_declare_once(c, name, delivery_limit, 0, true, &e);
                }
            }
            if (rc == 0) {
                lr_warn("amqp.queue_max_length",
                        "queue %s exists with another x-max-length than "
                        "LONGRUN_QUEUE_MAX_LENGTH=%d (server said: %s); using it as it is. To apply the limit "
                        "without recreating it: rabbitmqctl set_policy --apply-to queues longrun-max-length "
                        "'^longrun\\.q\\.' '{\"max-length\":%d,\"overflow\":\"reject-publish\"}' "
                        "(docs/configuration.md)",
                        name, max_length, first, max_length);
                return 0;
            }
        }
    }
    if (rc != 0) {
        snprintf(wanted, sizeof(wanted),
                 "a durable quorum queue with x-delivery-limit=%d, "
                 "x-dead-letter-exchange=%s, x-dead-letter-strategy=at-least-once, "
                 "x-overflow=reject-publish",
                 delivery_limit, LR_AMQP_DLX);
        return declare_error(c, rc, &e, "queue", name, wanted, errbuf, errlen);
    }
    return 0;
}

int lra_declare_topology(conn_t *c, const char *const *queues, int delivery_limit, int max_length, char *errbuf,
                         size_t errlen) {
    rpc_err_t e;
    int rc;
    if (delivery_limit < 0) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "delivery limit %d is negative", delivery_limit);
    }
    if (max_length < 0) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "queue max length %d is negative", max_length);
    }
    if (delivery_limit == 0) {
        delivery_limit = LR_AMQP_DEFAULT_DELIVERY_LIMIT;
    }
    if ((rc = lra_check_queue_names(queues, errbuf, errlen)) != 0) {
        return rc;
    }
    if ((rc = declare_exchange(c, LR_AMQP_EXCHANGE, "direct", errbuf, errlen)) != 0 ||
        (rc = declare_exchange(c, LR_AMQP_DLX, "fanout", errbuf, errlen)) != 0) {
        return rc;
    }

    amqp_table_entry_t dead_args[1];
    set_str_entry(&dead_args[0], "x-queue-type", "quorum");
    amqp_table_t dead_table = {.num_entries = 1, .entries = dead_args};
    amqp_queue_declare(c->st, CHANNEL, amqp_cstring_bytes(LR_AMQP_DEAD_QUEUE), 0, 1, 0, 0, dead_table);
    if ((rc = lra_rpc_check(c, &e)) != 0) {
        return declare_error(c, rc, &e, "queue", LR_AMQP_DEAD_QUEUE, "a durable quorum queue (x-queue-type=quorum)",
                             errbuf, errlen);
    }
    if ((rc = bind_queue(c, LR_AMQP_DEAD_QUEUE, LR_AMQP_DLX, "", errbuf, errlen)) != 0) {
        return rc;
    }

    for (const char *const *q = queues; q != NULL && *q != NULL; q++) {
        char name[sizeof(LR_AMQP_QUEUE_PREFIX) + MAX_QUEUE_NAME];
        snprintf(name, sizeof(name), "%s%s", LR_AMQP_QUEUE_PREFIX, *q);
        if ((rc = declare_task_queue(c, name, delivery_limit, max_length, errbuf, errlen)) != 0 ||
            (rc = bind_queue(c, name, LR_AMQP_EXCHANGE, *q, errbuf, errlen)) != 0) {
            return rc;
        }
    }
    return 0;
}
