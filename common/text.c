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
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        bool ok = len > 0 && i + len <= n && c != 0;
        for (size_t k = 1; ok && k < len; k++) {
            ok = ((unsigned char)s[i + k] & 0xC0) == 0x80;
        }
        if (ok && len == 2 && c < 0xC2) {
            ok = false; /* overlong */
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

