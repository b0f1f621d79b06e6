/* metrics.c - the Prometheus registry; see metrics.h. */
#include "metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

static void process_metrics(buf_t *b) {
    FILE *f = fopen("/proc/self/stat", "r");
    long rss_pages = 0;
    unsigned long utime = 0, stime = 0;
    long ticks = sysconf(_SC_CLK_TCK);
    if (f != NULL) {
        /* fields 14 (utime) and 15 (stime), 24 (rss) */
        char line[1024];
        if (fgets(line, sizeof(line), f) != NULL) {
            char *p = strrchr(line, ')');
            if (p != NULL) {
                int field = 2;
                for (char *t = strtok(p + 1, " "); t != NULL; t = strtok(NULL, " ")) {
                    field++;
                    if (field == 14) {
                        utime = strtoul(t, NULL, 10);
                    } else if (field == 15) {
                        stime = strtoul(t, NULL, 10);
                    } else if (field == 24) {
                        rss_pages = strtol(t, NULL, 10);
                    }
                }
            }
        }
        fclose(f);
    }
    bput(b,
         "# HELP longrun_process_resident_memory_bytes Resident memory of this process.\n"
         "# TYPE longrun_process_resident_memory_bytes gauge\nlongrun_process_resident_memory_bytes %ld\n",
         rss_pages * sysconf(_SC_PAGESIZE));
    bput(b,
         "# HELP longrun_process_cpu_seconds_total CPU time (user + system) of this process.\n"
         "# TYPE longrun_process_cpu_seconds_total counter\nlongrun_process_cpu_seconds_total %.2f\n",
         ticks > 0 ? (double)(utime + stime) / (double)ticks : 0.0);
    bput(b,
         "# HELP longrun_process_start_time_seconds Start time of this process (Unix time).\n"
         "# TYPE longrun_process_start_time_seconds gauge\nlongrun_process_start_time_seconds %ld\n",
         (long)start_time);
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
