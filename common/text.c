/* text.c - text helpers for outside input; see text.h. */
#include "text.h"

#include <stdlib.h>
#include <string.h>

/* A copy of s (at most max bytes) that is valid UTF-8: invalid bytes become
 * U+FFFD and a cut never splits a character (PostgreSQL's jsonb refuses
 * invalid text, and a tool's body is outside input). */
char *lr_utf8_clean(const char *s, size_t n, size_t max, bool *cut) {
    char *out = malloc((n < max ? n : max) * 3 + 4);
    size_t o = 0, i = 0;
    *cut = false;
    if (out == NULL) {
        return NULL;
    }
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        size_t len = 0;
        unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
        bool ok;
        if (c >= 0x01 && c < 0x80) {
            len = 1;
        } else if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            lo = c == 0xE0 ? 0xA0 : 0x80;  /* no overlong */
            hi = c == 0xED ? 0x9F : 0xBF;  /* no UTF-16 surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            lo = c == 0xF0 ? 0x90 : 0x80;  /* no overlong */
            hi = c == 0xF4 ? 0x8F : 0xBF;  /* nothing above U+10FFFF */
        }
        ok = len > 0 && i + len <= n;
        if (ok && len > 1) {
            unsigned char b1 = (unsigned char)s[i + 1];
            ok = b1 >= lo && b1 <= hi;
            for (size_t k = 2; ok && k < len; k++) {
                ok = ((unsigned char)s[i + k] & 0xC0) == 0x80;
            }
        }
        if (o + (ok ? len : 3) > max) {
            *cut = true;
            break;
        }
        if (ok) {
            memcpy(out + o, s + i, len);
            o += len;
            i += len;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i += 1;
        }
    }
    out[o] = '\0';
    return out;
}

