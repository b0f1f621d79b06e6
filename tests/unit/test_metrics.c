/*
 * test_metrics.c - unit test of common/metrics.c: the exposition of
 * counters, gauges and histograms (long buckets, escaped labels, the
 * "other" series past the cardinality bound), the standard process_*
 * metrics under their Prometheus names (never longrun_process_*), and
 * longrun_build_info with the build's version and commit.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buildinfo.h"
#include "metrics.h"
#include "testutil.h"

/* The value of the sample line that starts with name (labels included),
 * or -1 when there is none. */
static double sample(const char *text, const char *name) {
    size_t n = strlen(name);
    for (const char *p = text; p != NULL && *p != '\0'; p = strchr(p, '\n'), p = p != NULL ? p + 1 : NULL) {
        if (strncmp(p, name, n) == 0 && p[n] == ' ') {
            return strtod(p + n + 1, NULL);
        }
    }
    return -1;
}

static void test_process(const char *text) {
    static const char *const gauges[] = {"process_resident_memory_bytes", "process_virtual_memory_bytes",
                                         "process_start_time_seconds", "process_open_fds", "process_max_fds"};
    for (size_t i = 0; i < sizeof(gauges) / sizeof(gauges[0]); i++) {
        char type[96];
        snprintf(type, sizeof(type), "# TYPE %s gauge\n", gauges[i]);
        if (strstr(text, type) == NULL) {
            T_FAIL("no \"%s\" in the exposition", type);
        }
        if (sample(text, gauges[i]) <= 0) {
            T_FAIL("%s is %g, want > 0", gauges[i], sample(text, gauges[i]));
        }
    }
    T_ASSERT(strstr(text, "# TYPE process_cpu_seconds_total counter\n") != NULL);
    T_ASSERT(sample(text, "process_cpu_seconds_total") >= 0);
    T_ASSERT(strstr(text, "longrun_process_") == NULL); /* the old names are gone */
    T_ASSERT(sample(text, "process_resident_memory_bytes") > 100000);
    T_ASSERT(sample(text, "process_virtual_memory_bytes") >= sample(text, "process_resident_memory_bytes"));
    T_ASSERT(sample(text, "process_open_fds") >= 3); /* stdin, stdout, stderr */
    T_ASSERT(sample(text, "process_max_fds") >= sample(text, "process_open_fds"));
    /* started a moment ago, after 2020 */
    T_ASSERT(sample(text, "process_start_time_seconds") > 1.6e9);
    {
        char line[200];
        snprintf(line, sizeof(line), "longrun_build_info{version=\"%s\",commit=\"%s\"}", lr_build_version,
                 lr_build_commit);
        T_EQ_INT(sample(text, line), 1);
        T_EQ_STR(lr_build_version, LONGRUN_VERSION);
        T_ASSERT(lr_build_commit[0] != '\0');
    }
    printf("process metrics: ok (rss %.0f bytes, %g fds of %g, commit %s)\n",
           sample(text, "process_resident_memory_bytes"), sample(text, "process_open_fds"),
           sample(text, "process_max_fds"), lr_build_commit);
}

int main(void) {
    static const double longs[] = {1, 60, 3600, 86400, 604800};
    lr_metric_t *c = lr_metric_counter("t_calls_total", "Calls.", "agent,model");
    lr_metric_t *g = lr_metric_gauge("t_gauge", "A gauge.", NULL);
    lr_metric_t *h = lr_metric_histogram("t_wait_seconds", "Waits.", "queue", longs, 5);
    char *text;

    lr_metric_add(c, (const char *const[]){"a", "m\"1"}, 2);
    lr_metric_add(c, (const char *const[]){"a", "m\"1"}, 3);
    lr_metric_set(g, NULL, 7.5);
    lr_metric_observe(h, (const char *const[]){"q"}, 30);
    lr_metric_observe(h, (const char *const[]){"q"}, 7200);
    lr_metric_observe(h, (const char *const[]){"q"}, 1e7); /* over the last bucket: +Inf only */
    for (int i = 0; i < LR_METRIC_MAX_SERIES + 10; i++) {
        char name[16];
        snprintf(name, sizeof(name), "q%d", i);
        lr_metric_observe(h, (const char *const[]){name}, 1);
    }
    text = lr_metrics_render();
    T_ASSERT(text != NULL);
    T_EQ_INT(sample(text, "t_calls_total{agent=\"a\",model=\"m\\\"1\"}"), 5);
    T_ASSERT(sample(text, "t_gauge") == 7.5);
    T_EQ_INT(sample(text, "t_wait_seconds_bucket{queue=\"q\",le=\"60\"}"), 1);
    T_EQ_INT(sample(text, "t_wait_seconds_bucket{queue=\"q\",le=\"86400\"}"), 2);
    T_EQ_INT(sample(text, "t_wait_seconds_bucket{queue=\"q\",le=\"604800\"}"), 2);
    T_EQ_INT(sample(text, "t_wait_seconds_bucket{queue=\"q\",le=\"+Inf\"}"), 3);
    T_EQ_INT(sample(text, "t_wait_seconds_count{queue=\"q\"}"), 3);
    /* 128 series in all: q and q0..q125; the rest counted under other */
    T_EQ_INT(sample(text, "t_wait_seconds_count{queue=\"q125\"}"), 1);
    T_EQ_INT(sample(text, "t_wait_seconds_count{queue=\"q126\"}"), -1);
    T_EQ_INT(sample(text, "t_wait_seconds_count{queue=\"other\"}"), 12);
    printf("families: ok\n");
    test_process(text);
    free(text);
    lr_metrics_free();
    return 0;
}
