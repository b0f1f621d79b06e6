/*
 * fuzz_classify.c - libFuzzer target for the classification of non-2xx
 * model responses, lr_provider_classify() (worker/provider.c).
 *
 * Input layout (so that seeds stay readable):
 *   byte 0-1   HTTP status, big-endian, taken modulo 1000 (curl's range)
 *   byte 2     x-should-retry: 0 absent, 1 "true", 2 "false", 3 "TRUE",
 *              otherwise the text after the body's first NUL (see below)
 *   rest       the response body; if it holds a NUL, the part after the
 *              first NUL is the x-should-retry value for byte 2 >= 4
 * The worker passes the body NUL-terminated (lr_http_response_t.body).
 */
#include "fuzz_util.h"
#include "provider.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    long status;
    const char *should = NULL;
    char *body;
    char reason[32], detail[256];
    enum lr_call_class cls;
    const char *nul;

    if (size < 3) {
        return 0;
    }
    status = (long)(((unsigned)data[0] << 8 | data[1]) % 1000);
    body = fuzz_strndup(data + 3, size - 3);
    nul = memchr(body, '\0', size - 3);
    switch (data[2]) {
    case 0: should = NULL; break;
    case 1: should = "true"; break;
    case 2: should = "false"; break;
    case 3: should = "TRUE"; break;
    default: should = nul != NULL ? nul + 1 : ""; break;
    }
    memset(reason, 'X', sizeof(reason));
    memset(detail, 'X', sizeof(detail));
    cls = lr_provider_classify(status, body, should, reason, sizeof(reason), detail, sizeof(detail));
    FUZZ_CHECK(cls == LR_CALL_RETRY || cls == LR_CALL_NEXT_MODEL || cls == LR_CALL_PERMANENT, "a known class");
    FUZZ_CHECK(fuzz_terminated(reason, sizeof(reason)) && reason[0] != '\0', "reason is a non-empty C string");
    FUZZ_CHECK(fuzz_terminated(detail, sizeof(detail)) && strncmp(detail, "HTTP ", 5) == 0,
               "detail starts with the status");
    /* Stable rules the worker's retry logic depends on. */
    if (status >= 500 && should == NULL) {
        FUZZ_CHECK(cls == LR_CALL_RETRY, "5xx without x-should-retry is retried");
    }
    free(body);
    return 0;
}
