/*
 * fuzz_util.h - helpers shared by the libFuzzer targets in tests/fuzz/.
 *
 * Every target is one LLVMFuzzerTestOneInput() over one parser of outside
 * input.  A finding is anything ASan/UBSan/LSan report, or a FUZZ_CHECK()
 * that fails: the check names the property that broke and the target
 * aborts, so libFuzzer saves the input as crash-<sha1>.
 *
 * Ownership: fuzz_strndup() returns a malloc'd, NUL-terminated copy that the
 * caller frees; fuzz_split() copies fields into caller-owned storage.
 */
#ifndef LR_FUZZ_UTIL_H
#define LR_FUZZ_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Aborts with the property that failed (libFuzzer records the input). */
#define FUZZ_CHECK(cond, what)                                                                         \
    do {                                                                                               \
        if (!(cond)) {                                                                                 \
            fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s (%s)\n", __FILE__, __LINE__, what, #cond); \
            abort();                                                                                   \
        }                                                                                              \
    } while (0)

/* A malloc'd NUL-terminated copy of data[0..n) (embedded NULs kept). */
static inline char *fuzz_strndup(const uint8_t *data, size_t n) {
    char *s = malloc(n + 1);
    if (s == NULL) {
        abort();
    }
    if (n > 0) {
        memcpy(s, data, n);
    }
    s[n] = '\0';
    return s;
}

/* Whether errbuf holds a NUL within its size (error messages are C strings). */
static inline bool fuzz_terminated(const char *buf, size_t size) { return memchr(buf, '\0', size) != NULL; }

/* Length of the valid UTF-8 sequence at s (1-4), or 0 when it is not one.
 * Used to check that what the worker will store in jsonb is storable. */
static inline size_t fuzz_utf8_len(const unsigned char *s, size_t n) {
    if (s[0] < 0x80) {
        return 1;
    }
    if (s[0] >= 0xc2 && s[0] <= 0xdf && n >= 2 && (s[1] & 0xc0) == 0x80) {
        return 2;
    }
    if (s[0] >= 0xe0 && s[0] <= 0xef && n >= 3 && (s[1] & 0xc0) == 0x80 && (s[2] & 0xc0) == 0x80) {
        unsigned cp = ((s[0] & 0x0fu) << 12) | ((s[1] & 0x3fu) << 6) | (s[2] & 0x3fu);
        return (cp >= 0x800 && (cp < 0xd800 || cp > 0xdfff)) ? 3 : 0;
    }
    if (s[0] >= 0xf0 && s[0] <= 0xf4 && n >= 4 && (s[1] & 0xc0) == 0x80 && (s[2] & 0xc0) == 0x80 &&
        (s[3] & 0xc0) == 0x80) {
        unsigned cp = ((s[0] & 0x07u) << 18) | ((s[1] & 0x3fu) << 12) | ((s[2] & 0x3fu) << 6) | (s[3] & 0x3fu);
        return (cp >= 0x10000 && cp <= 0x10ffff) ? 4 : 0;
    }
    return 0;
}

/* Whether s (JSON text printed by cJSON, which never prints a \u0000 escape)
 * is text PostgreSQL's jsonb accepts: valid UTF-8 by PostgreSQL's rules (no
 * overlong forms, no surrogates, nothing above U+10FFFF). */
static inline bool fuzz_pg_json_ok(const char *s) {
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t k = fuzz_utf8_len((const unsigned char *)s + i, n - i);
        if (k == 0) {
            return false;
        }
        i += k;
    }
    return true;
}

/* Properties that can be switched off while a known, reported defect is being
 * fixed, so that it does not hide new findings: LR_FUZZ_STRICT=0 in the
 * environment turns them off (default on).  run.sh replays the regression
 * inputs with LR_FUZZ_STRICT=1 always. */
static inline bool fuzz_strict(void) {
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("LR_FUZZ_STRICT");
        v = !(e != NULL && strcmp(e, "0") == 0);
    }
    return v == 1;
}

#endif
