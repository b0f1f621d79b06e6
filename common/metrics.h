/*
 * metrics.h - a small Prometheus metrics registry (counters, gauges,
 * histograms) with bounded label cardinality.
 *
 * Families are registered once at start-up (before threads start); series
 * are created on first use, at most LR_METRIC_MAX_SERIES per family (further
 * label combinations are counted under the value "other", so a task id can
 * never blow up the exposition).  Updates take the family's mutex: cheap at
 * the rates here (a few per step).  lr_metrics_render() may run on any thread
 * (the health server's).  Names and labels follow docs/metrics.md.
 */
#ifndef LR_METRICS_H
#define LR_METRICS_H

#include <stddef.h>

#define LR_METRIC_MAX_SERIES 128
#define LR_METRIC_MAX_LABELS 3

typedef struct lr_metric lr_metric_t;

/* labels: comma-separated label names ("provider,model") or NULL.
 * Returns the family (never NULL: aborts on out-of-memory at start-up). */
lr_metric_t *lr_metric_counter(const char *name, const char *help, const char *labels);
lr_metric_t *lr_metric_gauge(const char *name, const char *help, const char *labels);
/* buckets: upper bounds, ascending (the +Inf bucket is implicit). */
lr_metric_t *lr_metric_histogram(const char *name, const char *help, const char *labels, const double *buckets,
                                 int nbuckets);

/* values: the label values in order, or NULL for a family without labels.
 * Unknown/overflowing combinations go to "other". */
void lr_metric_add(lr_metric_t *m, const char *const *values, double v);
void lr_metric_set(lr_metric_t *m, const char *const *values, double v);
void lr_metric_observe(lr_metric_t *m, const char *const *values, double v);
/* Drops the series of values (a gauge of something that no longer exists);
 * nothing when there is none. */
void lr_metric_remove(lr_metric_t *m, const char *const *values);

/* Convenience for families with one label or none. */
void lr_metric_inc1(lr_metric_t *m, const char *value);

/* Renders the text exposition (version 0.0.4) into a malloc'd string, with
 * the standard process metrics (process_cpu_seconds_total,
 * process_resident_memory_bytes, process_virtual_memory_bytes,
 * process_start_time_seconds, process_open_fds, process_max_fds: the names
 * of the Prometheus client libraries, from /proc/self) and
 * longrun_build_info{version,commit} appended.  Reads /proc: call it off the
 * event loop (the health server's thread does).  Caller frees.  NULL on out
 * of memory. */
char *lr_metrics_render(void);

/* Frees every family (at exit, after all threads stopped). */
void lr_metrics_free(void);

/* Standard latency buckets in seconds. */
extern const double lr_latency_buckets[];
extern const int lr_latency_nbuckets;

#endif
