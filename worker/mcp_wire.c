/*
 * mcp_wire.c - MCP's Streamable HTTP wire format (mcp_wire.h): the answer to
 * a request in a JSON or SSE response body, and a tool result's text.
 *
 * SSE (the WHATWG event-stream format): lines end in LF, CRLF or CR; "data:"
 * lines (one leading space stripped) accumulate, joined by LF; "event:"
 * names the event (MCP sends "message", or none, which means the same);
 * lines starting with ':' are comments (keep-alives); "id:" and "retry:"
 * are not needed here (no resumption: a call that loses its stream is
 * answered by its timeout).  A blank line dispatches the event.  An event
 * the stream ends inside is discarded, as the format says.
 */
#include "mcp_wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Looks at one message (m, owned: taken or freed here).  Returns 1 when it
 * is the answer to id (then *msg = m), else 0. */
static int consider(cJSON *m, double id, cJSON **msg, bool *list_changed) {
    const cJSON *mid = cJSON_GetObjectItemCaseSensitive(m, "id");
    const char *method = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "method"));
    if (cJSON_IsObject(m) && method == NULL && cJSON_IsNumber(mid) && mid->valuedouble == id &&
        (cJSON_GetObjectItemCaseSensitive(m, "result") != NULL ||
         cJSON_GetObjectItemCaseSensitive(m, "error") != NULL)) {
        *msg = m;
        return 1;
    }
    if (method != NULL && strcmp(method, "notifications/tools/list_changed") == 0) {
        *list_changed = true;
    }
    cJSON_Delete(m);
    return 0;
}

/* One JSON text: a message or a batch of them.  Returns 1 (found), 0 (not
 * here), or -1 (not JSON: why set). */
static int consider_json(const char *text, size_t len, double id, cJSON **msg, bool *list_changed, char *why,
                         size_t whylen) {
    cJSON *j = cJSON_ParseWithLength(text, len);
    if (j == NULL) {
        snprintf(why, whylen, "a message that is not JSON: %.60s", text);
        return -1;
    }
    if (cJSON_IsArray(j)) {
        int found = 0;
        cJSON *e;
        while (found == 0 && (e = cJSON_DetachItemFromArray(j, 0)) != NULL) {
            found = consider(e, id, msg, list_changed);
        }
        cJSON_Delete(j);
        return found;
    }
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        snprintf(why, whylen, "a message that is not a JSON-RPC object");
        return -1;
    }
    return consider(j, id, msg, list_changed);
}

static int find_sse(const char *body, size_t len, double id, cJSON **msg, bool *list_changed, char *why,
                    size_t whylen) {
    char *data = malloc(len + 1);
    size_t dlen = 0;
    bool is_message = true, bad = false;
    const char *p = body, *end = body + len;
    int found = 0;
    if (data == NULL) {
        snprintf(why, whylen, "out of memory");
        return LR_EPARSE;
    }
    while (p < end && found == 0) {
        const char *eol = p;
        size_t n;
        while (eol < end && *eol != '\n' && *eol != '\r') {
            eol++;
        }
        if (eol == end) {
            break; /* an unterminated last line: the event is incomplete */
        }
        n = (size_t)(eol - p);
        if (n == 0) {
            if (dlen > 0 && is_message) {
                int r = consider_json(data, dlen, id, msg, list_changed, why, whylen);
                bad = bad || r < 0;
                found = r > 0;
            }
            dlen = 0;
            is_message = true;
        } else if (n >= 5 && strncmp(p, "data:", 5) == 0) {
            const char *v = p + 5;
            size_t vl = n - 5;
            if (vl > 0 && *v == ' ') {
                v++;
                vl--;
            }
            if (dlen > 0) {
                data[dlen++] = '\n';
            }
            memcpy(data + dlen, v, vl);
            dlen += vl;
            data[dlen] = '\0';
        } else if (n >= 6 && strncmp(p, "event:", 6) == 0) {
            const char *v = p + 6;
            size_t vl = n - 6;
            if (vl > 0 && *v == ' ') {
                v++;
                vl--;
            }
            is_message = vl == 0 || (vl == 7 && strncmp(v, "message", 7) == 0);
        }
        /* (comments, id:, retry: and unknown fields are ignored) */
        p = eol + 1;
        if (*eol == '\r' && p < end && *p == '\n') {
            p++;
        }
    }
    free(data);
    if (found) {
        return 0;
    }
    if (!bad) {
        snprintf(why, whylen, "the event stream ended without the answer to request %.0f", id);
    }
    return LR_EPARSE;
}

int lr_mcp_wire_find(const char *ctype, const char *body, size_t len, double id, cJSON **msg, bool *list_changed,
                     char *why, size_t whylen) {
    int r;
    *msg = NULL;
    why[0] = '\0';
    if (ctype != NULL && strncasecmp(ctype, "text/event-stream", 17) == 0) {
        return find_sse(body, len, id, msg, list_changed, why, whylen);
    }
    if (ctype == NULL || strncasecmp(ctype, "application/json", 16) != 0) {
        snprintf(why, whylen, "a response of content type \"%.60s\" (not application/json nor text/event-stream)",
                 ctype != NULL ? ctype : "");
        return LR_EPARSE;
    }
    r = consider_json(body, len, id, msg, list_changed, why, whylen);
    if (r > 0) {
        return 0;
    }
    if (r == 0) {
        snprintf(why, whylen, "a JSON response without the answer to request %.0f", id);
    }
    return LR_EPARSE;
}

/* Appends s (n bytes) to the growing text *buf (*len used, *cap size). */
static bool append(char **buf, size_t *len, size_t *cap, const char *s, size_t n) {
    if (*len + n + 2 > *cap) {
        size_t nc = (*len + n + 2) * 2;
        char *nb = realloc(*buf, nc);
        if (nb == NULL) {
            return false;
        }
        *buf = nb;
        *cap = nc;
    }
    if (*len > 0) {
        (*buf)[(*len)++] = '\n';
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
    return true;
}

char *lr_mcp_wire_text(const cJSON *result) {
    size_t len = 0, cap = 64;
    char *buf = malloc(cap);
    const cJSON *item;
    if (buf == NULL) {
        return NULL;
    }
    buf[0] = '\0';
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(result, "content")) {
        const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(item, "type"));
        const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(item, "text"));
        const cJSON *res = cJSON_GetObjectItemCaseSensitive(item, "resource");
        const char *rtext = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(res, "text"));
        char other[96];
        bool ok;
        if (type != NULL && strcmp(type, "text") == 0 && text != NULL) {
            ok = append(&buf, &len, &cap, text, strlen(text));
        } else if (type != NULL && strcmp(type, "resource") == 0 && rtext != NULL) {
            ok = append(&buf, &len, &cap, rtext, strlen(rtext));
        } else {
            snprintf(other, sizeof(other), "[%.40s content]", type != NULL ? type : "untyped");
            ok = append(&buf, &len, &cap, other, strlen(other));
        }
        if (!ok) {
            free(buf);
            return NULL;
        }
    }
    return buf;
}
