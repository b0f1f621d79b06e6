/*
 * amqp_wire.c - the small pieces of the RabbitMQ client: helpers, URL parsing,
 * message headers as JSON (see amqp.c for the design).
 */
#include "amqp_int.h"

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */

uint64_t lra_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

struct timeval lra_ms_to_tv(long ms) {
    struct timeval tv;
    if (ms < 0) {
        ms = 0;
    }
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    return tv;
}

const char *lra_errno_text(int e, char *buf, size_t len) {
#if defined(__GLIBC__) && defined(_GNU_SOURCE)
    return strerror_r(e, buf, len);
#else
    if (strerror_r(e, buf, len) != 0) {
        snprintf(buf, len, "error %d", e);
    }
    return buf;
#endif
}

/* rabbitmq-c's text for status, with the OS reason for socket errors
 * (errno as saved right after the failing call; 0 if unknown). */
const char *lra_status_text(int status, int saved_errno, char *buf, size_t len) {
    char ebuf[128];
    if (status == AMQP_STATUS_CONNECTION_CLOSED) {
        return "the connection was closed unexpectedly";
    }
    if ((status == AMQP_STATUS_SOCKET_ERROR || status == AMQP_STATUS_TCP_ERROR) && saved_errno != 0 &&
        saved_errno != EAGAIN && saved_errno != EINPROGRESS) {
        snprintf(buf, len, "%s (%s)", amqp_error_string2(status), lra_errno_text(saved_errno, ebuf, sizeof(ebuf)));
        return buf;
    }
    return amqp_error_string2(status);
}

char *lra_dup_bytes(amqp_bytes_t b) {
    char *s = malloc(b.len + 1);
    if (s == NULL) {
        return NULL;
    }
    if (b.len > 0) {
        memcpy(s, b.bytes, b.len);
    }
    s[b.len] = '\0';
    return s;
}

char *lra_dup_str(const char *s) { return s != NULL ? strdup(s) : NULL; }

bool lra_bytes_eq(amqp_bytes_t b, const char *s) {
    size_t n = strlen(s);
    return b.len == n && (n == 0 || memcmp(b.bytes, s, n) == 0);
}

/* FNV-1a, used only to recognise a returned message among pending publishes. */
uint64_t lra_fnv1a(uint64_t h, const void *data, size_t len) {
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* ------------------------------------------------------------------------ */
/* URLs                                                                      */

void lra_url_free(url_t *u) {
    free(u->buf);
    u->buf = NULL;
}

int lra_url_parse(url_t *u, const char *url, char *errbuf, size_t errlen) {
    memset(u, 0, sizeof(*u));
    if (url == NULL || url[0] == '\0') {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL is empty");
    }
    const char *rest;
    if (strncmp(url, "amqp://", 7) == 0) {
        rest = url + 7;
    } else if (strncmp(url, "amqps://", 8) == 0) {
        rest = url + 8;
    } else {
        const char *colon = strstr(url, "://");
        int scheme_len = colon != NULL && colon - url < 16 ? (int)(colon - url) : 0;
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL must start with amqp:// or amqps:// (got %s%.*s)",
                         scheme_len > 0 ? "scheme " : "no scheme", scheme_len, url);
    }
    if (strchr(rest, '?') != NULL || strchr(rest, '#') != NULL) {
        return lr_seterr(errbuf, errlen, LR_EINVAL,
                         "the AMQP URL has query parameters or a fragment (?..., #...), which "
                         "are not supported; use amqp[s]://user:password@host:port/vhost");
    }
    if (strlen(url) > 1024) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL is longer than 1024 bytes");
    }
    u->buf = strdup(url);
    if (u->buf == NULL) {
        return LR_ENOMEM;
    }
    if (amqp_parse_url(u->buf, &u->ci) != AMQP_STATUS_OK) {
        lra_url_free(u);
        return lr_seterr(errbuf, errlen, LR_EINVAL,
                         "malformed AMQP URL (expected amqp[s]://user:password@host:port/vhost; "
                         "the port must be a number and special characters in the user name, "
                         "password or vhost must be percent-encoded, e.g. %%2F for /)");
    }
    if (u->ci.port <= 0 || u->ci.port > 65535) {
        lra_url_free(u);
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL has an invalid port %d", u->ci.port);
    }
    if (u->ci.host == NULL || u->ci.host[0] == '\0') {
        lra_url_free(u);
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL has no host");
    }
    if (u->ci.vhost == NULL || u->ci.vhost[0] == '\0') {
        u->ci.vhost = "/";
    }
    snprintf(u->redacted, sizeof(u->redacted), "%s://%s@%s:%d/%s", u->ci.ssl ? "amqps" : "amqp", u->ci.user, u->ci.host,
             u->ci.port, strcmp(u->ci.vhost, "/") == 0 ? "" : u->ci.vhost);
    return 0;
}

int lr_amqp_url_check(const char *url, char *errbuf, size_t errlen) {
    url_t u;
    int rc = lra_url_parse(&u, url, errbuf, errlen);
    lra_url_free(&u);
    return rc;
}

int lr_amqp_url_host(const char *url, char *host, size_t hostlen, bool *tls, char *errbuf, size_t errlen) {
    url_t u;
    int rc = lra_url_parse(&u, url, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    if (strlen(u.ci.host) >= hostlen) {
        rc = lr_seterr(errbuf, errlen, LR_ETOOBIG, "the AMQP URL's host is longer than %zu bytes",
                       hostlen > 0 ? hostlen - 1 : 0);
    } else {
        memcpy(host, u.ci.host, strlen(u.ci.host) + 1);
        *tls = u.ci.ssl != 0;
    }
    lra_url_free(&u);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Headers -> JSON                                                           */

typedef struct jbuf {
    char *p;
    size_t len, cap;
    bool failed; /* out of memory or over HEADERS_JSON_MAX */
} jbuf_t;

static void jb_put(jbuf_t *b, const char *s, size_t n) {
    if (b->failed) {
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap == 0 ? 256 : b->cap;
        while (cap < b->len + n + 1) {
            cap *= 2;
        }
        if (cap > HEADERS_JSON_MAX) {
            b->failed = true;
            return;
        }
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void jb_cstr(jbuf_t *b, const char *s) { jb_put(b, s, strlen(s)); }

/* Length of the valid UTF-8 sequence at p (at most n bytes), or 0. */
static size_t utf8_seq(const unsigned char *p, size_t n) {
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (p[0] >= 0xC2 && p[0] <= 0xDF) {
        len = 2;
    } else if (p[0] >= 0xE0 && p[0] <= 0xEF) {
        len = 3;
        if (p[0] == 0xE0) {
            lo = 0xA0;
        } else if (p[0] == 0xED) {
            hi = 0x9F; /* no UTF-16 surrogates */
        }
    } else if (p[0] >= 0xF0 && p[0] <= 0xF4) {
        len = 4;
        if (p[0] == 0xF0) {
            lo = 0x90;
        } else if (p[0] == 0xF4) {
            hi = 0x8F;
        }
    } else {
        return 0;
    }
    if (len > n || p[1] < lo || p[1] > hi) {
        return 0;
    }
    for (size_t i = 2; i < len; i++) {
        if (p[i] < 0x80 || p[i] > 0xBF) {
            return 0;
        }
    }
    return len;
}

/* A JSON string.  NUL bytes and invalid UTF-8 become U+FFFD so that the text
 * is also acceptable to PostgreSQL's jsonb. */
static void jb_string(jbuf_t *b, const void *data, size_t n) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = data;
    size_t i = 0;
    jb_put(b, "\"", 1);
    while (i < n && !b->failed) {
        unsigned char ch = p[i];
        if (ch >= 0x80) {
            size_t k = utf8_seq(p + i, n - i);
            if (k == 0) {
                jb_cstr(b, "\\ufffd");
                i++;
            } else {
                jb_put(b, (const char *)p + i, k);
                i += k;
            }
            continue;
        }
        switch (ch) {
        case '"': jb_put(b, "\\\"", 2); break;
        case '\\': jb_put(b, "\\\\", 2); break;
        case '\n': jb_put(b, "\\n", 2); break;
        case '\r': jb_put(b, "\\r", 2); break;
        case '\t': jb_put(b, "\\t", 2); break;
        case 0: jb_cstr(b, "\\ufffd"); break;
        default:
            if (ch < 0x20 || ch == 0x7f) {
                char esc[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
                jb_put(b, esc, 6);
            } else {
                jb_put(b, (const char *)&ch, 1);
            }
        }
        i++;
    }
    jb_put(b, "\"", 1);
}

static void jb_fmt(jbuf_t *b, const char *fmt, ...) LR_PRINTF(2, 3);
static void jb_fmt(jbuf_t *b, const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n > 0 && (size_t)n < sizeof(tmp)) {
        jb_put(b, tmp, (size_t)n);
    } else {
        jb_cstr(b, "null");
    }
}

static void jb_table(jbuf_t *b, const amqp_table_t *t, int depth);

static void jb_value(jbuf_t *b, const amqp_field_value_t *v, int depth) {
    if (depth > JSON_MAX_DEPTH) {
        jb_cstr(b, "null");
        return;
    }
    switch (v->kind) {
    case AMQP_FIELD_KIND_BOOLEAN: jb_cstr(b, v->value.boolean ? "true" : "false"); break;
    case AMQP_FIELD_KIND_I8: jb_fmt(b, "%d", (int)v->value.i8); break;
    case AMQP_FIELD_KIND_U8: jb_fmt(b, "%u", (unsigned)v->value.u8); break;
    case AMQP_FIELD_KIND_I16: jb_fmt(b, "%d", (int)v->value.i16); break;
    case AMQP_FIELD_KIND_U16: jb_fmt(b, "%u", (unsigned)v->value.u16); break;
    case AMQP_FIELD_KIND_I32: jb_fmt(b, "%" PRId32, v->value.i32); break;
    case AMQP_FIELD_KIND_U32: jb_fmt(b, "%" PRIu32, v->value.u32); break;
    case AMQP_FIELD_KIND_I64: jb_fmt(b, "%" PRId64, v->value.i64); break;
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP: jb_fmt(b, "%" PRIu64, v->value.u64); break;
    case AMQP_FIELD_KIND_F32:
        if (isfinite(v->value.f32)) {
            jb_fmt(b, "%.9g", (double)v->value.f32);
        } else {
            jb_cstr(b, "null");
        }
        break;
    case AMQP_FIELD_KIND_F64:
        if (isfinite(v->value.f64)) {
            jb_fmt(b, "%.17g", v->value.f64);
        } else {
            jb_cstr(b, "null");
        }
        break;
    case AMQP_FIELD_KIND_DECIMAL: {
        /* value * 10^-decimals, written exactly. */
        char digits[16], out[48];
        unsigned dec = v->value.decimal.decimals;
        int nd = snprintf(digits, sizeof(digits), "%" PRIu32, v->value.decimal.value);
        if (dec == 0) {
            jb_cstr(b, digits);
        } else if (dec > 20) {
            jb_cstr(b, "null");
        } else {
            size_t o = 0;
            int intlen = nd - (int)dec;
            if (intlen <= 0) {
                out[o++] = '0';
                out[o++] = '.';
                for (int i = intlen; i < 0; i++) {
                    out[o++] = '0';
                }
                memcpy(out + o, digits, (size_t)nd);
                o += (size_t)nd;
            } else {
                memcpy(out, digits, (size_t)intlen);
                o = (size_t)intlen;
                out[o++] = '.';
                memcpy(out + o, digits + intlen, dec);
                o += dec;
            }
            jb_put(b, out, o);
        }
        break;
    }
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: jb_string(b, v->value.bytes.bytes, v->value.bytes.len); break;
    case AMQP_FIELD_KIND_ARRAY:
        jb_put(b, "[", 1);
        for (int i = 0; i < v->value.array.num_entries; i++) {
            if (i > 0) {
                jb_put(b, ",", 1);
            }
            jb_value(b, &v->value.array.entries[i], depth + 1);
        }
        jb_put(b, "]", 1);
        break;
    case AMQP_FIELD_KIND_TABLE: jb_table(b, &v->value.table, depth + 1); break;
    case AMQP_FIELD_KIND_VOID:
    default: jb_cstr(b, "null"); break;
    }
}

static void jb_table(jbuf_t *b, const amqp_table_t *t, int depth) {
    if (depth > JSON_MAX_DEPTH) {
        jb_cstr(b, "null");
        return;
    }
    jb_put(b, "{", 1);
    for (int i = 0; i < t->num_entries; i++) {
        if (i > 0) {
            jb_put(b, ",", 1);
        }
        jb_string(b, t->entries[i].key.bytes, t->entries[i].key.len);
        jb_put(b, ":", 1);
        jb_value(b, &t->entries[i].value, depth);
    }
    jb_put(b, "}", 1);
}

char *lra_headers_to_json(const amqp_table_t *t) {
    jbuf_t b = {0};
    jb_table(&b, t, 0);
    if (b.failed) {
        lr_warn("amqp.headers_dropped", "message headers do not fit in %d bytes of JSON", HEADERS_JSON_MAX);
        free(b.p);
        return NULL;
    }
    return b.p;
}

int64_t lra_header_int(const amqp_table_t *t, const char *key) {
    for (int i = 0; i < t->num_entries; i++) {
        if (!lra_bytes_eq(t->entries[i].key, key)) {
            continue;
        }
        const amqp_field_value_t *v = &t->entries[i].value;
        switch (v->kind) {
        case AMQP_FIELD_KIND_I8: return v->value.i8;
        case AMQP_FIELD_KIND_U8: return v->value.u8;
        case AMQP_FIELD_KIND_I16: return v->value.i16;
        case AMQP_FIELD_KIND_U16: return v->value.u16;
        case AMQP_FIELD_KIND_I32: return v->value.i32;
        case AMQP_FIELD_KIND_U32: return v->value.u32;
        case AMQP_FIELD_KIND_I64: return v->value.i64;
        case AMQP_FIELD_KIND_U64: return v->value.u64 > INT64_MAX ? INT64_MAX : (int64_t)v->value.u64;
        default: return -1;
        }
    }
    return -1;
}

void lr_amqp_delivery_free(lr_amqp_delivery_t *d) {
    if (d == NULL) {
        return;
    }
    free(d->queue);
    free(d->exchange);
    free(d->routing_key);
    free(d->body);
    free(d->message_id);
    free(d->correlation_id);
    free(d->reply_to);
    free(d->content_type);
    free(d->headers_json);
    free(d);
}
