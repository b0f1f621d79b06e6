/*
 * fuzz_retry_after.c - libFuzzer target for lr_retry_after_ms()
 * (worker/provider.c): the retry-after-ms and retry-after header values of a
 * 429/5xx model response (text a provider, a proxy or an attacker controls).
 *
 * Input layout: the retry-after-ms value, a NUL, the retry-after value.
 * Without a NUL the whole input is retry-after-ms and retry-after is absent;
 * an empty field is passed as NULL (header absent).
 */
#include "fuzz_util.h"
#include "provider.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = fuzz_strndup(data, size);
    const char *nul = memchr(buf, '\0', size);
    const char *ms = buf[0] != '\0' ? buf : NULL;
    const char *s = nul != NULL && nul[1] != '\0' ? nul + 1 : NULL;
    long v = lr_retry_after_ms(ms, s);
    FUZZ_CHECK(v >= -1, "a wait in ms, or -1 when absent or bad");
    if (ms == NULL && s == NULL) {
        FUZZ_CHECK(v == -1, "no header: -1");
    }
    free(buf);
    return 0;
}
