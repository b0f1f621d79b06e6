/* text.c - text helpers for outside input; see text.h. */
#include "text.h"

#include <cjson/cJSON.h>
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
        size_t len = s[i] == '\0' ? 0 : lr_utf8_seq_len((const unsigned char *)s + i, n - i);
        bool ok = len > 0;
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

bool lr_utf8_is_clean(const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t len = s[i] == '\0' ? 0 : lr_utf8_seq_len((const unsigned char *)s + i, n - i);
        if (len == 0) {
            return false;
        }
        i += len;
    }
    return true;
}

size_t lr_utf8_seq_len(const unsigned char *s, size_t n) {
    size_t k;
    if (n == 0) {
        return 0;
    }
    if (s[0] < 0x80) {
        return 1;
    }
    k = s[0] >= 0xf0 && s[0] <= 0xf4 ? 4 : s[0] >= 0xe0 && s[0] <= 0xef ? 3 : s[0] >= 0xc2 && s[0] < 0xe0 ? 2 : 0;
    if (k == 0 || k > n) {
        return 0;
    }
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            return 0;
        }
    }
    if ((k == 3 && s[0] == 0xe0 && s[1] < 0xa0) || (k == 3 && s[0] == 0xed && s[1] >= 0xa0) ||
        (k == 4 && s[0] == 0xf0 && s[1] < 0x90) || (k == 4 && s[0] == 0xf4 && s[1] >= 0x90)) {
        return 0; /* overlong, surrogate, beyond U+10FFFF */
    }
    return k;
}

bool lr_pg_text_ok(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t k = s[i] == '\0' ? 0 : lr_utf8_seq_len((const unsigned char *)s + i, n - i);
        if (k == 0) {
            return false;
        }
        i += k;
    }
    return true;
}

bool lr_json_storable(const char *b, size_t n) {
    const char *end = NULL;
    cJSON *j;
    if (n == 0 || !lr_pg_text_ok(b, n) || memmem(b, n, "\\u0000", 6) != NULL) {
        return false;
    }
    j = cJSON_ParseWithLengthOpts(b, n, &end, false);
    if (j == NULL) {
        return false;
    }
    cJSON_Delete(j);
    while (end != NULL && (size_t)(end - b) < n && (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r')) {
        end++;
    }
    return end != NULL && (size_t)(end - b) == n;
}

char *lr_bytea_hex(const char *s, size_t n) {
    static const char digits[] = "0123456789abcdef";
    char *hex = malloc(n * 2 + 3);
    if (hex == NULL) {
        return NULL;
    }
    hex[0] = '\\';
    hex[1] = 'x';
    for (size_t i = 0; i < n; i++) {
        hex[2 + 2 * i] = digits[((unsigned char)s[i]) >> 4];
        hex[3 + 2 * i] = digits[((unsigned char)s[i]) & 15];
    }
    hex[2 + 2 * n] = '\0';
    return hex;
}
