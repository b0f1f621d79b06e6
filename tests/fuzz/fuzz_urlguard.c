/*
 * fuzz_urlguard.c - libFuzzer target for the callback allow-list matcher
 * (common/urlguard.c): LONGRUN_CALLBACK_ALLOW rules (operator input) and a
 * task's callback_url (producer input, i.e. an attacker's), then the
 * connect-time address check.
 *
 * Input layout: the rules, a NUL, the URL, a NUL, then 4 or 16 bytes of an
 * IPv4 or IPv6 address (fewer: no address check).  Without a NUL the whole
 * input is the URL, checked against a fixed set of rules.
 *
 * Properties: the return codes are the documented ones; a refusal has a
 * reason and no normalised URL; an accepted URL's normalised form is itself
 * accepted, by the same rules, unchanged (what is sent is what was
 * checked); the loggable form never holds a query or fragment; a public
 * address is always allowed and a refused one has an internal class.
 */
#include <arpa/inet.h>
#include <netinet/in.h>

#include "fuzz_util.h"
#include "urlguard.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char default_rules[] =
    "https://hooks.example.com/longrun, https://*.svc.example.com/cb 10.0.0.0/8, http://127.0.0.1:8080/cb,"
    "https://[2001:db8::1]/v6";

static void check_addr(const lr_urlguard_t *g, uint64_t rules, const uint8_t *a, size_t n) {
    struct sockaddr_storage ss;
    size_t len;
    enum lr_urlguard_reason why, cls;
    char buf[64];

    memset(&ss, 0, sizeof(ss));
    if (n >= 16) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        s6->sin6_family = AF_INET6;
        memcpy(&s6->sin6_addr, a, 16);
        len = sizeof(*s6);
    } else if (n >= 4) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        s4->sin_family = AF_INET;
        memcpy(&s4->sin_addr, a, 4);
        len = sizeof(*s4);
    } else {
        return;
    }
    cls = lr_urlguard_classify((struct sockaddr *)&ss, len);
    int rc = lr_urlguard_check_addr(g, rules, (struct sockaddr *)&ss, len, &why);
    FUZZ_CHECK(rc == 0 || rc == LR_EPERM, "check_addr returns 0 or LR_EPERM");
    FUZZ_CHECK(why == cls, "check_addr reports the class");
    FUZZ_CHECK(cls != LR_UG_BAD_ADDRESS, "an IPv4/IPv6 address always has a class");
    if (cls == LR_UG_OK) {
        FUZZ_CHECK(rc == 0, "a public address is allowed");
    }
    lr_urlguard_addr_str((struct sockaddr *)&ss, len, buf, sizeof(buf));
    FUZZ_CHECK(fuzz_terminated(buf, sizeof(buf)), "address text terminated");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = fuzz_strndup(data, size);
    const char *nul = memchr(buf, '\0', size);
    const char *rules = nul != NULL ? buf : default_rules;
    const char *url = nul != NULL ? nul + 1 : buf;
    size_t used = nul != NULL ? (size_t)(nul - buf) + 1 : size;
    const char *nul2 = nul != NULL ? memchr(url, '\0', size - used) : NULL;
    const uint8_t *addr = nul2 != NULL ? data + (nul2 - buf) + 1 : NULL;
    size_t addr_len = nul2 != NULL ? size - (size_t)(nul2 - buf) - 1 : 0;
    lr_urlguard_t *g = (lr_urlguard_t *)buf;
    char err[256], shown[256];
    uint64_t mask = 0;
    char *norm = (char *)buf;
    enum lr_urlguard_reason why;

    err[0] = 'x';
    int rc = lr_urlguard_parse(&g, rules, err, sizeof(err));
    FUZZ_CHECK(rc == 0 || rc == LR_ECONFIG || rc == LR_ENOMEM, "parse return code");
    if (rc != 0) {
        FUZZ_CHECK(g == NULL, "nothing returned on failure");
        FUZZ_CHECK(fuzz_terminated(err, sizeof(err)) && err[0] != '\0', "a failure says why");
        free(buf);
        return 0;
    }
    rc = lr_urlguard_match(g, url, &mask, &norm, &why);
    if (rc == 0) {
        uint64_t mask2 = 0;
        char *norm2 = NULL;
        FUZZ_CHECK(why == LR_UG_OK && mask != 0 && norm != NULL, "an accepted URL has rules and a normal form");
        rc = lr_urlguard_match(g, norm, &mask2, &norm2, &why);
        FUZZ_CHECK(rc == 0, "the normalised URL is accepted too");
        FUZZ_CHECK(mask2 == mask, "by the same rules");
        FUZZ_CHECK(strcmp(norm, norm2) == 0, "normalising is idempotent");
        free(norm2);
        free(norm);
    } else {
        FUZZ_CHECK(rc == LR_EPERM, "match returns 0 or LR_EPERM");
        FUZZ_CHECK(why != LR_UG_OK && why < LR_UG_COUNT && mask == 0 && norm == NULL, "a refusal has a reason");
    }
    lr_urlguard_loggable(url, shown, sizeof(shown));
    FUZZ_CHECK(fuzz_terminated(shown, sizeof(shown)), "loggable form terminated");
    FUZZ_CHECK(strchr(shown, '?') == NULL && strchr(shown, '#') == NULL, "no query or fragment in the log");
    if (addr != NULL) {
        check_addr(g, mask, addr, addr_len);
    }
    lr_urlguard_free(g);
    free(buf);
    return 0;
}
