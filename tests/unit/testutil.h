/* testutil.h - assertion macros for unit tests: each failure prints both
 * operands and the line, then exits 1.  Skip with exit code 77. */
#ifndef LR_TESTUTIL_H
#define LR_TESTUTIL_H
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define T_FAIL(...)                                           \
    do {                                                      \
        fprintf(stderr, "%s:%d: FAIL: ", __FILE__, __LINE__); \
        fprintf(stderr, __VA_ARGS__);                         \
        fputc('\n', stderr);                                  \
        exit(1);                                              \
    } while (0)
#define T_ASSERT(c)                     \
    do {                                \
        if (!(c)) {                     \
            T_FAIL("assertion %s", #c); \
        }                               \
    } while (0)
#define T_EQ_INT(a, b)                                        \
    do {                                                      \
        long long _a = (long long)(a), _b = (long long)(b);   \
        if (_a != _b) {                                       \
            T_FAIL("%s == %s: %lld != %lld", #a, #b, _a, _b); \
        }                                                     \
    } while (0)
#define T_EQ_STR(a, b)                                                                            \
    do {                                                                                          \
        const char *_a = (a), *_b = (b);                                                          \
        if (_a == NULL || _b == NULL || strcmp(_a, _b) != 0) {                                    \
            T_FAIL("%s == %s: \"%s\" != \"%s\"", #a, #b, _a ? _a : "(null)", _b ? _b : "(null)"); \
        }                                                                                         \
    } while (0)
#define T_SKIP(...)                   \
    do {                              \
        fprintf(stderr, "SKIP: ");    \
        fprintf(stderr, __VA_ARGS__); \
        fputc('\n', stderr);          \
        exit(77);                     \
    } while (0)

/* The states reachable from s in a state machine of n (<= 32) states whose
 * legal moves ok(from, to) says, as a bit per state (s included). */
static inline unsigned t_reachable(int s, int n, bool (*ok)(int from, int to)) {
    unsigned seen = 1u << s;
    bool grew = true;
    while (grew) {
        grew = false;
        for (int a = 0; a < n; a++) {
            if (!(seen & (1u << a))) {
                continue;
            }
            for (int b = 0; b < n; b++) {
                if (ok(a, b) && !(seen & (1u << b))) {
                    seen |= 1u << b;
                    grew = true;
                }
            }
        }
    }
    return seen;
}
#endif
