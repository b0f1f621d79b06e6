/*
 * jsonschema_util.c - paths and messages of the JSON Schema checker and
 * validator: built, escaped and cut to stay valid UTF-8.
 */
#include "jsonschema_int.h"

/* ---- paths and messages ------------------------------------------------- */

const char *lrs_path_str(const path_t *p) { return p->len > 0 ? p->buf : "(root)"; }

static bool ends_with_dots(const path_t *p) { return p->len >= 3 && memcmp(p->buf + p->len - 3, "...", 3) == 0; }

/* Appends seg; returns the length to give back to lrs_path_pop().  Invariant:
 * either 4 bytes are free (room for "..." and the NUL) or the path already
 * ends in "...", so a path that would overflow ends in "..." instead. */
size_t lrs_path_push(path_t *p, const char *seg) {
    size_t mark = p->len, n = strlen(seg);
    if (p->len + n + 4 <= sizeof(p->buf)) {
        memcpy(p->buf + p->len, seg, n + 1);
        p->len += n;
    } else if (!ends_with_dots(p)) {
        memcpy(p->buf + p->len, "...", 4);
        p->len += 3;
    }
    return mark;
}

void lrs_path_pop(path_t *p, size_t mark) {
    p->len = mark;
    p->buf[mark] = '\0';
}

/* Writes s into out (cap bytes, NUL-terminated) escaped as inside a JSON
 * string: quote, backslash and control characters escaped, invalid UTF-8
 * bytes as \xNN; cut with "..." when it does not fit. */
void lrs_escape_text(const char *s, char *out, size_t cap) {
    size_t o = 0, n = strlen(s);
    for (size_t i = 0; i < n;) {
        unsigned char ch = (unsigned char)s[i];
        char tok[8];
        size_t k = ch < 0x80 ? 1 : lr_utf8_seq_len((const unsigned char *)s + i, n - i);
        size_t tlen;
        if (ch == '"' || ch == '\\') {
            tok[0] = '\\';
            tok[1] = (char)ch;
            tlen = 2;
        } else if (ch < 0x20 || ch == 0x7f) {
            tlen = (size_t)snprintf(tok, sizeof(tok), "\\u%04x", ch);
        } else if (k == 0) {
            tlen = (size_t)snprintf(tok, sizeof(tok), "\\x%02x", ch);
            k = 1;
        } else {
            memcpy(tok, s + i, k);
            tlen = k;
        }
        if (o + tlen + 4 > cap) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        memcpy(out + o, tok, tlen);
        o += tlen;
        i += k;
    }
    out[o] = '\0';
}

/* Drops a UTF-8 sequence that a cut left incomplete at the end of s. */
void lrs_utf8_trim_tail(char *s) {
    size_t n = strlen(s), i = n;
    while (i > 0 && n - i < 4 && ((unsigned char)s[i - 1] & 0xc0) == 0x80) {
        i--;
    }
    if (i == 0) {
        s[0] = '\0'; /* empty, or nothing but continuation bytes */
        return;
    }
    i--;
    if ((unsigned char)s[i] >= 0x80 && lr_utf8_seq_len((const unsigned char *)s + i, n - i) != n - i) {
        s[i] = '\0';
    }
}

/* "<path>: <message>" into err (may be NULL). */
LR_PRINTF(4, 0)
void lrs_put_msg(char *err, size_t errlen, const path_t *p, const char *fmt, va_list ap) {
    char body[256];
    if (err == NULL || errlen == 0) {
        return;
    }
    vsnprintf(body, sizeof(body), fmt, ap);
    lrs_utf8_trim_tail(body);
    snprintf(err, errlen, "%s: %s", lrs_path_str(p), body);
    lrs_utf8_trim_tail(err);
}

/* ASCII only, whatever the locale: a Latin-1 locale must not let a lone
 * byte 0xE9 into a message as a "letter". */
bool lrs_ascii_alnum(unsigned char ch) {
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

/* Appends a member name to a path: .name for identifiers, ["name"] else. */
size_t lrs_path_push_name(path_t *p, const char *name) {
    char esc[NAME_SHOWN + 8], seg[NAME_SHOWN + 16];
    bool ident = name[0] != '\0' && !(name[0] >= '0' && name[0] <= '9');
    for (const char *q = name; *q != '\0' && ident; q++) {
        ident = lrs_ascii_alnum((unsigned char)*q) || *q == '_' || *q == '$';
    }
    if (ident && strlen(name) <= NAME_SHOWN) {
        snprintf(seg, sizeof(seg), "%s%s", p->len > 0 ? "." : "", name);
    } else {
        lrs_escape_text(name, esc, sizeof(esc));
        snprintf(seg, sizeof(seg), "[\"%s\"]", esc);
    }
    return lrs_path_push(p, seg);
}

size_t lrs_path_push_index(path_t *p, int i) {
    char seg[24];
    snprintf(seg, sizeof(seg), "[%d]", i);
    return lrs_path_push(p, seg);
}

/* A number as short as it can be printed without changing its value. */
const char *lrs_fmt_num(double v, char *buf, size_t cap) {
    snprintf(buf, cap, "%.15g", v);
    if (strtod(buf, NULL) != v) {
        snprintf(buf, cap, "%.17g", v);
    }
    return buf;
}

const cJSON *lrs_kw(const cJSON *schema, const char *name) {
    return cJSON_IsObject(schema) ? cJSON_GetObjectItemCaseSensitive(schema, name) : NULL;
}
