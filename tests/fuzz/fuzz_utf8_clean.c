/*
 * fuzz_utf8_clean.c - libFuzzer target for lr_utf8_clean() (common/text.c):
 * the guard every tool response (cut at the tool's max_result_bytes) and
 * every model response passes through before it can reach jsonb.  Tool
 * responses have no parser of their own; this is their target.
 *
 * Input layout: bytes 0-1 the limit `max` (big-endian), the rest the body
 * (any bytes, NULs included, not NUL-terminated).
 *
 * Properties: the copy is valid UTF-8 as PostgreSQL defines it (no overlong
 * forms, no surrogates, nothing above U+10FFFF), has no NUL, is at most max
 * bytes, is cut only when the next character would not fit, equals the input
 * when the input was already clean and fits, and cleaning it again changes
 * nothing.
 */
#include "fuzz_util.h"
#include "text.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Whether s[0..n) is valid UTF-8 without NUL (PostgreSQL's rules). */
static bool clean_utf8(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t k = s[i] == 0 ? 0 : fuzz_utf8_len(s + i, n - i);
        if (k == 0) {
            return false;
        }
        i += k;
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t max, n, olen;
    const char *body;
    char *out, *again;
    bool cut = true, cut2 = true;

    if (size < 2) {
        return 0;
    }
    max = (size_t)data[0] << 8 | data[1];
    body = (const char *)data + 2;
    n = size - 2;
    out = lr_utf8_clean(body, n, max, &cut);
    FUZZ_CHECK(out != NULL, "a copy (no OOM here)");
    olen = strlen(out);
    FUZZ_CHECK(olen <= max, "the copy is at most max bytes");
    FUZZ_CHECK(clean_utf8((const unsigned char *)out, olen), "the copy is valid UTF-8 for PostgreSQL");
    if (cut) {
        FUZZ_CHECK(olen + 4 > max, "cut only when the next character does not fit");
    }
    if (n <= max && clean_utf8(data + 2, n)) {
        FUZZ_CHECK(!cut && olen == n && memcmp(out, body, n) == 0, "clean input that fits is kept as is");
    }
    again = lr_utf8_clean(out, olen, max, &cut2);
    FUZZ_CHECK(again != NULL && strcmp(again, out) == 0 && !cut2, "cleaning is idempotent");
    free(again);
    free(out);
    return 0;
}
