/*
 * test_redact.c - unit test of common/redact.c.
 *
 * - the corpus (tests/unit/redact_corpus.txt): positive and negative
 *   examples of every built-in class, each with the exact output;
 * - each class alone, "none", custom patterns (named and not), and the
 *   configuration errors (unknown class, bad or empty-matching regex, too
 *   many, too long);
 * - cuts: the output's maximum never shows part of a secret nor of a
 *   marker nor of a UTF-8 sequence, and with LR_REDACT_PARTIAL nothing of
 *   the lookahead is shown;
 * - random texts with secrets planted at random places: none survives;
 * - the cost per 4 KiB payload (printed; held under a generous bound so a
 *   pathological rule fails the test).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "redact.h"
#include "testutil.h"

#ifndef LR_SOURCE_DIR
#define LR_SOURCE_DIR "."
#endif

static char *redact(const lr_redact_t *r, const char *s, size_t max, unsigned flags, lr_redact_out_t *o) {
    lr_redact_out_t local;
    if (o == NULL) {
        o = &local;
    }
    T_EQ_INT(lr_redact_text(r, s, strlen(s), max, flags, o), 0);
    T_ASSERT(o->text != NULL && strlen(o->text) == o->len && o->len <= max);
    return o->text;
}

static void expect(const lr_redact_t *r, const char *in, const char *want, int line) {
    char *got = redact(r, in, 65536, 0, NULL);
    if (strcmp(got, want) != 0) {
        fprintf(stderr, "line %d:\n  in:   %s\n  want: %s\n  got:  %s\n", line, in, want, got);
        T_FAIL("redaction differs");
    }
    free(got);
}

/* Reads the corpus: pairs of "in:" and "out:" lines. */
static void test_corpus(void) {
    char path[512], line[4096], in[4096] = "";
    int n = 0, pos = 0, neg = 0, ln = 0, in_line = 0;
    lr_redact_t *r = NULL;
    FILE *f;
    snprintf(path, sizeof(path), "%s/tests/unit/redact_corpus.txt", LR_SOURCE_DIR);
    f = fopen(path, "r");
    if (f == NULL) {
        T_FAIL("cannot open %s", path);
    }
    T_EQ_INT(lr_redact_new(&r, "all", NULL, NULL, 0), 0);
    while (fgets(line, sizeof(line), f) != NULL) {
        char *v;
        ln++;
        line[strcspn(line, "\n")] = '\0';
        if (line[0] == '#' || line[0] == '\0') {
            continue;
        }
        v = line + 4;
        while (*v == ' ') {
            v++;
        }
        if (strncmp(line, "in:", 3) == 0) {
            T_ASSERT(in[0] == '\0');
            snprintf(in, sizeof(in), "%s", line + 3 + strspn(line + 3, " "));
            in_line = ln;
        } else if (strncmp(line, "out:", 4) == 0) {
            T_ASSERT(in[0] != '\0');
            if (strcmp(v, "=") == 0) {
                expect(r, in, in, in_line);
                neg++;
            } else {
                T_ASSERT(strstr(v, "[redacted:") != NULL);
                expect(r, in, v, in_line);
                pos++;
            }
            n++;
            in[0] = '\0';
        } else {
            T_FAIL("%s:%d: neither in: nor out:", path, ln);
        }
    }
    fclose(f);
    T_ASSERT(in[0] == '\0');
    T_ASSERT(pos >= 30 && neg >= 20);
    lr_redact_free(r);
    printf("corpus: %d examples (%d positive, %d negative): ok\n", n, pos, neg);
}

static void test_classes(void) {
    static const char text[] = "a@b.example 4111111111111111 sk-abcdefghijklmnop1234 TICK-12345 emp 77";
    lr_redact_t *r = NULL;
    char *out;
    lr_redact_out_t o;
    T_EQ_INT(lr_redact_new(&r, "email", NULL, NULL, 0), 0);
    out = redact(r, text, 1000, 0, &o);
    T_EQ_STR(out, "[redacted:email] 4111111111111111 sk-abcdefghijklmnop1234 TICK-12345 emp 77");
    T_EQ_INT(o.matches, 1);
    T_EQ_INT(lr_redact_classes(r), 1);
    free(out);
    lr_redact_free(r);
    T_EQ_INT(lr_redact_new(&r, " card , api_key,card", NULL, NULL, 0), 0);
    out = redact(r, text, 1000, 0, NULL);
    T_EQ_STR(out, "a@b.example [redacted:card] [redacted:api_key] TICK-12345 emp 77");
    free(out);
    lr_redact_free(r);
    T_EQ_INT(lr_redact_new(&r, "none", NULL, NULL, 0), 0);
    T_EQ_INT(lr_redact_rules(r), 0);
    out = redact(r, text, 1000, 0, NULL);
    T_EQ_STR(out, text);
    free(out);
    lr_redact_free(r);
    /* custom patterns: named, unnamed, with the built-in classes or alone */
    T_EQ_INT(lr_redact_new(&r, "none", "ticket=TICK-[0-9]{4,}\n\nemp [0-9]+\r\n", NULL, 0), 0);
    out = redact(r, text, 1000, 0, &o);
    T_EQ_STR(out, "a@b.example 4111111111111111 sk-abcdefghijklmnop1234 [redacted:ticket] [redacted:custom]");
    T_EQ_INT(lr_redact_classes(r), 2);
    T_EQ_STR(lr_redact_class_name(r, 0), "ticket");
    T_EQ_INT(o.counts[0], 1);
    T_EQ_INT(o.counts[1], 1);
    free(out);
    lr_redact_free(r);
    T_EQ_INT(lr_redact_new(&r, NULL, "custom=a=b", NULL, 0), 0); /* NULL: all */
    out = redact(r, "x a=b y@z.example", 1000, 0, &o);
    T_EQ_STR(out, "x [redacted:custom] [redacted:email]");
    T_EQ_INT(lr_redact_classes(r), 4);
    free(out);
    lr_redact_free(r);
    lr_redact_free(NULL);
    printf("classes and custom patterns: ok\n");
}

static void test_errors(void) {
    static const struct {
        const char *classes, *patterns, *why;
    } bad[] = {
        {"email,phone", NULL, "unknown class 'phone'"},
        {"All", NULL, "unknown class 'All'"},
        {"all", "(unclosed", "(unclosed: "},
        {"all", "name=[z-a]", "[z-a]: "},
        {"all", "x*", "matches the empty string"},
        {"all", "ok=a+\nnope=(b|)", "matches the empty string"},
        {"all", "name=", "is empty"},
    };
    char err[256], many[2048] = "", big[700];
    lr_redact_t *r = (lr_redact_t *)&r;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        T_EQ_INT(lr_redact_new(&r, bad[i].classes, bad[i].patterns, err, sizeof(err)), LR_ECONFIG);
        T_ASSERT(r == NULL);
        if (strstr(err, bad[i].why) == NULL) {
            T_FAIL("error %d: \"%s\" does not say \"%s\"", (int)i, err, bad[i].why);
        }
    }
    for (int i = 0; i <= LR_REDACT_MAX_CUSTOM; i++) {
        snprintf(many + strlen(many), sizeof(many) - strlen(many), "p%d=x%d\n", i, i);
    }
    T_EQ_INT(lr_redact_new(&r, "none", many, err, sizeof(err)), LR_ECONFIG);
    T_ASSERT(strstr(err, "more than 16 patterns") != NULL);
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    T_EQ_INT(lr_redact_new(&r, "none", big, err, sizeof(err)), LR_ECONFIG);
    T_ASSERT(strstr(err, "longer than 512 bytes") != NULL);
    printf("configuration errors: ok (last: %s)\n", err);
}

/* No 6-byte run of secret appears in out (the texts around the secrets
 * share no such run with them). */
static void no_trace(const char *out, const char *secret, const char *what) {
    size_t n = strlen(secret);
    for (size_t i = 0; i + 6 <= n; i++) {
        char run[7];
        memcpy(run, secret + i, 6);
        run[6] = '\0';
        if (strstr(out, run) != NULL) {
            T_FAIL("%s: \"%s\" of the secret %s shows in \"%s\"", what, run, secret, out);
        }
    }
}

static bool utf8_ok(const char *s) {
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0';) {
        int k = *p < 0x80 ? 1 : (*p & 0xE0) == 0xC0 ? 2 : (*p & 0xF0) == 0xE0 ? 3 : (*p & 0xF8) == 0xF0 ? 4 : 0;
        if (k == 0) {
            return false;
        }
        for (int i = 1; i < k; i++) {
            if ((p[i] & 0xC0) != 0x80) {
                return false;
            }
        }
        p += k;
    }
    return true;
}

static void test_cuts(void) {
    static const char key[] = "sk-Zq9Xw7Vk2Pm4Hj2RtLc8";
    lr_redact_t *r = NULL;
    char text[8192], *out;
    lr_redact_out_t o;
    T_EQ_INT(lr_redact_new(&r, "all", NULL, NULL, 0), 0);
    /* a key across the maximum, at every offset: all of it or none */
    for (size_t at = 4000; at < 4100; at++) {
        memset(text, 'x', at);
        text[at - 1] = ' ';
        snprintf(text + at, sizeof(text) - at, "%s and more text after it", key);
        out = redact(r, text, 4096, 0, &o);
        no_trace(out, key + 3, "a key across the cut");
        T_EQ_INT(o.cut, at + strlen("[redacted:api_key] and more text after it") > 4096);
        T_ASSERT(o.len <= 4096);
        T_ASSERT(strstr(out, "[redacted:") == NULL || strstr(out, "[redacted:api_key]") != NULL);
        free(out);
    }
    /* a marker that does not fit is left out whole */
    memset(text, 'x', 4090);
    text[4089] = ' ';
    snprintf(text + 4090, sizeof(text) - 4090, "%s", key);
    out = redact(r, text, 4096, 0, &o);
    T_EQ_INT(o.len, 4090);
    T_ASSERT(o.cut && o.matches == 0);
    free(out);
    /* LR_REDACT_PARTIAL: a key that starts in the lookahead is not shown, even cut short */
    memset(text, 'x', 1000);
    text[999] = ' ';
    snprintf(text + 1000, sizeof(text) - 1000, "%.12s", key); /* "sk-Zq9Xw7Vk2": too short to match */
    out = redact(r, text, 4096, LR_REDACT_PARTIAL, &o);
    T_EQ_INT(o.len, 1012 - LR_REDACT_LOOKAHEAD);
    T_ASSERT(o.cut);
    no_trace(out, key + 3, "a key cut by the end of a partial input");
    free(out);
    /* ... and without the flag, the same text is all shown (a short sk- is no key) */
    out = redact(r, text, 4096, 0, &o);
    T_EQ_INT(o.len, 1012);
    T_ASSERT(!o.cut);
    free(out);
    /* never inside a UTF-8 sequence: 3-byte characters cut at every maximum */
    text[0] = '\0';
    for (int i = 0; i < 300; i++) {
        strcat(text, "\xe2\x82\xac"); /* U+20AC, 900 bytes in all */
    }
    for (size_t max = 0; max < 40; max++) {
        out = redact(r, text, max, 0, &o);
        T_ASSERT(utf8_ok(out) && o.len == max / 3 * 3 && o.cut);
        free(out);
    }
    out = redact(r, text, 4096, LR_REDACT_PARTIAL, &o); /* the lookahead ends inside a character */
    T_ASSERT(utf8_ok(out) && o.len == (900 - LR_REDACT_LOOKAHEAD) / 3 * 3 && o.cut);
    free(out);
    /* NUL bytes inside: matched as characters, kept */
    {
        static const char nul[] = "a\0b jane@example.com\0c";
        T_EQ_INT(lr_redact_text(r, nul, sizeof(nul) - 1, 100, 0, &o), 0);
        T_EQ_INT(o.len, 4 + strlen("[redacted:email]") + 2);
        T_ASSERT(memcmp(o.text, "a\0b [redacted:email]\0c", o.len) == 0);
        free(o.text);
    }
    lr_redact_free(r);
    printf("cuts: ok\n");
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static unsigned next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng >> 11);
}

/* Random prose, JSON punctuation and numbers with secrets planted in it:
 * after redaction, no 6-byte run of any secret remains.  (A secret follows a
 * space: one glued to the end of a word may be part of that word.) */
static void test_random(void) {
    static const char *const secrets[] = {"jane.roe@example.com",
                                          "4111111111111111",
                                          "5555 5555 5555 4444",
                                          "378282246310005",
                                          "sk-proj-Qm9vdHN0cmFwMTIzNDU2",
                                          "AKIAIOSFODNN7EXAMPLE",
                                          "ghp_Zq9Xw7Vk2Pm4Hj2RtLc8Zq9Xw7Vk2Pm4Hj2R",
                                          "xoxb-1234567890-Zq9Xw7Vk2Pm4"};
    static const char *const words[] = {"the",   "task", "agent", "step", ":",  ",",     "{\"k\":", "}", "\\n",
                                        "token", "987",  "2.71",  "-",    "\"", "order", "id",      " ", "\t"};
    lr_redact_t *r = NULL;
    char text[4096];
    int planted = 0;
    T_EQ_INT(lr_redact_new(&r, "all", NULL, NULL, 0), 0);
    for (int round = 0; round < 2000; round++) {
        const char *s = secrets[next() % (sizeof(secrets) / sizeof(secrets[0]))];
        size_t len = 0;
        char *out;
        int at = (int)(next() % 40);
        for (int w = 0; w < 60; w++) {
            const char *word = w == at ? s : words[next() % (sizeof(words) / sizeof(words[0]))];
            len += (size_t)snprintf(text + len, sizeof(text) - len, "%s%s", word,
                                    w == at || w == at - 1 || next() % 3 ? " " : "");
        }
        out = redact(r, text, sizeof(text), 0, NULL);
        no_trace(out, strncmp(s, "sk-", 3) == 0 ? s + 3 : s, text);
        planted++;
        free(out);
    }
    lr_redact_free(r);
    printf("random texts: %d secrets planted, none left: ok\n", planted);
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

/* Microseconds per redaction of text (n bytes), best of a few rounds. */
static double cost(const lr_redact_t *r, const char *text, size_t n) {
    double best = 1e12;
    for (int round = 0; round < 5; round++) {
        double t0 = now_us();
        for (int i = 0; i < 20; i++) {
            lr_redact_out_t o;
            T_EQ_INT(lr_redact_text(r, text, n, 4096, LR_REDACT_PARTIAL, &o), 0);
            free(o.text);
        }
        if ((now_us() - t0) / 20 < best) {
            best = (now_us() - t0) / 20;
        }
    }
    return best;
}

static void test_cost(void) {
    static const char json[] =
        "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"system\",\"content\":\"You are a support agent. Be "
        "brief.\"},{\"role\":\"user\",\"content\":\"My order 80412 has not arrived; write to me at "
        "jane.roe@example.com, card ending 4242.\"},{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"call_1\","
        "\"type\":\"function\",\"function\":{\"name\":\"lookup_order\",\"arguments\":\"{\\\"order\\\":80412}\"}}]},"
        "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"{\\\"status\\\":\\\"shipped\\\",\\\"eta\\\":"
        "\\\"2026-12-10\\\"}\"}],\"max_tokens\":1024,\"temperature\":0.2}";
    static char text[4096 + LR_REDACT_LOOKAHEAD + 1];
    static const struct {
        const char *name;
        const char *fill;
    } kinds[] = {
        {"model request JSON", json},
        {"base64 blob", "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3ODkrLw"},
        {"digits", "4111 1111 1111 1112 3782 8224 6310 0050 "},
        {"at signs", "a@b@c@d@e@f@g@h@"},
        {"key-like words", "sk-x token: secret= Bearer bearer api_key AKIA ghp_ xoxb- "},
    };
    lr_redact_t *r = NULL, *none = NULL;
    size_t n = sizeof(text) - 1;
    T_EQ_INT(lr_redact_new(&r, "all", NULL, NULL, 0), 0);
    T_EQ_INT(lr_redact_new(&none, "none", NULL, NULL, 0), 0);
    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
        double us, base;
        for (size_t i = 0; i < n; i++) {
            text[i] = kinds[k].fill[i % strlen(kinds[k].fill)];
        }
        text[n] = '\0';
        us = cost(r, text, n);
        base = cost(none, text, n);
        printf("cost: %-20s %zu bytes: %7.1f us (copy alone %.1f us)\n", kinds[k].name, n, us, base);
        /* generous (sanitizers, a loaded machine): a quadratic rule takes far more */
        T_ASSERT(us < 20000);
    }
    lr_redact_free(r);
    lr_redact_free(none);
}

int main(void) {
    test_corpus();
    test_classes();
    test_errors();
    test_cuts();
    test_random();
    test_cost();
    return 0;
}
