/*
 * membudget.c - the worker's memory budget (membudget.h for what is charged
 * and the rules that keep the worker within it).
 */
#include "membudget.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "log.h"

static void wake_cb(uv_timer_t *t);

void lr_mem_init(lr_mem_t *m, uv_loop_t *loop, size_t budget, void (*on_room)(void *arg), void *arg) {
    memset(m, 0, sizeof(*m));
    uv_timer_init(loop, &m->wake);
    m->wake.data = m;
    m->budget = budget;
    m->estimate = LR_MEM_MIN_RESERVE;
    lr_list_init(&m->active);
    lr_list_init(&m->starting);
    lr_list_init(&m->paused);
    m->on_room = on_room;
    m->arg = arg;
}

/* A limit file's number of bytes, or 0 when absent or "max". */
static size_t read_limit(const char *path) {
    char buf[64];
    FILE *f = fopen(path, "re");
    size_t n;
    unsigned long long v;
    char *end;
    if (f == NULL) {
        return 0;
    }
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    v = strtoull(buf, &end, 10);
    if (end == buf || v == 0 || v >= (1ULL << 62)) {
        return 0; /* "max", unreadable, or v1's "no limit" (a huge number) */
    }
    return (size_t)v;
}

/* This process's cgroup limit: the path from /proc/self/cgroup (v2 "0::",
 * or v1's "memory" controller) under /sys/fs/cgroup, else the root of the
 * mount (a container's own cgroup namespace shows its cgroup as "/"). */
static size_t cgroup_limit(void) {
    char line[512], path[1024];
    size_t lim = 0;
    FILE *f = fopen("/proc/self/cgroup", "re");
    while (f != NULL && lim == 0 && fgets(line, sizeof(line), f) != NULL) {
        char *rel = strchr(line, ':'), *ctl, *end;
        if (rel == NULL) {
            continue;
        }
        ctl = rel + 1;
        rel = strchr(ctl, ':');
        if (rel == NULL) {
            continue;
        }
        *rel++ = '\0';
        end = strchr(rel, '\n');
        if (end != NULL) {
            *end = '\0';
        }
        if (ctl[0] == '\0') { /* v2 */
            snprintf(path, sizeof(path), "/sys/fs/cgroup%s/memory.max", strcmp(rel, "/") == 0 ? "" : rel);
            lim = read_limit(path);
        } else if (strstr(ctl, "memory") != NULL) { /* v1 */
            snprintf(path, sizeof(path), "/sys/fs/cgroup/memory%s/memory.limit_in_bytes",
                     strcmp(rel, "/") == 0 ? "" : rel);
            lim = read_limit(path);
        }
    }
    if (f != NULL) {
        fclose(f);
    }
    if (lim == 0) {
        lim = read_limit("/sys/fs/cgroup/memory.max");
    }
    if (lim == 0) {
        lim = read_limit("/sys/fs/cgroup/memory/memory.limit_in_bytes");
    }
    return lim;
}

/* Bytes of address space mapped now (/proc/self/statm, first field). */
static size_t mapped_now(void) {
    unsigned long pages = 0;
    FILE *f = fopen("/proc/self/statm", "re");
    if (f != NULL) {
        if (fscanf(f, "%lu", &pages) != 1) {
            pages = 0;
        }
        fclose(f);
    }
    return (size_t)pages * (size_t)sysconf(_SC_PAGESIZE);
}

size_t lr_mem_default_budget(const char **source) {
    size_t cg = cgroup_limit() / 2;
    size_t as = 0;
    struct rlimit rl;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        size_t used = mapped_now();
        as = (size_t)rl.rlim_cur > used ? ((size_t)rl.rlim_cur - used) / 2 : 1;
    }
    if (cg != 0 && (as == 0 || cg <= as)) {
        *source = "cgroup";
        return cg;
    }
    if (as != 0) {
        *source = "rlimit";
        return as;
    }
    *source = "none";
    return 0;
}

static bool fits(const lr_mem_t *m, size_t n) {
    return m->budget == 0 || (m->used <= m->budget && n <= m->budget - m->used);
}

static void add(lr_mem_t *m, size_t n) {
    m->used += n;
    if (m->used > m->peak) {
        m->peak = m->used;
    }
}

static void sub(lr_mem_t *m, size_t n) {
    m->used = n <= m->used ? m->used - n : 0;
    /* Room may have appeared: wake waiters from the loop, not from here. */
    if (!lr_list_empty(&m->starting) || !lr_list_empty(&m->paused) || m->over) {
        uv_timer_start(&m->wake, wake_cb, 0, 0);
    }
}

bool lr_mem_room(lr_mem_t *m) {
    bool room = fits(m, 1) && lr_list_empty(&m->starting);
    if (room == m->over) {
        m->over = !room;
        if (!room) {
            lr_info("memory.over_budget",
                    "memory budget reached (%zu of %zu bytes charged): holding new tasks unclaimed", m->used,
                    m->budget);
        } else {
            lr_info("memory.room", "memory below the budget again (%zu of %zu bytes): claiming", m->used, m->budget);
        }
    }
    return room;
}

void lr_mem_charge(lr_mem_t *m, size_t n) { add(m, n); }

void lr_mem_release(lr_mem_t *m, size_t n) { sub(m, n); }

/* Whether c may grow past the budget: it is the oldest call in flight and
 * nothing else is about to free memory. */
static bool is_oldest(const lr_mem_t *m, const lr_mem_call_t *c) {
    return m->settling == 0 && !lr_list_empty(&m->active) && lr_list_first(&m->active) == &c->active;
}

/* Whether a call may start over the budget: nothing else would ever make
 * room (no call in flight, no answer settling). */
static bool idle(const lr_mem_t *m) { return m->settling == 0 && lr_list_empty(&m->active); }

static void admit(lr_mem_t *m, lr_mem_call_t *c, size_t n) {
    c->state = LR_MEM_CALL_ACTIVE;
    c->charged = n;
    add(m, n);
    lr_list_push_back(&m->active, &c->active);
}

bool lr_mem_call_begin(lr_mem_t *m, lr_mem_call_t *c, void (*ready)(lr_mem_call_t *c)) {
    size_t n = m->estimate;
    c->ready = ready;
    lr_list_init(&c->link);
    lr_list_init(&c->active);
    if ((lr_list_empty(&m->starting) && fits(m, n)) || idle(m)) {
        admit(m, c, n);
        return true;
    }
    c->state = LR_MEM_CALL_STARTING;
    c->want = n;
    c->charged = 0;
    lr_list_push_back(&m->starting, &c->link);
    m->waits++;
    return false;
}

bool lr_mem_call_grow(lr_mem_t *m, lr_mem_call_t *c, size_t total) {
    if (total <= c->charged) {
        return true;
    }
    if (c->state != LR_MEM_CALL_ACTIVE) {
        return false; /* (a paused call is not read) */
    }
    if (fits(m, total - c->charged) || is_oldest(m, c)) {
        add(m, total - c->charged);
        c->charged = total;
        return true;
    }
    c->state = LR_MEM_CALL_PAUSED;
    c->want = total;
    lr_list_push_back(&m->paused, &c->link);
    m->waits++;
    return false;
}

/* Takes c out of every list (IDLE again); returns what it had charged. */
static size_t unlink_call(lr_mem_t *m, lr_mem_call_t *c) {
    size_t n = c->charged;
    if (c->state == LR_MEM_CALL_STARTING || c->state == LR_MEM_CALL_PAUSED) {
        lr_list_remove(&c->link);
    }
    if (c->state == LR_MEM_CALL_ACTIVE || c->state == LR_MEM_CALL_PAUSED) {
        lr_list_remove(&c->active);
        /* The next reservation: the largest recent peak, decaying by an
         * eighth per call so that one giant answer is forgotten in time. */
        m->estimate -= m->estimate / 8;
        if (n > m->estimate) {
            m->estimate = n;
        }
        if (m->estimate < LR_MEM_MIN_RESERVE) {
            m->estimate = LR_MEM_MIN_RESERVE;
        }
    }
    c->state = LR_MEM_CALL_IDLE;
    c->charged = c->want = 0;
    return n;
}

size_t lr_mem_call_detach(lr_mem_t *m, lr_mem_call_t *c) {
    size_t n;
    if (c->state == LR_MEM_CALL_IDLE) {
        return 0;
    }
    n = unlink_call(m, c);
    m->settling += n;
    return n;
}

void lr_mem_settled(lr_mem_t *m, size_t n) { m->settling = n <= m->settling ? m->settling - n : 0; }

void lr_mem_call_end(lr_mem_t *m, lr_mem_call_t *c) {
    if (c->state != LR_MEM_CALL_IDLE) {
        sub(m, unlink_call(m, c));
    }
}

/* Grants waiting calls while they fit (paused ones first: their answers
 * are under way and free memory sooner), then tells the claims. */
static void grant_paused(lr_mem_t *m, lr_mem_call_t *c) {
    lr_list_remove(&c->link);
    add(m, c->want - c->charged);
    c->charged = c->want;
    c->state = LR_MEM_CALL_ACTIVE;
    c->ready(c);
}

static void wake_cb(uv_timer_t *t) {
    lr_mem_t *m = t->data;
    lr_list_t *first = lr_list_first(&m->active);
    if (first != NULL) {
        /* The oldest call may have become the oldest while paused. */
        lr_mem_call_t *c = lr_list_entry(first, lr_mem_call_t, active);
        if (c->state == LR_MEM_CALL_PAUSED && is_oldest(m, c)) {
            grant_paused(m, c);
        }
    }
    while (!lr_list_empty(&m->paused)) {
        lr_mem_call_t *c = lr_list_entry(lr_list_first(&m->paused), lr_mem_call_t, link);
        if (!fits(m, c->want - c->charged) && !is_oldest(m, c)) {
            break;
        }
        grant_paused(m, c);
    }
    while (!lr_list_empty(&m->starting)) {
        lr_mem_call_t *c = lr_list_entry(lr_list_first(&m->starting), lr_mem_call_t, link);
        if (!fits(m, c->want) && !idle(m)) {
            break;
        }
        lr_list_remove(&c->link);
        admit(m, c, c->want);
        c->ready(c);
    }
    if (m->on_room != NULL && m->over && fits(m, 1) && lr_list_empty(&m->starting)) {
        m->on_room(m->arg);
    }
}
