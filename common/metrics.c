/* metrics.c - the Prometheus registry; see metrics.h. */
#include "metrics.h"

#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "buildinfo.h"
#include "list.h"

enum kind { K_COUNTER, K_GAUGE, K_HISTOGRAM };

typedef struct series {
    char *values[LR_METRIC_MAX_LABELS];
    double value; /* counter / gauge */
    double sum;   /* histogram */
    unsigned long long count;
    unsigned long long *buckets;
} series_t;

struct lr_metric {
    lr_list_t link; /* in families, newest first */
    enum kind kind;
    char *name;
    char *help;
    char *labels[LR_METRIC_MAX_LABELS];
    int nlabels;
    double *bounds;
    int nbounds;
    series_t series[LR_METRIC_MAX_SERIES];
    int nseries;
    pthread_mutex_t mu;
};

const double lr_latency_buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                     0.5,   1,      2.5,   5,    10,    30,   60,  120};
const int lr_latency_nbuckets = (int)(sizeof(lr_latency_buckets) / sizeof(lr_latency_buckets[0]));

static lr_list_t families = {&families, &families}; /* lr_metric_t; guarded by reg_mu */
static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static time_t start_time;

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n, sz);
    if (p == NULL) {
        fprintf(stderr, "longrun: out of memory registering metrics\n");
        abort();
    }
    return p;
}

static char *xstrdup(const char *s) {
    char *p = strdup(s);
    if (p == NULL) {
        abort();
    }
    return p;
}

static lr_metric_t *reg(enum kind k, const char *name, const char *help, const char *labels) {
    lr_metric_t *m;
    pthread_mutex_lock(&reg_mu);
    lr_list_foreach(it, &families) {
        m = lr_list_entry(it, lr_metric_t, link);
        if (strcmp(m->name, name) == 0) {
            pthread_mutex_unlock(&reg_mu);
            return m; /* registering twice returns the same family */
        }
    }
    m = xcalloc(1, sizeof(*m));
    m->kind = k;
    m->name = xstrdup(name);
    m->help = xstrdup(help);
    if (labels != NULL && labels[0] != '\0') {
        char *copy = xstrdup(labels), *save = NULL;
        for (char *t = strtok_r(copy, ",", &save); t != NULL && m->nlabels < LR_METRIC_MAX_LABELS;
             t = strtok_r(NULL, ",", &save)) {
            m->labels[m->nlabels++] = xstrdup(t);
        }
        free(copy);
    }
    pthread_mutex_init(&m->mu, NULL);
    lr_list_push_front(&families, &m->link);
    if (start_time == 0) {
        start_time = time(NULL);
    }
    pthread_mutex_unlock(&reg_mu);
    return m;
}

lr_metric_t *lr_metric_counter(const char *name, const char *help, const char *labels) {
    return reg(K_COUNTER, name, help, labels);
}

lr_metric_t *lr_metric_gauge(const char *name, const char *help, const char *labels) {
    return reg(K_GAUGE, name, help, labels);
}

lr_metric_t *lr_metric_histogram(const char *name, const char *help, const char *labels, const double *buckets,
                                 int nbuckets) {
    lr_metric_t *m = reg(K_HISTOGRAM, name, help, labels);
    if (m->bounds == NULL) {
        m->bounds = xcalloc((size_t)nbuckets, sizeof(double));
        memcpy(m->bounds, buckets, (size_t)nbuckets * sizeof(double));
        m->nbounds = nbuckets;
    }
    return m;
}

/* Finds or creates the series for values; caller holds m->mu. */
static series_t *series_for(lr_metric_t *m, const char *const *values) {
    static const char *const other[LR_METRIC_MAX_LABELS] = {"other", "other", "other"};
    for (int pass = 0; pass < 2; pass++) {
        const char *const *v = pass == 0 ? values : other;
        for (int i = 0; i < m->nseries; i++) {
            bool same = true;
            for (int l = 0; l < m->nlabels && same; l++) {
                const char *x = v != NULL && v[l] != NULL ? v[l] : "";
                same = strcmp(m->series[i].values[l], x) == 0;
            }
            if (same) {
                return &m->series[i];
            }
        }
        if (m->nseries < LR_METRIC_MAX_SERIES - (pass == 0 ? 1 : 0)) {
            series_t *s = &m->series[m->nseries];
            for (int l = 0; l < m->nlabels; l++) {
                const char *x = v != NULL && v[l] != NULL ? v[l] : "";
                s->values[l] = strndup(x, 120);
                if (s->values[l] == NULL) {
                    return NULL;
                }
            }
            if (m->kind == K_HISTOGRAM) {
                s->buckets = calloc((size_t)m->nbounds, sizeof(unsigned long long));
                if (s->buckets == NULL) {
                    return NULL;
                }
            }
            m->nseries++;
            return s;
        }
    }
    return NULL;
}

void lr_metric_add(lr_metric_t *m, const char *const *values, double v) {
    series_t *s;
    if (m == NULL) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    s = series_for(m, values);
    if (s != NULL) {
        s->value += v;
    }
    pthread_mutex_unlock(&m->mu);
}

void lr_metric_set(lr_metric_t *m, const char *const *values, double v) {
    series_t *s;
    if (m == NULL) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    s = series_for(m, values);
    if (s != NULL) {
        s->value = v;
    }
    pthread_mutex_unlock(&m->mu);
}

void lr_metric_remove(lr_metric_t *m, const char *const *values) {
    if (m == NULL) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    for (int i = 0; i < m->nseries; i++) {
        bool same = true;
        for (int l = 0; l < m->nlabels && same; l++) {
            same = strcmp(m->series[i].values[l], values != NULL && values[l] != NULL ? values[l] : "") == 0;
        }
        if (same) {
            for (int l = 0; l < m->nlabels; l++) {
                free(m->series[i].values[l]);
            }
            free(m->series[i].buckets);
            m->series[i] = m->series[--m->nseries]; /* the order of series is not part of the exposition */
            memset(&m->series[m->nseries], 0, sizeof(series_t));
            break;
        }
    }
    pthread_mutex_unlock(&m->mu);
}

void lr_metric_observe(lr_metric_t *m, const char *const *values, double v) {
    series_t *s;
    if (m == NULL || !isfinite(v)) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    s = series_for(m, values);
    if (s != NULL) {
        s->sum += v;
        s->count++;
        for (int i = 0; i < m->nbounds; i++) {
            if (v <= m->bounds[i]) {
                s->buckets[i]++;
            }
        }
    }
    pthread_mutex_unlock(&m->mu);
}

void lr_metric_inc1(lr_metric_t *m, const char *value) {
    const char *v[1] = {value};
    lr_metric_add(m, value != NULL ? v : NULL, 1);
}

/* ------------------------------------------------------------- rendering */

typedef struct buf {
    char *p;
    size_t len, cap;
    bool oom;
} buf_t;

static void bput(buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bput(buf_t *b, const char *fmt, ...) {
    va_list ap;
    int n;
    if (b->oom) {
        return;
    }
    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        {
            size_t ncap = b->cap * 2 + (size_t)n;
            char *np = ncap > 64u * 1024 * 1024 ? NULL : realloc(b->p, ncap);
            if (np == NULL) {
                b->oom = true;
                return;
            }
            b->p = np;
            b->cap = ncap;
        }
    }
}

/* Label values escaped per the exposition format (\\, \", \n). */
static void put_value(buf_t *b, const char *v) {
    for (const char *p = v; *p != '\0'; p++) {
        if (*p == '\\' || *p == '"') {
            bput(b, "\\%c", *p);
        } else if (*p == '\n') {
            bput(b, "\\n");
        } else {
            bput(b, "%c", *p);
        }
    }
}

static void put_labels(buf_t *b, const lr_metric_t *m, const series_t *s, const char *extra_name,
                       const char *extra_value) {
    int n = 0;
    if (m->nlabels == 0 && extra_name == NULL) {
        return;
    }
    bput(b, "{");
    for (int l = 0; l < m->nlabels; l++) {
        bput(b, "%s%s=\"", n++ ? "," : "", m->labels[l]);
        put_value(b, s->values[l]);
        bput(b, "\"");
    }
    if (extra_name != NULL) {
        bput(b, "%s%s=\"%s\"", n ? "," : "", extra_name, extra_value);
    }
    bput(b, "}");
}

static void put_number(buf_t *b, double v) {
    if (v == floor(v) && fabs(v) < 1e15) {
        bput(b, "%.0f", v);
    } else {
        bput(b, "%.9g", v);
    }
}

/* What /proc/self/stat says (fields as proc(5) numbers them). */
typedef struct proc_stat {
    unsigned long utime, stime; /* 14, 15: clock ticks */
    unsigned long long start;   /* 22: clock ticks after boot */
    unsigned long long vsize;   /* 23: bytes */
    long rss;                   /* 24: pages */
} proc_stat_t;

static bool read_proc_stat(proc_stat_t *ps) {
    FILE *f = fopen("/proc/self/stat", "r");
    char line[1024], *p, *save = NULL;
    int field = 2;
    bool ok = false;
    memset(ps, 0, sizeof(*ps));
    if (f == NULL) {
        return false;
    }
    /* after the command name in parentheses (which may hold spaces) */
    if (fgets(line, sizeof(line), f) != NULL && (p = strrchr(line, ')')) != NULL) {
        for (char *t = strtok_r(p + 1, " ", &save); t != NULL; t = strtok_r(NULL, " ", &save)) {
            field++;
            if (field == 14) {
                ps->utime = strtoul(t, NULL, 10);
            } else if (field == 15) {
                ps->stime = strtoul(t, NULL, 10);
            } else if (field == 22) {
                ps->start = strtoull(t, NULL, 10);
            } else if (field == 23) {
                ps->vsize = strtoull(t, NULL, 10);
            } else if (field == 24) {
                ps->rss = strtol(t, NULL, 10);
                ok = true;
                break;
            }
        }
    }
    fclose(f);
    return ok;
}

/* The boot time (Unix seconds) from /proc/stat's btime line; 0 if unknown. */
static long long boot_time(void) {
    FILE *f = fopen("/proc/stat", "r");
    char line[256];
    long long bt = 0;
    if (f == NULL) {
        return 0;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "btime ", 6) == 0) {
            bt = strtoll(line + 6, NULL, 10);
            break;
        }
    }
    fclose(f);
    return bt;
}

static int open_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;
    if (d == NULL) {
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] != '.' && atoi(e->d_name) != dirfd(d)) {
            n++;
        }
    }
    closedir(d);
    return n;
}

/* The standard process metrics, under the names every Prometheus client
 * library uses (so dashboards made for them work), and longrun_build_info. */
static double started; /* process_start_time_seconds, read once */
static pthread_once_t started_once = PTHREAD_ONCE_INIT;

static void read_started(void) {
    proc_stat_t ps;
    long ticks = sysconf(_SC_CLK_TCK);
    long long bt = boot_time();
    started = read_proc_stat(&ps) && bt > 0 && ticks > 0 ? (double)bt + (double)ps.start / (double)ticks
                                                         : (double)start_time;
}

static void process_metrics(buf_t *b) {
    proc_stat_t ps;
    struct rlimit rl;
    long ticks = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
    int fds = open_fds();
    (void)read_proc_stat(&ps);
    pthread_once(&started_once, read_started);
    bput(b, "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
            "# TYPE process_cpu_seconds_total counter\n");
    bput(b, "process_cpu_seconds_total %.2f\n", ticks > 0 ? (double)(ps.utime + ps.stime) / (double)ticks : 0.0);
    bput(b, "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
            "# TYPE process_resident_memory_bytes gauge\n");
    bput(b, "process_resident_memory_bytes %lld\n", (long long)ps.rss * (long long)page);
    bput(b, "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n"
            "# TYPE process_virtual_memory_bytes gauge\n");
    bput(b, "process_virtual_memory_bytes %llu\n", ps.vsize);
    bput(b, "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
            "# TYPE process_start_time_seconds gauge\n");
    bput(b, "process_start_time_seconds %.2f\n", started);
    bput(b, "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\n");
    bput(b, "process_open_fds %d\n", fds > 0 ? fds : 0);
    bput(b, "# HELP process_max_fds Maximum number of open file descriptors.\n# TYPE process_max_fds gauge\n");
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        bput(b, "process_max_fds %llu\n", (unsigned long long)rl.rlim_cur);
    } else {
        bput(b, "process_max_fds 0\n");
    }
    bput(b, "# HELP longrun_build_info The version and commit of this binary (always 1).\n"
            "# TYPE longrun_build_info gauge\nlongrun_build_info{version=\"");
    put_value(b, lr_build_version);
    bput(b, "\",commit=\"");
    put_value(b, lr_build_commit);
    bput(b, "\"} 1\n");
}

char *lr_metrics_render(void) {
    buf_t b = {malloc(16384), 0, 16384, false};
    if (b.p == NULL) {
        return NULL;
    }
    b.p[0] = '\0';
    pthread_mutex_lock(&reg_mu);
    lr_list_foreach(it, &families) {
        static const char *const kinds[] = {"counter", "gauge", "histogram"};
        lr_metric_t *m = lr_list_entry(it, lr_metric_t, link);
        pthread_mutex_lock(&m->mu);
        bput(&b, "# HELP %s %s\n# TYPE %s %s\n", m->name, m->help, m->name, kinds[m->kind]);
        if (m->nlabels == 0 && m->nseries == 0 && m->kind != K_HISTOGRAM) {
            bput(&b, "%s 0\n", m->name); /* unlabelled families always show */
        }
        for (int i = 0; i < m->nseries; i++) {
            series_t *s = &m->series[i];
            if (m->kind != K_HISTOGRAM) {
                bput(&b, "%s", m->name);
                put_labels(&b, m, s, NULL, NULL);
                bput(&b, " ");
                put_number(&b, s->value);
                bput(&b, "\n");
                continue;
            }
            for (int k = 0; k < m->nbounds; k++) {
                char le[32];
                snprintf(le, sizeof(le), "%g", m->bounds[k]);
                bput(&b, "%s_bucket", m->name);
                put_labels(&b, m, s, "le", le);
                bput(&b, " %llu\n", s->buckets[k]);
            }
            bput(&b, "%s_bucket", m->name);
            put_labels(&b, m, s, "le", "+Inf");
            bput(&b, " %llu\n%s_sum", s->count, m->name);
            put_labels(&b, m, s, NULL, NULL);
            bput(&b, " ");
            put_number(&b, s->sum);
            bput(&b, "\n%s_count", m->name);
            put_labels(&b, m, s, NULL, NULL);
            bput(&b, " %llu\n", s->count);
        }
        pthread_mutex_unlock(&m->mu);
    }
    pthread_mutex_unlock(&reg_mu);
    process_metrics(&b);
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}

void lr_metrics_free(void) {
    lr_list_t *it;
    pthread_mutex_lock(&reg_mu);
    while ((it = lr_list_pop_front(&families)) != NULL) {
        lr_metric_t *m = lr_list_entry(it, lr_metric_t, link);
        for (int i = 0; i < m->nseries; i++) {
            for (int l = 0; l < m->nlabels; l++) {
                free(m->series[i].values[l]);
            }
            free(m->series[i].buckets);
        }
        for (int l = 0; l < m->nlabels; l++) {
            free(m->labels[l]);
        }
        free(m->bounds);
        free(m->name);
        free(m->help);
        pthread_mutex_destroy(&m->mu);
        free(m);
    }
    pthread_mutex_unlock(&reg_mu);
}
