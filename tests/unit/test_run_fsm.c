/* test_run_fsm.c - the run's table of legal moves and of the states each
 * outcome may end from (worker/run_fsm.c), and the diagram in
 * docs/architecture.md generated from it.
 *
 * The expected moves and outcomes are written out here, independently of the
 * tables in run_fsm.c (read off them by a reviewer), and every (from, to)
 * pair and every (state, outcome) pair is checked against them; then the
 * shape of the machine: every state reachable from NEW, every state able to
 * reach DONE, DONE final, every outcome ending only from states that reach
 * DONE.  (Whether run.c's setter refuses and logs an illegal move is run.c's
 * business; this checks the table it asks.)
 *
 * The docs: the text of docs/architecture.md between the run-fsm markers
 * (from the line after the begin marker up to the end marker's line) must be
 * exactly lr_run_fsm_describe()'s output.  After changing the table,
 * regenerate that block with
 *
 *     LR_UPDATE_DOCS=1 build/test_run_fsm
 *
 * (the test binaries are at the top of the build directory), which rewrites
 * the block in place instead of comparing it. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "run_fsm.h"
#include "testutil.h"

#ifndef LR_SOURCE_DIR
#error "LR_SOURCE_DIR must name the source tree (tests/CMakeLists.txt)"
#endif

#define DOC_PATH LR_SOURCE_DIR "/docs/architecture.md"
#define DOC_BEGIN "<!-- run-fsm:begin (generated from worker/run_fsm.c by tests/unit/test_run_fsm.c; do not edit) -->"
#define DOC_END "<!-- run-fsm:end -->"

enum { N = LR_RUN_NSTATES, NO = LR_RUN_NOUTCOMES, END = -1 };

enum {
    NEW = LR_RUN_NEW,
    HELD = LR_RUN_HELD,
    CLAIMING = LR_RUN_CLAIMING,
    DEFERRED = LR_RUN_DEFERRED,
    INSERTING = LR_RUN_INSERTING,
    ADMITTING = LR_RUN_ADMITTING,
    LOADING = LR_RUN_LOADING,
    STEPPING = LR_RUN_STEPPING,
    CHECKPOINTING = LR_RUN_CHECKPOINTING,
    TRANSITION = LR_RUN_TRANSITION,
    PUBLISHING = LR_RUN_PUBLISHING,
    BACKOFF = LR_RUN_BACKOFF,
    MARKING = LR_RUN_MARKING,
    DONE = LR_RUN_DONE,
};

enum {
    NONE = LR_RUN_OUT_NONE,
    SUCCEEDED = LR_RUN_OUT_SUCCEEDED,
    CANCELLED = LR_RUN_OUT_CANCELLED,
    DEAD = LR_RUN_OUT_DEAD,
    SUSPENDED = LR_RUN_OUT_SUSPENDED,
    RETRY_WAIT = LR_RUN_OUT_RETRY_WAIT,
    HANDED_BACK = LR_RUN_OUT_HANDED_BACK,
    REQUEUED = LR_RUN_OUT_REQUEUED,
    FENCED = LR_RUN_OUT_FENCED,
    DROPPED = LR_RUN_OUT_DROPPED,
    REJECTED = LR_RUN_OUT_REJECTED,
};

/* Every legal move, and who triggers it. */
static const struct move {
    int from, to;
    const char *why;
} legal[] = {
    {NEW, CLAIMING, "delivery parsed"},
    {NEW, DONE, "malformed: dead message"},
    {NEW, HELD, "over the memory budget"},
    {HELD, CLAIMING, "room again"},
    {HELD, DONE, "drain"},
    {CLAIMING, CLAIMING, "connection lost: reclaim"},
    {CLAIMING, DEFERRED, "suspect, slot taken"},
    {CLAIMING, INSERTING, "no row"},
    {CLAIMING, ADMITTING, "tenant capped"},
    {CLAIMING, LOADING, "needs the step log"},
    {CLAIMING, STEPPING, "claimed"},
    {CLAIMING, TRANSITION, "claimed, not to run"},
    {CLAIMING, DONE, "duplicate, not runnable, unknown continuation, failed"},
    {DEFERRED, CLAIMING, "suspect slot free"},
    {DEFERRED, DONE, "drain"},
    {INSERTING, CLAIMING, "lost the race / connection"},
    {INSERTING, ADMITTING, "tenant capped"},
    {INSERTING, LOADING, "needs the step log"},
    {INSERTING, STEPPING, "created"},
    {INSERTING, TRANSITION, "created, not to run"},
    {INSERTING, DONE, "value refused, failed"},
    {ADMITTING, LOADING, "within cap, needs the log"},
    {ADMITTING, STEPPING, "within cap"},
    {ADMITTING, TRANSITION, "over cap"},
    {ADMITTING, PUBLISHING, "count failed: handed back"},
    {ADMITTING, DONE, "count failed"},
    {LOADING, STEPPING, "loaded"},
    {LOADING, TRANSITION, "too new, draining"},
    {LOADING, PUBLISHING, "read failed: handed back"},
    {LOADING, DONE, "read failed"},
    {STEPPING, CHECKPOINTING, "executor's done callback"},
    {STEPPING, TRANSITION, "step failed, drain deadline, immediate cancel"},
    {STEPPING, PUBLISHING, "lease timer: no renewal, handed back"},
    {STEPPING, DONE, "lease timer: lease lost"},
    {CHECKPOINTING, STEPPING, "committed, slice goes on"},
    {CHECKPOINTING, PUBLISHING, "committed with an end"},
    {CHECKPOINTING, TRANSITION, "committed, immediate cancel meanwhile"},
    {CHECKPOINTING, DONE, "fenced, failed"},
    {TRANSITION, PUBLISHING, "committed"},
    {TRANSITION, DONE, "fenced, ambiguous, failed, drain deadline"},
    {PUBLISHING, BACKOFF, "publish failed"},
    {PUBLISHING, MARKING, "continuation confirmed"},
    {PUBLISHING, DONE, "confirmed: ack"},
    {BACKOFF, PUBLISHING, "backoff timer"},
    {BACKOFF, DONE, "worker stops"},
    {MARKING, DONE, "marked: ack"},
};
#define NLEGAL (sizeof(legal) / sizeof(legal[0]))

/* Every outcome but NONE and the states it may end from (END-terminated). */
static const struct ending {
    int outcome;
    int from[N + 1];
} endings[] = {
    {SUCCEEDED, {PUBLISHING, BACKOFF, END}},
    {CANCELLED, {PUBLISHING, BACKOFF, END}},
    {DEAD, {PUBLISHING, BACKOFF, END}},
    {SUSPENDED, {PUBLISHING, BACKOFF, END}},
    {RETRY_WAIT, {PUBLISHING, BACKOFF, END}},
    {HANDED_BACK, {PUBLISHING, BACKOFF, MARKING, END}},
    {REQUEUED,
     {HELD, CLAIMING, DEFERRED, INSERTING, ADMITTING, LOADING, STEPPING, CHECKPOINTING, TRANSITION, PUBLISHING, BACKOFF,
      MARKING, END}},
    {FENCED, {STEPPING, CHECKPOINTING, TRANSITION, END}},
    {DROPPED, {CLAIMING, TRANSITION, END}},
    {REJECTED, {NEW, CLAIMING, INSERTING, END}},
};
#define NENDINGS (sizeof(endings) / sizeof(endings[0]))

static unsigned long checks;

/* testutil's macros, counted. */
#define CHECK(c)     \
    do {             \
        checks++;    \
        T_ASSERT(c); \
    } while (0)
#define CHECK_STR(a, b) \
    do {                \
        checks++;       \
        T_EQ_STR(a, b); \
    } while (0)
#define CHECK_INT(a, b) \
    do {                \
        checks++;       \
        T_EQ_INT(a, b); \
    } while (0)

static bool expected_move(int from, int to) {
    for (size_t i = 0; i < NLEGAL; i++) {
        if (legal[i].from == from && legal[i].to == to) {
            return true;
        }
    }
    return false;
}

/* The states outcome o may end from, a bit per state (0 for NONE). */
static unsigned expected_from(int o) {
    for (size_t i = 0; i < NENDINGS; i++) {
        if (endings[i].outcome == o) {
            unsigned set = 0;
            for (int k = 0; endings[i].from[k] != END; k++) {
                set |= 1u << endings[i].from[k];
            }
            return set;
        }
    }
    return 0;
}

static unsigned reachable(int s) { return t_reachable(s, N, lr_run_move_ok); }

static void test_moves(void) {
    size_t n = 0;
    const lr_run_move_t *m = lr_run_fsm_moves(&n);

    /* the test's own list: no pair twice, every pair in range */
    for (size_t i = 0; i < NLEGAL; i++) {
        CHECK(legal[i].from >= 0 && legal[i].from < N && legal[i].to >= 0 && legal[i].to < N);
        for (size_t j = i + 1; j < NLEGAL; j++) {
            CHECK(legal[i].from != legal[j].from || legal[i].to != legal[j].to);
        }
    }
    /* every pair of the grid, both ways */
    for (int from = 0; from < N; from++) {
        for (int to = 0; to < N; to++) {
            bool want = expected_move(from, to);
            checks++;
            if (lr_run_move_ok(from, to) != want) {
                T_FAIL("%s -> %s: table says %s, expected %s", lr_run_state_name(from), lr_run_state_name(to),
                       want ? "illegal" : "legal", want ? "legal" : "illegal");
            }
        }
    }
    /* out of range is never legal */
    for (int s = 0; s < N; s++) {
        CHECK(!lr_run_move_ok(s, N));
        CHECK(!lr_run_move_ok(N, s));
        CHECK(!lr_run_move_ok(-1, s));
        CHECK(!lr_run_move_ok(s, -1));
    }
    CHECK(!lr_run_move_ok(-1, -1));
    CHECK(!lr_run_move_ok(N, N));
    /* the exported table: as many rows as the list, each legal, none twice,
     * each with a reason */
    CHECK(m != NULL);
    CHECK_INT(n, NLEGAL);
    for (size_t i = 0; i < n; i++) {
        CHECK(expected_move(m[i].from, m[i].to));
        CHECK(m[i].why != NULL && m[i].why[0] != '\0');
        CHECK(strchr(m[i].why, '|') == NULL); /* would break the Markdown table */
        for (size_t j = i + 1; j < n; j++) {
            CHECK(m[i].from != m[j].from || m[i].to != m[j].to);
        }
    }
}

static void test_shape(void) {
    /* a state to itself only for claiming (reclaim) */
    for (int s = 0; s < N; s++) {
        CHECK(lr_run_move_ok(s, s) == (s == CLAIMING));
    }
    /* DONE is final; nothing goes back to NEW */
    for (int s = 0; s < N; s++) {
        CHECK(!lr_run_move_ok(DONE, s));
        CHECK(!lr_run_move_ok(s, NEW));
    }
    /* every state reachable from NEW; every state reaches DONE */
    CHECK_INT(reachable(NEW), (1u << N) - 1);
    for (int s = 0; s < N; s++) {
        CHECK(reachable(s) & (1u << DONE));
    }
}

static void test_outcomes(void) {
    unsigned ends_somehow = 0;

    /* the test's own list: every outcome but NONE exactly once, its states
     * in range, each with a move to DONE in the list of moves */
    CHECK_INT(NENDINGS, NO - 1);
    for (int o = 1; o < NO; o++) {
        int seen = 0;
        for (size_t i = 0; i < NENDINGS; i++) {
            seen += endings[i].outcome == o;
        }
        CHECK_INT(seen, 1);
    }
    for (size_t i = 0; i < NENDINGS; i++) {
        CHECK(endings[i].from[0] != END);
        for (int k = 0; endings[i].from[k] != END; k++) {
            int s = endings[i].from[k];
            CHECK(s >= 0 && s < N);
            CHECK(expected_move(s, DONE));
        }
    }
    /* every (state, outcome) pair, both ways */
    for (int o = 0; o < NO; o++) {
        unsigned want = expected_from(o);
        for (int s = 0; s < N; s++) {
            bool w = (want & (1u << s)) != 0;
            checks++;
            if (lr_run_outcome_ok(s, o) != w) {
                T_FAIL("%s from %s: table says %s, expected %s", lr_run_outcome_name(o), lr_run_state_name(s),
                       w ? "refused" : "accepted", w ? "accepted" : "refused");
            }
            if (w) {
                ends_somehow |= 1u << s;
                /* the terminal outcome is reached: the state is reachable
                 * from NEW and moves to DONE */
                CHECK(reachable(NEW) & (1u << s));
                CHECK(lr_run_move_ok(s, DONE));
            }
        }
    }
    /* NONE never; DONE ends nothing; out of range never */
    for (int s = 0; s < N; s++) {
        CHECK(!lr_run_outcome_ok(s, NONE));
        CHECK(!lr_run_outcome_ok(s, NO));
        CHECK(!lr_run_outcome_ok(s, -1));
    }
    for (int o = 0; o < NO; o++) {
        CHECK(!lr_run_outcome_ok(DONE, o));
        CHECK(!lr_run_outcome_ok(-1, o));
        CHECK(!lr_run_outcome_ok(N, o));
    }
    /* and the other way: every state with a move to DONE has an outcome to
     * end with */
    for (int s = 0; s < N; s++) {
        CHECK(!!(ends_somehow & (1u << s)) == lr_run_move_ok(s, DONE));
    }
}

static void test_names(void) {
    for (int s = 0; s < N; s++) {
        const char *a = lr_run_state_name(s);
        CHECK(a != NULL && a[0] != '\0' && strcmp(a, "?") != 0);
        for (int t = s + 1; t < N; t++) {
            CHECK(strcmp(a, lr_run_state_name(t)) != 0);
        }
    }
    CHECK_STR(lr_run_state_name(N), "?");
    CHECK_STR(lr_run_state_name(-1), "?");
    CHECK_STR(lr_run_state_name(NEW), "new");
    CHECK_STR(lr_run_state_name(CLAIMING), "claiming");
    CHECK_STR(lr_run_state_name(DONE), "done");
    for (int o = 0; o < NO; o++) {
        const char *a = lr_run_outcome_name(o);
        CHECK(a != NULL && a[0] != '\0' && strcmp(a, "?") != 0);
        for (int p = o + 1; p < NO; p++) {
            CHECK(strcmp(a, lr_run_outcome_name(p)) != 0);
        }
    }
    CHECK_STR(lr_run_outcome_name(NO), "?");
    CHECK_STR(lr_run_outcome_name(-1), "?");
    CHECK_STR(lr_run_outcome_name(NONE), "none");
    CHECK_STR(lr_run_outcome_name(SUCCEEDED), "succeeded");
    CHECK_STR(lr_run_outcome_name(HANDED_BACK), "handed_back");
    CHECK_STR(lr_run_outcome_name(REJECTED), "rejected");
}

/* The whole description in a fresh buffer (caller frees). */
static char *describe(void) {
    size_t n = lr_run_fsm_describe(NULL, 0);
    char *buf = malloc(n + 1);
    CHECK(buf != NULL);
    CHECK_INT(lr_run_fsm_describe(buf, n + 1), n);
    CHECK_INT(strlen(buf), n);
    return buf;
}

static void test_describe(void) {
    char *d = describe();
    size_t n = strlen(d);
    char small[16], row[256];

    /* like snprintf: truncated, terminated, the full length returned */
    memset(small, 'x', sizeof(small));
    CHECK_INT(lr_run_fsm_describe(small, sizeof(small)), n);
    CHECK_INT(strlen(small), sizeof(small) - 1);
    CHECK(strncmp(small, d, sizeof(small) - 1) == 0);
    small[0] = 'x';
    CHECK_INT(lr_run_fsm_describe(small, 1), n);
    CHECK_INT(small[0], '\0');
    /* every state, move and outcome appears as its row */
    for (int s = 0; s < N; s++) {
        snprintf(row, sizeof(row), "\n| `%s` | ", lr_run_state_name(s));
        CHECK(strstr(d, row) != NULL);
    }
    for (size_t i = 0; i < NLEGAL; i++) {
        snprintf(row, sizeof(row), "\n| `%s` | `%s` | ", lr_run_state_name(legal[i].from),
                 lr_run_state_name(legal[i].to));
        CHECK(strstr(d, row) != NULL);
    }
    for (int o = 1; o < NO; o++) {
        snprintf(row, sizeof(row), "\n| `%s` | ", lr_run_outcome_name(o));
        CHECK(strstr(d, row) != NULL);
    }
    snprintf(row, sizeof(row), "| `%s` |", lr_run_outcome_name(NONE));
    CHECK(strstr(d, row) == NULL);
    CHECK(n > 0 && d[n - 1] == '\n');
    free(d);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t cap = 0, n = 0;
    if (f == NULL) {
        T_FAIL("cannot open %s", path);
    }
    for (;;) {
        if (n + 4096 + 1 > cap) {
            char *b;
            cap = cap ? cap * 2 : 65536;
            b = realloc(buf, cap);
            if (b == NULL) {
                T_FAIL("out of memory reading %s", path);
            }
            buf = b;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) {
            break;
        }
    }
    if (ferror(f)) {
        T_FAIL("cannot read %s", path);
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* docs/architecture.md's generated block: compared, or rewritten when
 * LR_UPDATE_DOCS=1. */
static void test_docs(void) {
    size_t len;
    char *doc = read_file(DOC_PATH, &len);
    char *d = describe();
    const char *begin = strstr(doc, DOC_BEGIN "\n");
    const char *body, *end;
    const char *update = getenv("LR_UPDATE_DOCS");

    if (begin == NULL) {
        T_FAIL("%s: no line \"%s\"", DOC_PATH, DOC_BEGIN);
    }
    body = begin + strlen(DOC_BEGIN "\n");
    end = strstr(body, DOC_END);
    if (end == NULL) {
        T_FAIL("%s: no \"%s\" after the begin marker", DOC_PATH, DOC_END);
    }
    CHECK(strstr(end + 1, DOC_BEGIN) == NULL); /* one block */
    CHECK(end == doc || end[-1] == '\n');
    if (update != NULL && strcmp(update, "1") == 0) {
        char tmp[sizeof(DOC_PATH) + 16];
        FILE *f;
        snprintf(tmp, sizeof(tmp), "%s.tmp", DOC_PATH);
        f = fopen(tmp, "wb");
        if (f == NULL) {
            T_FAIL("cannot write %s", tmp);
        }
        if (fwrite(doc, 1, (size_t)(body - doc), f) != (size_t)(body - doc) ||
            fwrite(d, 1, strlen(d), f) != strlen(d) ||
            fwrite(end, 1, len - (size_t)(end - doc), f) != len - (size_t)(end - doc) || fclose(f) != 0) {
            T_FAIL("cannot write %s", tmp);
        }
        if (rename(tmp, DOC_PATH) != 0) {
            T_FAIL("cannot rename %s to %s", tmp, DOC_PATH);
        }
        printf("rewrote the run-fsm block of %s\n", DOC_PATH);
    } else {
        size_t have = (size_t)(end - body);
        checks++;
        if (have != strlen(d) || memcmp(body, d, have) != 0) {
            T_FAIL("%s: the run-fsm block differs from lr_run_fsm_describe(); regenerate it with "
                   "LR_UPDATE_DOCS=1 and this test's binary",
                   DOC_PATH);
        }
    }
    free(d);
    free(doc);
}

int main(void) {
    test_moves();
    test_shape();
    test_outcomes();
    test_names();
    test_describe();
    test_docs();
    printf("ok: %lu checks; %zu legal moves of %d states, %d outcomes\n", checks, NLEGAL, N, NO - 1);
    return 0;
}
